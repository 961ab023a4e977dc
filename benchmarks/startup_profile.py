"""Where P's fixed cost goes: a timeline of one run on a tiny input.

Usage:
  python -m benchmarks.startup_profile --model MODEL_DIR --input 'DIR/*.parquet'
      [--python PYTHON] [--code CHECKOUT] [--repeats 3] [-- PREDICT FLAGS]

Runs `python -m beam_jobs.predict` (P's flags from benchmarks.throughput,
then the flags after `--`) in a child interpreter that timestamps, from its
own start: the imports, preflight, the graph, the runner's set-up, each
bundle the FnApiRunner executes (the first one waits for the worker
processes to start: their imports, their connection, the first stage), the
wait from the last bundle until the runner returns (the workers' shutdown,
one after the other) and the end of `main`. The hooks wrap Beam's functions
in that child only; the pipeline is the production one. Also times, in
fresh interpreters, Beam's import and the project's modules on top of it.
Medians of --repeats; prints Markdown tables.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from benchmarks import throughput

REPO = throughput.REPO

# The child: hooks, then predict's main. Each event is a JSON line on the
# pipe whose descriptor STARTUP_EVENTS_FD names.
CHILD = r"""
import json, os, sys, time
started = time.perf_counter()
out = os.fdopen(int(os.environ.pop("STARTUP_EVENTS_FD")), "w", buffering=1)
def event(name, **extra):
  out.write(json.dumps(dict(extra, name=name,
                            at=time.perf_counter() - started)) + "\n")
import apache_beam
from apache_beam.runners.portability.fn_api_runner import fn_runner
event("beam imported")
import beam_jobs.predict as predict
from beam_jobs import preflight
event("project imported")
def wrap(owner, attribute, label, detail=None):
  original = getattr(owner, attribute)
  def wrapped(*args, **kwargs):
    event(label + " start")
    try:
      return original(*args, **kwargs)
    finally:
      extra = detail(*args) if detail else {}
      event(label + " end", **extra)
  setattr(owner, attribute, wrapped)
wrap(preflight, "check", "preflight")
wrap(predict, "build_pipeline", "build")
wrap(fn_runner.FnApiRunner, "run_stages", "run_stages")
wrap(fn_runner.FnApiRunner, "_execute_bundle", "bundle",
     lambda self, context, manager, data: {"stage": manager.stage.name})
sys.argv = ["predict"] + sys.argv[1:]
code = predict.main()
event("main returned")
out.flush()
sys.exit(code)
"""

IMPORTS = ("import time; t = time.perf_counter(); import apache_beam, "
           "apache_beam.runners.worker.sdk_worker_main; u = time.perf_counter()"
           "; import beam_jobs.predict, beam_jobs.pipeline, beam_jobs.preprocess"
           ", beam_jobs.inference; print(u - t, time.perf_counter() - u)")


def timeline(python, code, args, extra):
  """One run's events, and its whole wall time."""
  read, write = os.pipe()
  command = [python, "-c", CHILD, "--input", args.input, "--model",
             args.model, "--output", os.path.join(args.work, "out"),
             "--overwrite", *throughput.P_FLAGS, "--engine", "tflite", *extra]
  import time  # pylint: disable=import-outside-toplevel
  started = time.perf_counter()
  process = subprocess.Popen(
      command, cwd=code, pass_fds=(write,), stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL, env=dict(
          os.environ, PYTHONPATH=code, STARTUP_EVENTS_FD=str(write)))
  os.close(write)
  with os.fdopen(read) as lines:
    events = [json.loads(line) for line in lines]
  if process.wait():
    raise RuntimeError(f"{command} exited {process.returncode}")
  return events, time.perf_counter() - started


def phases(events, wall):
  """Seconds per phase of one run's events."""
  at = {}
  for event in events:
    at.setdefault(event["name"], event["at"])
  starts = [e["at"] for e in events if e["name"] == "bundle start"]
  ends = [e["at"] for e in events if e["name"] == "bundle end"]
  first = ends[0] - starts[0]
  # The stage that reads, decodes and classifies is the longest bundle after
  # the first.
  durations = [end - start for start, end in zip(starts, ends)]
  longest = max(range(1, len(durations)), key=durations.__getitem__)
  return {
      "interpreter and Beam's import": at["beam imported"],
      "project's modules": at["project imported"] - at["beam imported"],
      "arguments, preflight": at["preflight end"] - at["project imported"],
      "graph (build_pipeline)": at["build end"] - at["build start"],
      "runner set-up (to the first bundle)": (
          at["run_stages start"] - at["build end"]),
      "first bundle (workers start)": first,
      "read + decode + classify bundle": durations[longest],
      f"other bundles ({len(durations) - 2})": (
          sum(durations) - first - durations[longest]),
      "between bundles (runner)": (ends[-1] - starts[0]) - sum(durations),
      "workers' shutdown (last bundle to runner's return)": (
          at["run_stages end"] - ends[-1]),
      "commit, summary": at["main returned"] - at["run_stages end"],
      "interpreter exit": wall - at["main returned"],
      "whole run": wall,
  }


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  argv, extra = throughput.split_passthrough(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True)
  parser.add_argument("--input", required=True)
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument("--code", default=REPO)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--work", default="/tmp/bench/startup_profile")
  args = parser.parse_args(argv)
  os.makedirs(args.work, exist_ok=True)
  print(f"{args.python}, code {args.code}, flags {' '.join(extra) or '-'}; "
        f"load average {os.getloadavg()[0]:.1f} before")
  imports = [subprocess.run([args.python, "-c", IMPORTS], cwd=args.code,
                            capture_output=True, text=True, check=True,
                            env=dict(os.environ, PYTHONPATH=args.code)
                            ).stdout.split() for _ in range(args.repeats)]
  print(f"fresh interpreter: Beam's import "
        f"{statistics.median(float(i[0]) for i in imports):.2f} s, the "
        f"project's modules on top "
        f"{statistics.median(float(i[1]) for i in imports):.2f} s")
  runs = [phases(*timeline(args.python, args.code, args, extra))
          for _ in range(args.repeats)]
  print(f"load average {os.getloadavg()[0]:.1f} after\n")
  print("| phase | seconds (median) | each run |")
  print("| --- | --- | --- |")
  for name in runs[0]:
    values = [run[name] for run in runs]
    print(f"| {name} | {statistics.median(values):.2f} | "
          f"{', '.join(f'{v:.2f}' for v in values)} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
