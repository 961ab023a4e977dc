"""Where P's time goes: each stage alone, against the whole pipeline.

Usage:
  python -m benchmarks.profile --workload W1 [--work /tmp/bench]
      [--fashion_model DIR] [--flowers_model DIR] [--w4_model DIR]

The stages run in this process, one after the other (benchmarks/stages.py):
read, decode, inference, format and write. Their CPU time is what the work
itself costs.
Then P runs as a user runs it (python -m beam_jobs.predict, the settings of
benchmarks/throughput.py), and its whole process tree's CPU time is taken
from the kernel. What P spends beyond the stages is Beam (start-up, bundle
and element handling, pickling between stages, shard renames); what its
cores spend idle is wall time not covered by CPU on any core.
"""

import argparse
import os
import resource
import sys

from benchmarks import stages
from benchmarks import throughput
from benchmarks import workloads


def pipeline_seconds(folder, model_dir, out_dir):
  """(wall seconds, CPU seconds of P's whole process tree, images)."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  result = throughput.run_system("P", folder, model_dir, out_dir, 0,
                                 throughput.P_FLAGS)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return result["wall_s"], cpu, result["images"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workload", default="W1", choices=["W1", "W2", "W3", "W4"])
  parser.add_argument("--work", default="/tmp/bench")
  parser.add_argument("--fashion_model", default=None)
  parser.add_argument("--flowers_model", default=None)
  parser.add_argument("--w4_model", default=None)
  parser.add_argument("--w1_images", type=int, default=300_000)
  parser.add_argument("--w4_images", type=int, default=3_433)
  parser.add_argument("--shared_data", default=workloads.SHARED)
  parser.add_argument("--w4_decoder", default="tensorflow",
                      choices=("tensorflow", "pillow"))
  parser.add_argument("--batch_size", type=int, default=workloads.BATCH)
  args = parser.parse_args(argv)
  defaults = throughput.parse_args([
      "--work", args.work, "--shared_data", args.shared_data, "--w1_images",
      str(args.w1_images), "--w4_images", str(args.w4_images)])
  defaults.workloads = [args.workload]
  defaults.fashion_model = args.fashion_model
  defaults.flowers_model = args.flowers_model
  defaults.w4_model, defaults.w4_decoder = args.w4_model, args.w4_decoder
  folder, model_dir = workloads.prepare(defaults)[args.workload]

  seconds_by_stage, images = stages.stage_seconds(folder, model_dir,
                                                  args.batch_size)
  wall, cpu, p_images = pipeline_seconds(
      folder, model_dir, os.path.join(args.work, "out", "profile"))
  if p_images != images:
    sys.exit(f"P classified {p_images} images, the stages {images}")
  cores = os.cpu_count()
  rows = list(seconds_by_stage.items())
  rows.append(("Beam and start-up (P's CPU beyond the stages)",
               max(0.0, cpu - sum(seconds_by_stage.values()))))
  rows.append(("idle cores (cores x wall beyond P's CPU)",
               max(0.0, cores * wall - cpu)))
  total = sum(seconds for _, seconds in rows)
  print(f"{args.workload}: {images} images; P took {wall:.1f} s wall on "
        f"{cores} cores, {cpu:.1f} s of CPU\n")
  print("| part | core-seconds | µs per image | share |")
  print("| --- | --- | --- | --- |")
  for name, seconds in rows:
    print(f"| {name} | {seconds:.1f} | {seconds / images * 1e6:.1f} | "
          f"{seconds / total:.0%} |")
  print(f"| total (cores x wall) | {total:.1f} | {total / images * 1e6:.1f} | "
        "100% |")


if __name__ == "__main__":
  main()
