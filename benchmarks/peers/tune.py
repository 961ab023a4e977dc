"""The peers' tuning runs: each setting their docs point at, measured.

Usage (the project's venv runs it; the jobs run in the peers' venv):
  python -m benchmarks.peers.tune --model DIR (--parquet DIR | --images DIR)
      [--peers ray,spark] [--repeats 1] [--work /tmp/bench/tune]

Every variant runs as a whole process tree (benchmarks/process_tree.py), the
variants of a round in turns. Printed per variant: wall seconds, CPU seconds
of the tree, peak PSS and RSS, and the CPU the rest of the machine used
meanwhile (contention). A variant that hangs is stopped after --timeout
seconds and shown as such: two Ray actors of one CPU each on two CPUs do.
"""

import argparse
import os
import statistics
import sys

from benchmarks import process_tree
from benchmarks.peers import common

# (name, peer, extra arguments); the first of each peer is its default.
VARIANTS = (
    ("ray: 2 actors x 0.5 CPU, batch 256 (default)", "ray", ()),
    ("ray: 1 actor x 1 CPU", "ray", ("--actors", "1", "--actor_cpus", "1")),
    ("ray: batch 64", "ray", ("--batch_size", "64")),
    ("ray: batch 1024", "ray", ("--batch_size", "1024")),
    ("ray: Parquet v2 datasource (Ray 2.60's default)", "ray",
     ("--parquet_reader", "v2")),
    ("ray: 2 actors x 1 CPU (Ray Data's default num_cpus)", "ray",
     ("--actors", "2", "--actor_cpus", "1")),
    ("spark: coalesce(2), Arrow 2048, batch 256 (default)", "spark", ()),
    ("spark: Spark's own partitions (no coalesce)", "spark",
     ("--partitions", "0")),
    ("spark: Arrow batches of 10000 (Spark's default)", "spark",
     ("--arrow_batch", "10000")),
    ("spark: batch 64", "spark", ("--batch_size", "64")),
)
JOBS = {"ray": "ray_job.py", "spark": "spark_job.py"}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--parquet")
  source.add_argument("--images")
  parser.add_argument("--model", required=True)
  parser.add_argument("--peers", default="ray,spark")
  parser.add_argument("--only", default="",
                      help="run the variants whose name holds this text")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--timeout", type=float, default=300)
  parser.add_argument("--work", default="/tmp/bench/tune")
  parser.add_argument("--python", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), ".venv", "bin", "python"))
  args = parser.parse_args(argv)
  flag, folder = (("--parquet", args.parquet) if args.parquet
                  else ("--images", args.images))
  peers = args.peers.split(",")
  variants = [v for v in VARIANTS if v[1] in peers and args.only in v[0]
              and not (args.images and "--parquet_reader" in v[2])]
  runs = {name: [] for name, _, _ in variants}
  for _ in range(args.repeats):
    for name, peer, extra in variants:
      command = ["timeout", str(args.timeout), args.python,
                 os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              JOBS[peer]), flag, os.path.abspath(folder),
                 "--model", os.path.abspath(args.model), "--output",
                 os.path.join(args.work, "out"), *extra]
      figures, _ = process_tree.measure(command, cwd=common.REPO,
                                        stderr=open(os.devnull, "w"))
      runs[name].append(figures)
      print(f"{name}: exit {figures['returncode']}, {figures['wall_s']:.1f} s",
            file=sys.stderr)
  print(f"input {folder}, {args.repeats} round(s), medians\n")
  print("| variant | wall s | CPU s | peak PSS MiB | peak RSS MiB | other CPU s "
        "| load |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for name, figures in runs.items():
    failed = [f for f in figures if f["returncode"]]
    median = lambda key: statistics.median(f[key] for f in figures)  # pylint: disable=unnecessary-lambda-assignment,cell-var-from-loop
    wall = (f"stopped at {args.timeout:.0f} s (exit "
            f"{failed[0]['returncode']})" if failed else f"{median('wall_s'):.1f}")
    print(f"| {name} | {wall} | {median('cpu_s'):.1f} | "
          f"{max(f['peak_pss_mib'] for f in figures):.0f} | "
          f"{max(f['peak_rss_mib'] for f in figures):.0f} | "
          f"{median('other_cpu_s'):.1f} | {median('load1_before'):.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
