"""What progress lines cost: P on W1 with and without them, same run.

Usage:
  python -m benchmarks.progress_overhead [--work /tmp/bench] [--repeats 3]
      [--w1_images 300000] [--fashion_model DIR] [--shared_data DIR]

P runs as `benchmarks.throughput` runs it (`--direct_num_workers 2
--direct_running_mode multi_processing --inference_threads 1`), once with
the default `--progress_seconds` and once with `--progress_seconds 0`,
alternating so that a busy spell on the machine hits both alike. Prints the
medians of each one's whole-process wall time and CPU time (P's process
tree) and their ratios.
"""

import argparse
import os
import resource
import shutil
import statistics
import sys
import time

from beam_jobs import config as config_lib
from benchmarks import throughput

VARIANTS = {
    "progress lines": (),
    "no progress lines": ("--progress_seconds", "0"),
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--work", default="/tmp/bench")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--w1_images", type=int, default=300_000)
  parser.add_argument("--fashion_model", default=None)
  parser.add_argument("--shared_data", default=throughput.SHARED,
                      help="folder holding fashion-mnist/ (a worktree's "
                      "../shared/data may not exist)")
  args = parser.parse_args(argv)
  # throughput builds its workloads from this folder.
  throughput.SHARED = args.shared_data
  defaults = throughput.parse_args([
      "--work", args.work, "--workloads", "W1",
      "--w1_images", str(args.w1_images)])
  defaults.workloads = ["W1"]
  defaults.fashion_model = args.fashion_model
  folder, model = throughput.prepare(defaults)["W1"]
  out = os.path.join(args.work, "out", "progress")
  seconds = {name: [] for name in VARIANTS}
  cpu = {name: [] for name in VARIANTS}
  images = {}
  for repeat in range(args.repeats):
    for name, flags in VARIANTS.items():
      before = resource.getrusage(resource.RUSAGE_CHILDREN)
      result = throughput.run_system("P", folder, model, out, 0,
                                     throughput.P_FLAGS + flags)
      after = resource.getrusage(resource.RUSAGE_CHILDREN)
      # CPU seconds of P's whole process tree: what the progress lines add,
      # and far less swayed than wall time by other work on the machine.
      cpu[name].append(after.ru_utime - before.ru_utime +
                       after.ru_stime - before.ru_stime)
      seconds[name].append(result["seconds"])
      images[name] = result["images"]
      print(f"repeat {repeat + 1}, {name}: {result['seconds']:.2f}s wall, "
            f"{cpu[name][-1]:.2f}s CPU", file=sys.stderr)
  wall = {name: statistics.median(values) for name, values in seconds.items()}
  used = {name: statistics.median(values) for name, values in cpu.items()}
  print(f"W1, {images['progress lines']} images, P with "
        f"--progress_seconds {config_lib.DEFAULT_PROGRESS_SECONDS:g} and 0, "
        f"alternating, {args.repeats} runs each\n")
  print("| variant | wall s, each run | median wall s | images/s | "
        "CPU s, each run | median CPU s |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name in VARIANTS:
    print(f"| {name} | {', '.join(f'{v:.2f}' for v in seconds[name])} | "
          f"{wall[name]:.2f} | {images[name] / wall[name]:.0f} | "
          f"{', '.join(f'{v:.2f}' for v in cpu[name])} | {used[name]:.2f} |")
  print("\nwith / without progress lines, ratio of the medians: wall "
        f"{wall['progress lines'] / wall['no progress lines']:.3f}, CPU "
        f"{used['progress lines'] / used['no progress lines']:.3f}")
  # Each repeat's two runs follow each other, so their ratio cancels much of
  # a slow spell that a ratio of medians keeps.
  paired = {label: statistics.median(
      a / b for a, b in zip(values["progress lines"],
                            values["no progress lines"]))
            for label, values in (("wall", seconds), ("CPU", cpu))}
  print(f"median of each repeat's ratio: wall {paired['wall']:.3f}, CPU "
        f"{paired['CPU']:.3f}")
  batches = -(-images["no progress lines"] // throughput.BATCH)
  per_batch = counting_seconds_per_batch()
  share = per_batch * batches / used["no progress lines"]
  print(f"\nthe counting alone: {per_batch * 1e6:.2f} µs per batch of "
        f"{throughput.BATCH}, {per_batch * batches * 1e3:.1f} ms for W1's "
        f"{batches} batches: {share:.4%} of P's median CPU without progress")


def counting_seconds_per_batch(batches: int = 2000, repeats: int = 5) -> float:
  """What a worker's progress counter costs per prediction batch: its own
  code, timed directly (the best of `repeats`), so the machine's load hardly
  sways it. Beam's per-element cost of one more fused ParDo comes on top."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  from beam_jobs.contracts import PREDICTIONS  # pylint: disable=import-outside-toplevel
  from beam_jobs.progress import ProgressReporter  # pylint: disable=import-outside-toplevel
  table = pa.table({"id": [str(i) for i in range(throughput.BATCH)]})
  reporter = ProgressReporter(config_lib.DEFAULT_PROGRESS_SECONDS)
  counter = reporter.counter(PREDICTIONS)
  counter.setup()
  best = float("inf")
  for _ in range(repeats):
    started = time.perf_counter()
    for _ in range(batches):
      counter.process(table)
    best = min(best, (time.perf_counter() - started) / batches)
  counter.finish_bundle()
  shutil.rmtree(reporter.folder)
  return best


if __name__ == "__main__":
  main()
