"""What progress lines cost: P on W1 with and without them, same run.

Usage:
  python -m benchmarks.progress_overhead [--work /tmp/bench] [--repeats 3]
      [--w1_images 300000] [--fashion_model DIR] [--shared_data DIR]
      [--profile_shards 5]

P runs as `benchmarks.throughput` runs it (`--direct_num_workers 2
--direct_running_mode multi_processing --inference_threads 1`), once with
the default `--progress_seconds` and once with `--progress_seconds 0`,
back to back and in turn first (ABBA), so that a busy spell on the machine
hits both alike. Prints the medians of each one's whole-process wall time
and CPU time (P's process tree) and their ratios, then P in one process under
cProfile: the share of its time spent in the progress code itself.
"""

import argparse
import os
import shutil
import statistics
import sys

from beam_jobs import config as config_lib
from benchmarks import throughput
from benchmarks import workloads

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
  parser.add_argument("--profile_shards", type=int, default=5,
                      help="W1 shards (10,000 images each) for the cProfile "
                      "run")
  parser.add_argument("--shared_data", default=workloads.SHARED,
                      help="folder holding fashion-mnist/ (a worktree's "
                      "../shared/data may not exist)")
  args = parser.parse_args(argv)
  defaults = throughput.parse_args([
      "--work", args.work, "--workloads", "W1", "--shared_data",
      args.shared_data, "--w1_images", str(args.w1_images)])
  defaults.workloads = ["W1"]
  defaults.fashion_model = args.fashion_model
  folder, model = workloads.prepare(defaults)["W1"]
  out = os.path.join(args.work, "out", "progress")
  seconds = {name: [] for name in VARIANTS}
  cpu = {name: [] for name in VARIANTS}
  images = {}
  for repeat in range(args.repeats):
    # ABBA: each variant goes first in every other repeat, so neither gains
    # from running second (or first) after the other.
    order = list(VARIANTS.items())
    for name, flags in (order if repeat % 2 == 0 else order[::-1]):
      result = throughput.run_system("P", folder, model, out, 0,
                                     throughput.P_FLAGS + flags)
      # CPU seconds of P's whole process tree: what the progress lines add,
      # and far less swayed than wall time by other work on the machine.
      cpu[name].append(result["cpu_s"])
      seconds[name].append(result["wall_s"])
      images[name] = result["images"]
      print(f"repeat {repeat + 1}, {name}: {result['wall_s']:.2f}s wall, "
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
  print_profile(folder, model, os.path.join(args.work, "out", "profiled"),
                args.profile_shards)


def print_profile(folder: str, model: str, out: str, shards: int) -> None:
  """P in one process (FnApiRunner in memory) under cProfile, with progress
  lines, on the first `shards` shards: the time spent in
  beam_jobs/progress.py against the whole run. The counting runs in the
  profiled thread there; the printing thread wakes every few seconds."""
  import cProfile  # pylint: disable=import-outside-toplevel
  import pstats  # pylint: disable=import-outside-toplevel
  from beam_jobs import predict  # pylint: disable=import-outside-toplevel
  subset = out + "-input"
  shutil.rmtree(subset, ignore_errors=True)
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(subset)
  for name in sorted(n for n in os.listdir(folder)
                     if n.endswith(".parquet"))[:shards]:
    os.link(os.path.join(folder, name), os.path.join(subset, name))
  config = config_lib.PredictConfig(os.path.join(subset, "*.parquet"), model,
                                    out, inference_threads=1)
  profile = cProfile.Profile()
  profile.enable()
  manifest = predict.run(config, ["--runner", "FnApiRunner"])
  profile.disable()
  stats = pstats.Stats(profile)
  ours = [entry for function, entry in stats.stats.items()
          if function[0].endswith(os.path.join("beam_jobs", "progress.py"))]
  seconds = sum(entry[2] for entry in ours)
  print(f"\nin one process under cProfile, "
        f"{manifest['counts']['predictions']} images: "
        f"{seconds * 1e3:.1f} ms in progress.py "
        f"({sum(entry[1] for entry in ours)} calls) of {stats.total_tt:.2f} s "
        f"profiled: {seconds / stats.total_tt:.3%}")


if __name__ == "__main__":
  main()
