"""`imagebatch COMMAND [ARGS]`: every command of the install under one name.

The console script setup.py installs. It works from any folder, unlike
`python -m model.adopt`, which a `model.py` or `tools/` of the user's own in
the current folder would shadow (Python puts the current folder first on
its path for -m; a console script's path does not hold it).
"""

import difflib
import importlib
import sys

from imagebatch import cli

# What each command does, for `imagebatch --help`.
SUMMARIES = {
    "train": "train a Keras classifier and export a model folder",
    "adopt": "make a model folder from a model trained elsewhere",
    "datasets": "write the Fashion-MNIST files as PNG class folders",
    "predict": "classify images with Apache Beam (local or Dataflow)",
    "query": "answers and SQL over a run's results",
    "report": "plots and a page of a run's results",
    "make_shards": "pack an image folder into Parquet shards",
}


def usage() -> str:
  width = max(map(len, cli.PROGRAMS))
  lines = ["usage: imagebatch COMMAND [ARGS] (imagebatch COMMAND --help for "
           "its flags)", "", "commands:"]
  lines.extend(f"  {name.ljust(width)}  {SUMMARIES[name]}"
               for name in cli.PROGRAMS)
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(usage())
    return 0 if argv else cli.USAGE_ERROR
  name = argv[0]
  if name not in cli.PROGRAMS:
    nearest = difflib.get_close_matches(name, list(cli.PROGRAMS), n=1)
    hint = f"; did you mean {nearest[0]}?" if nearest else ""
    print(f"imagebatch: error: no command {name!r}{hint} (imagebatch --help "
          "lists them)", file=sys.stderr)
    return cli.USAGE_ERROR
  # The module comes from the fixed table above, never from the argument.
  module = importlib.import_module(cli.PROGRAMS[name])
  return module.main(argv[1:])


if __name__ == "__main__":
  sys.exit(main())
