"""P's fixed cost: a whole run on a tiny input, variant against variant.

Usage:
  python -m benchmarks.fixed_cost --model MODEL_DIR --input 'DIR/*.parquet'
      [--variant NAME=PYTHON[:CODE_DIR]] ... [--repeats 5] [--work DIR]
      [-- EXTRA PREDICT FLAGS]

Each variant is an interpreter (a virtual environment's python) and the
checkout whose code it runs (PYTHONPATH; default this one), so a lever is
measured as "before" (a worktree of the commit before it) against "after".
Each runs `python -m beam_jobs.predict` with P's flags from
benchmarks.throughput on the same small input; the variants take turns
(A B A B ...), and every run is a whole process tree
(benchmarks/process_tree.py). On a tiny input a run is almost all fixed
cost: the launcher's imports and graph, the workers' start-up and model
load, the runner's stages and its shutdown. Prints medians of wall and CPU
seconds, each variant's ratio to the first, and the load average before the
first run and after the last.
"""

import argparse
import os
import statistics
import subprocess
import sys

from benchmarks import process_tree
from benchmarks import throughput

REPO = throughput.REPO


def parse_variant(text: str) -> tuple:
  """NAME=PYTHON[:CODE_DIR] -> (name, python, code directory)."""
  name, _, rest = text.partition("=")
  python, _, code = rest.partition(":")
  if not name or not python:
    raise argparse.ArgumentTypeError(
        f"--variant wants NAME=PYTHON[:CODE_DIR], got {text!r}")
  return name, python, os.path.abspath(code or REPO)


def run_once(variant, args, extra):
  name, python, code = variant
  output = os.path.join(args.work, name)
  command = [python, "-m", "beam_jobs.predict", "--input", args.input,
             "--model", args.model, "--output", output, "--overwrite",
             *throughput.P_FLAGS, *extra]
  figures = process_tree.measure(
      command, cwd=code, stderr=subprocess.DEVNULL,
      env=dict(os.environ, PYTHONPATH=code))[0]
  if figures["returncode"]:
    raise RuntimeError(f"{name}: {command} exited {figures['returncode']}")
  return figures


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  argv, extra = throughput.split_passthrough(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True)
  parser.add_argument("--input", required=True)
  parser.add_argument("--variant", type=parse_variant, action="append",
                      help="NAME=PYTHON[:CODE_DIR] (repeatable; default: "
                      "this interpreter and checkout)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--work", default="/tmp/bench/fixed_cost")
  args = parser.parse_args(argv)
  variants = args.variant or [("this", sys.executable, REPO)]
  os.makedirs(args.work, exist_ok=True)
  load_before = os.getloadavg()[0]
  runs = {variant[0]: [] for variant in variants}
  for repeat in range(args.repeats):
    for variant in variants:
      figures = run_once(variant, args, extra)
      runs[variant[0]].append(figures)
      print(f"  {variant[0]} run {repeat + 1}: {figures['wall_s']:.2f} s, "
            f"{figures['cpu_s']:.2f} CPU s, load "
            f"{figures['load1_before']:.1f}", file=sys.stderr)
  load_after = os.getloadavg()[0]
  print(f"input {args.input}, {args.repeats} turns, load average "
        f"{load_before:.1f} before and {load_after:.1f} after\n")
  print("| variant | wall s (median) | CPU s (median) | wall / first | "
        "CPU / first | peak RSS MiB | walls |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  first = None
  for name, figures in runs.items():
    wall = statistics.median(f["wall_s"] for f in figures)
    cpu = statistics.median(f["cpu_s"] for f in figures)
    first = first or (wall, cpu)
    walls = ", ".join(f"{f['wall_s']:.1f}" for f in figures)
    print(f"| {name} | {wall:.2f} | {cpu:.2f} | {wall / first[0]:.2f} | "
          f"{cpu / first[1]:.2f} | "
          f"{max(f['peak_rss_mib'] for f in figures):.0f} | {walls} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
