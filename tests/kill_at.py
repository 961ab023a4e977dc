"""Runs `python -m beam_jobs.predict` and kills it with SIGKILL at a chosen point.

Usage: python tests/kill_at.py MODULE:ATTRIBUTE[.ATTRIBUTE] CALLS -- PREDICT_ARGS

The named function is wrapped so that its CALLS-th call kills the process
before it runs, as a crashed worker or a `kill -9` would. The production code
has no switch for this: the fault is injected from outside, by this script.
"""

import functools
import importlib
import os
import signal
import sys


def arm(target: str, calls: int) -> None:
  module_name, _, attribute_path = target.partition(":")
  owner = importlib.import_module(module_name)
  *parents, name = attribute_path.split(".")
  for parent in parents:
    owner = getattr(owner, parent)
  original = getattr(owner, name)
  seen = [0]

  @functools.wraps(original)
  def killing(*args, **kwargs):
    seen[0] += 1
    if seen[0] >= calls:
      os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)

  setattr(owner, name, killing)


def main(argv) -> int:
  target, calls, separator, *predict_args = argv
  if separator != "--":
    raise SystemExit(__doc__)
  arm(target, int(calls))
  from beam_jobs import predict  # pylint: disable=import-outside-toplevel
  return predict.main(predict_args)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
