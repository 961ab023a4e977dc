"""Throughput of the pipeline against the loops and flows a user would write.

Usage:
  python -m benchmarks.throughput [--workloads W1,W2,W3,W4,W5] [--repeats 3]
      [--systems B0,B1,B2,P,Ray,Spark] [--work /tmp/bench]
      [--fashion_model DIR] [--flowers_model DIR] [--w4_model DIR]
      [--physical_limit 2000] [--wait_quiet 600]
  python -m benchmarks.throughput --scaling 10000,100000,1000000 [...]

Workloads W1-W5, built once under --work: benchmarks/workloads.py.
Systems, each in a child process of its own, measured as a process tree
(benchmarks/process_tree.py: wall, CPU seconds, peak RSS and PSS):
  B0, B1, B1-numpy, B2  the baselines (benchmarks/baselines.py): a plain
      loop, stock Beam with RunInference, a per-element model.predict DoFn
      (on --b2_images images)
  P   python -m beam_jobs.predict as a user runs it (start-up counts)
  Ray, Spark  the peers (benchmarks/peers/): Ray Data and PySpark jobs doing
      the same work with the project's decoder and TFLite engine, run with
      the peers' own venv (benchmarks/peers/setup.sh makes it)
Every system is timed as a whole process, start-up included, the way a user
runs it; the baselines also report their loop alone ("loop s"), and P/B0 is
given against both. The systems take turns: each repeat runs every system
once, so a busy spell on the shared machine hits all of them. Times are
medians over --repeats runs (B1 and B2 run once: they are slow and their
ratios are large). Each ratio compares figures from the same run.

--physical_limit N measures, in this process on one thread, the core time per
image of the card's decoder and of the TFLite model on up to N images of each
workload; the machine cannot beat cores / (decode + model), and P's rate is
given against that. --scaling runs P on W1 at each size (subsets of one W1
build), with the fitted fixed cost and per-image cost.
"""

import argparse
import glob
import json
import os
import shlex
import statistics
import sys

import numpy as np

from benchmarks import process_tree
from benchmarks import stages
from benchmarks import workloads

REPO = workloads.REPO
BATCH = workloads.BATCH
PEERS_DIR = os.path.join(REPO, "benchmarks", "peers")
PEER_JOBS = {"Ray": "ray_job.py", "Spark": "spark_job.py"}
# Baselines run once per workload: they are slow and their ratios large.
RUN_ONCE = ("B1", "B1-numpy", "B2")

# The parent: timing, memory, comparison ------------------------------------


def measure(command, code=REPO, log=os.devnull):
  """Runs a command as a measured process tree, with `code` (a checkout) as
  its working folder and PYTHONPATH, and its stderr to `log`; (figures,
  stdout)."""
  with open(log, "w", encoding="utf-8") as stderr:
    figures, stdout = process_tree.measure(
        command, cwd=code, stderr=stderr,
        env=dict(os.environ, PYTHONPATH=code))
  if figures["returncode"]:
    raise RuntimeError(f"{command} failed with exit {figures['returncode']}"
                       f" (its stderr: {log})")
  return figures, stdout


def split_passthrough(argv) -> tuple:
  """(this script's arguments, those after `--`, which go to P itself)."""
  if "--" not in argv:
    return list(argv), []
  cut = argv.index("--")
  return list(argv[:cut]), list(argv[cut + 1:])


def _input_flag(folder):
  kind, _ = stages.list_inputs(folder)
  return "--parquet" if kind == "parquet" else "--images"


def run_system(system, folder, model, out_dir, limit=0, p_flags=(),
               peers_python="", peer_flags=None, baseline=None):
  """One measured run of a system; its figures and where its output is.

  "P-baseline" is P with the code of the `baseline` checkout; `peer_flags`
  maps a peer to extra flags for its job."""
  os.makedirs(out_dir, exist_ok=True)
  if system.startswith("P"):
    output = os.path.join(out_dir, system)
    pattern = folder if not glob.glob(os.path.join(folder, "*.parquet")) else (
        os.path.join(folder, "*.parquet"))
    figures, _ = measure([
        sys.executable, "-m", "beam_jobs.predict", "--input", pattern,
        "--model", model, "--output", output, "--overwrite", *p_flags],
                         code=baseline if system == "P-baseline" else REPO,
                         log=output + ".stderr.log")
    images, shards = p_results(output)
    return dict(figures, images=images, output=shards)
  if system in PEER_JOBS:
    output = os.path.join(out_dir, system)
    figures, stdout = measure([
        peers_python, os.path.join(PEERS_DIR, PEER_JOBS[system]),
        _input_flag(folder), folder, "--model", model, "--output", output,
        "--batch_size", str(BATCH), *(peer_flags or {}).get(system, ())],
                              log=output + ".stderr.log")
    result = json.loads(next(line for line in stdout.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    return dict(figures, images=result["predictions"], peer=result,
                output=sorted(glob.glob(os.path.join(output, "*.parquet"))))
  output = os.path.join(out_dir, f"{system}.parquet")
  figures, stdout = measure([
      sys.executable, "-m", "benchmarks.baselines", "--limit", str(limit),
      system, folder, model, output])
  result = json.loads(stdout.strip().splitlines()[-1])
  return dict(figures, images=result["images"], loop_s=result["seconds"],
              output=[output])


def p_results(output):
  """(predictions, the prediction shards' paths) of a run of P, read through
  its manifest in the folder's layout (OUTPUT/predictions/, or the folder
  itself for P-baseline's older code)."""
  from beam_jobs import output_folder, outputs  # pylint: disable=import-outside-toplevel
  manifest = outputs.read_manifest(output)
  return (manifest["counts"]["predictions"],
          output_folder.result_files(output)[outputs.PREDICTIONS_PREFIX])


def _labels(paths):
  """{id: label} over Parquet files; Spark's file URIs become plain paths."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  labels = {}
  for path in paths:
    table = pq.read_table(path, columns=["id", "label"])
    for id_, label in zip(table.column("id").to_pylist(),
                          table.column("label").to_pylist()):
      labels[id_[len("file:"):] if id_.startswith("file:") else id_] = label
  return labels


def top1_agreement(reference, other):
  """Share of the reference's images whose top-1 the other gives too."""
  a, b = _labels(reference), _labels(other)
  common = a.keys() & b.keys()
  return sum(a[k] == b[k] for k in common) / max(1, len(a)), len(common)


def physical_limit(folder, model_dir, images):
  """Core seconds per image of the decoder and of the model on one thread
  (benchmarks.stages' timing, as the profile's), and the rate 2 cores allow."""
  seconds, count = stages.stage_seconds(folder, model_dir, BATCH, images)
  decode, model = seconds["decode"] / count, seconds["inference"] / count
  return {"images": count, "decode_us": decode * 1e6, "model_us": model * 1e6,
          "rate": (os.cpu_count() or 1) / (decode + model)}


P_FLAGS = ("--direct_num_workers", "2", "--direct_running_mode",
           "multi_processing", "--inference_threads", "1")
# Each workload's engine: the TFLite models, or ONNX Runtime for W5's.
ENGINES = {"W5": "onnx"}


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workloads", default="W1,W2,W3")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--work", default="/tmp/bench")
  parser.add_argument("--shared_data", default=workloads.SHARED,
                      help="the folder holding fashion-mnist/ and flowers/")
  parser.add_argument("--w1_images", type=int, default=300_000)
  parser.add_argument("--w2_images", type=int, default=60_000)
  parser.add_argument("--w3_images", type=int, default=10_000)
  parser.add_argument("--w4_images", type=int, default=3_433)
  parser.add_argument("--b2_images", type=int, default=2_000)
  parser.add_argument("--fashion_model", default=None)
  parser.add_argument("--flowers_model", default=None)
  parser.add_argument("--w4_model", default=None,
                      help="an adopted model folder for W4 (default: the "
                      "MobileNetV2, made and adopted under --work)")
  parser.add_argument("--w5_model", default=None,
                      help="an adopted ONNX model folder for W5 (default: "
                      "--w5_onnx adopted under --work)")
  parser.add_argument("--w5_onnx", default=os.path.join(
      os.environ.get("ONNX_MODELS_DIR", "/work/bench/onnx_models"),
      "efficientnet_lite0", "efficientnet_lite0_dynamic.onnx"),
                      help="EfficientNet-Lite0 as benchmarks/pytorch exports "
                      "it (imagenet_classes.txt beside it)")
  parser.add_argument("--w4_decoder", default="tensorflow",
                      choices=("tensorflow", "pillow"),
                      help="the decoder W4's MobileNetV2 is adopted with")
  parser.add_argument("--systems", default="B0,B1,B2,P")
  parser.add_argument("--peers_python", default=os.path.join(
      PEERS_DIR, ".venv", "bin", "python"),
                      help="the peers' interpreter (benchmarks/peers/setup.sh)")
  parser.add_argument("--ray_flags", default="",
                      help="extra flags for the Ray job, e.g. '--repartition "
                      "20' (5,000-row blocks on 100,000 rows)")
  parser.add_argument("--spark_flags", default="",
                      help="extra flags for the Spark job")
  parser.add_argument("--baseline", default=None,
                      help="a checkout of earlier code: the system "
                      "P-baseline runs P with it, in the same turns (with "
                      "--scaling, at each size)")
  parser.add_argument("--p_flags", default="",
                      help="extra flags for P (and P-baseline)")
  parser.add_argument("--physical_limit", type=int, default=0,
                      help="images per workload to time decoder and model "
                      "on (0: skip)")
  parser.add_argument("--wait_quiet", type=float, default=0,
                      help="before each run, wait up to this many seconds "
                      "for fewer than 0.3 cores busy (0: don't wait)")
  parser.add_argument("--scaling", default="",
                      help="comma-separated W1 sizes: run P on each instead")
  parser.add_argument("--scaling_flags", default="",
                      help="with --scaling, also run P with these flags in "
                      "the same turns, e.g. '--no_duplicate_count'")
  return parser.parse_args(argv)


def p_flags(args, workload="W1") -> tuple:
  return P_FLAGS + ("--engine", ENGINES.get(workload, "tflite")) + tuple(
      shlex.split(args.p_flags))


def peer_flags(args) -> dict:
  return {"Ray": shlex.split(args.ray_flags),
          "Spark": shlex.split(args.spark_flags)}


def _check_peers(args, systems):
  if any(s in PEER_JOBS for s in systems) and not os.path.exists(
      args.peers_python):
    raise SystemExit(f"no peers' interpreter at {args.peers_python}: run "
                     "benchmarks/peers/setup.sh first (or pass --peers_python)")


def run_turns(systems, repeats, run, wait_quiet=0):
  """Runs the systems in turns, `repeats` rounds; {system: [figures, ...]}."""
  runs = {system: [] for system in systems}
  for repeat in range(repeats):
    for system in systems:
      if repeat and system in RUN_ONCE:
        continue
      if wait_quiet:
        process_tree.wait_quiet(timeout=wait_quiet)
      runs[system].append(run(system))
      last = runs[system][-1]
      print(f"  {system} run {repeat + 1}: {last['images']} images, "
            f"{last['wall_s']:.1f} s, {last['cpu_s']:.1f} CPU s, peak RSS "
            f"{last['peak_rss_mib']:.0f} MiB, PSS {last['peak_pss_mib']:.0f} "
            f"MiB, load {last['load1_before']:.1f} to "
            f"{last['load1_after']:.1f}, other CPU {last['other_cpu_s']:.1f} s",
            file=sys.stderr, flush=True)
  return runs


def summarise(runs):
  """Medians over a system's runs (peak memory: the largest)."""
  median = lambda key: statistics.median(r[key] for r in runs)  # pylint: disable=unnecessary-lambda-assignment
  images = runs[-1]["images"]
  summary = dict(runs[-1], runs=len(runs), seconds=median("wall_s"),
                 cpu=median("cpu_s"), other_cpu=median("other_cpu_s"),
                 load=median("load1_before"),
                 rss=max(r["peak_rss_mib"] for r in runs),
                 pss=max(r["peak_pss_mib"] for r in runs))
  summary["rate"] = images / summary["seconds"]
  summary["cpu_per_image"] = summary["cpu"] / images
  if "loop_s" in runs[-1]:
    summary["loop_seconds"] = median("loop_s")
    summary["loop_rate"] = images / summary["loop_seconds"]
  return summary


def main(argv=None):
  args = parse_args(argv)
  if args.scaling:
    return scaling(args)
  args.workloads = args.workloads.split(",")
  systems = args.systems.split(",")
  _check_peers(args, systems)
  built = workloads.prepare(args)
  rows = []
  for name, (folder, model) in built.items():
    out = os.path.join(args.work, "out", name)
    print(f"{name}: {', '.join(systems)} in turns, {args.repeats} rounds",
          file=sys.stderr)
    runs = run_turns(systems, args.repeats, lambda system: run_system(
        system, folder, model, out, args.b2_images if system == "B2" else 0,
        p_flags(args, name), args.peers_python, peer_flags(args),
        args.baseline),
                     args.wait_quiet)
    results = {system: summarise(r) for system, r in runs.items()}
    if name == "W1" and "P" in results:
      tenth = os.path.join(args.work, "W1-tenth")
      if not os.path.exists(tenth):
        os.makedirs(tenth)
        shards = sorted(glob.glob(os.path.join(folder, "*.parquet")))
        for shard in shards[:max(1, len(shards) // 10)]:
          os.link(shard, os.path.join(tenth, os.path.basename(shard)))
      small = run_system("P-tenth", tenth, model, out, 0, p_flags(args))
      results["P"]["rss_tenth"] = small["peak_rss_mib"]
    limit = (physical_limit(folder, model, args.physical_limit)
             if args.physical_limit else None)
    rows.append((name, results, limit))
  print_table(rows)
  return 0


def print_table(rows):
  print("| workload | system | images | seconds | images/s | CPU s | "
        "P/system | P/system CPU | loop s | P/system loop | peak RSS MiB | "
        "peak PSS MiB | load | other CPU s |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | "
        "--- | --- | --- |")
  for name, results, _ in rows:
    p = results.get("P")
    for system, r in results.items():
      other = p and system != "P"
      whole = f"{p['rate'] / r['rate']:.2f}" if other else ""
      cpu = f"{r['cpu_per_image'] / p['cpu_per_image']:.2f}" if other else ""
      loop_seconds = f"{r['loop_seconds']:.1f}" if "loop_seconds" in r else ""
      loop = (f"{p['rate'] / r['loop_rate']:.2f}"
              if p and "loop_rate" in r else "")
      print(f"| {name} | {system} | {r['images']} | {r['seconds']:.1f} | "
            f"{r['rate']:.0f} | {r['cpu']:.1f} | {whole} | {cpu} | "
            f"{loop_seconds} | {loop} | {r['rss']:.0f} | {r['pss']:.0f} | "
            f"{r['load']:.1f} | {r['other_cpu']:.1f} |")
  for name, results, limit in rows:
    p = results.get("P")
    print()
    if not p:
      continue
    for system, r in results.items():
      if system == "P":
        continue
      agreement, common = top1_agreement(r["output"], p["output"])
      print(f"{name}: P's top-1 matches {system}'s on {agreement:.4%} of "
            f"{system}'s images ({common} compared)")
      if system in PEER_JOBS:
        print(f"{name}: P's peak memory / {system}'s: RSS "
              f"{p['rss'] / r['rss']:.2f}, PSS {p['pss'] / r['pss']:.2f}")
    if "rss_tenth" in p:
      print(f"{name}: peak RSS of P {p['rss']:.0f} MiB on all, "
            f"{p['rss_tenth']:.0f} MiB on a tenth: ratio "
            f"{p['rss'] / p['rss_tenth']:.2f}")
    if limit:
      print(f"{name}: physical limit from {limit['images']} images on one "
            f"thread: decode {limit['decode_us']:.0f} us + model "
            f"{limit['model_us']:.0f} us per image = {limit['rate']:.0f} "
            f"images/s on {os.cpu_count()} cores; P / limit "
            f"{p['rate'] / limit['rate']:.2f} (whole process)")


def _fit(sizes, seconds):
  """Least squares seconds = fixed + per_image * size."""
  slope, intercept = np.polyfit(np.asarray(sizes, float),
                                np.asarray(seconds, float), 1)
  return float(intercept), float(slope)


def scaling(args):
  """P on W1 at growing sizes: the first shards of one W1 build."""
  sizes = sorted(int(n) for n in args.scaling.split(","))
  if any(n % workloads.ROWS_PER_SHARD for n in sizes):
    raise SystemExit("--scaling sizes must be multiples of "
                     f"{workloads.ROWS_PER_SHARD}")
  args.workloads, args.w1_images = ["W1"], sizes[-1]
  full, model = workloads.prepare(args)["W1"]
  shards = sorted(glob.glob(os.path.join(full, "*.parquet")))
  folders = {}
  for n in sizes:
    folders[n] = os.path.join(args.work, f"W1-first-{n}")
    if not os.path.exists(folders[n]):
      os.makedirs(folders[n])
      for shard in shards[:n // workloads.ROWS_PER_SHARD]:
        os.link(shard, os.path.join(folders[n], os.path.basename(shard)))
  out = os.path.join(args.work, "out", "scaling")
  # Each variant: a name, the system and P's extra flags; the others
  # (--scaling_flags, --baseline) run in the same turns as P.
  variants = {"P": ("P", ())}
  if args.scaling_flags:
    variants[f"P {args.scaling_flags}"] = (
        "P", tuple(shlex.split(args.scaling_flags)))
  if args.baseline:
    variants["P-baseline"] = ("P-baseline", ())

  def run(key):
    size, name = key.split(" ", 1)
    system, flags = variants[name]
    return run_system(system, folders[int(size)], model,
                      os.path.join(out, key.replace(" ", "_")), 0,
                      p_flags(args) + flags, baseline=args.baseline)

  runs = run_turns([f"{n} {name}" for n in sizes for name in variants],
                   args.repeats, run, args.wait_quiet)
  limit = (physical_limit(folders[sizes[0]], model, args.physical_limit)
           if args.physical_limit else None)
  for name in variants:
    results = {n: summarise(runs[f"{n} {name}"]) for n in sizes}
    _print_scaling(name, sizes, results, limit)
  return 0


def _print_scaling(name, sizes, results, limit):
  """One variant's table, fit and ratios."""
  fixed, per_image = _fit(sizes, [results[n]["seconds"] for n in sizes])
  cpu_fixed, cpu_per_image = _fit(sizes, [results[n]["cpu"] for n in sizes])
  print(f"\n{name}\n")
  print("| rows | seconds | images/s | per-image µs beyond the fixed cost | "
        "CPU s | peak RSS MiB | peak PSS MiB | load | other CPU s |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for n in sizes:
    r = results[n]
    print(f"| {n} | {r['seconds']:.1f} | {r['rate']:.0f} | "
          f"{(r['seconds'] - fixed) / n * 1e6:.1f} | {r['cpu']:.1f} | "
          f"{r['rss']:.0f} | {r['pss']:.0f} | {r['load']:.1f} | "
          f"{r['other_cpu']:.1f} |")
  print(f"\nfit over {len(sizes)} sizes: wall = {fixed:.2f} s + "
        f"{per_image * 1e6:.2f} µs x rows; CPU = {cpu_fixed:.2f} s + "
        f"{cpu_per_image * 1e6:.2f} µs x rows")
  if len(sizes) > 1:
    a, b = sizes[-2], sizes[-1]
    cost = lambda n: (results[n]["seconds"] - fixed) / n  # pylint: disable=unnecessary-lambda-assignment
    print(f"per-image cost at {b} / at {a}: {cost(b) / cost(a):.3f}; peak RSS "
          f"{results[b]['rss'] / results[a]['rss']:.3f}, PSS "
          f"{results[b]['pss'] / results[a]['pss']:.3f}")
  if limit:
    print(f"physical limit from {limit['images']} images on one thread: "
          f"decode {limit['decode_us']:.1f} µs + model {limit['model_us']:.1f}"
          f" µs = {limit['rate']:.0f} images/s on {os.cpu_count()} cores; "
          + "; ".join(f"P at {n} / limit {results[n]['rate'] / limit['rate']:.2f}"
                      for n in sizes))


if __name__ == "__main__":
  sys.exit(main())
