"""Scale-out figures: a million files, a million-row shard, a million ids.

Usage:
  python -m benchmarks.scale --work /work/bench/scale \
      [--baseline /tmp/scale_baseline] [--files 1000000] [--rows 1000000] \
      [--new 10000] [--cases files,parquet,skip] [--clean]

Three workloads, each run by `python -m beam_jobs.predict` on the
FnApiRunner with two worker processes (`--direct_num_workers 2
--direct_running_mode multi_processing`), once with this checkout's code and
once with `--baseline`'s (a git worktree of an older commit, run with the
same interpreter and PYTHONPATH pointing at it):

  files    --files tiny PNGs (8x8): half in 10 class folders, half in one
           flat folder
  parquet  one shard of --rows rows (encoded 8x8 PNGs) in row groups of
           10,000
  skip     --skip_existing over an output holding the files run's --files
           predictions, with --new more files added to the folder

Every process of a run is sampled every 0.1 s from /proc: its peak RSS
(VmHWM) and its CPU seconds. "first prediction" is when the first staged
predictions file appears in the output (the Parquet sink opens it with the
first batch it writes). The launcher is also the FnApiRunner: it holds
whatever crosses a shuffle (groups of paths, ids by bucket), which on
Dataflow the shuffle service holds. The 1-minute load average before each
run says how busy the shared machine was. Prints a Markdown table.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER_FLAGS = ["--runner", "FnApiRunner", "--direct_num_workers", "2",
                "--direct_running_mode", "multi_processing"]
ROW_GROUP = 10_000
CLASSES = 10
DISTINCT_IMAGES = 16
TICKS = os.sysconf("SC_CLK_TCK")


# Workloads --------------------------------------------------------------------


def tiny_pngs() -> list:
  from model import preprocessing  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  return [preprocessing.encode_png(rng.integers(0, 255, (8, 8, 1),
                                                dtype=np.uint8))
          for _ in range(DISTINCT_IMAGES)]


def make_model(work: str) -> str:
  model = os.path.join(work, "model")
  if not os.path.exists(os.path.join(model, "model_card.json")):
    from model import datasets, train  # pylint: disable=import-outside-toplevel
    sample = datasets.load_fashion_mnist(
        os.path.join(REPO, "sample_data", "fashion-mnist"))
    train.train(sample, "tutorial_mlp", model, epochs=1, seed=1, verbose=0)
  return model


def write_files(folder: str, names, pngs: list) -> int:
  os.makedirs(folder, exist_ok=True)
  count = 0
  for i, name in enumerate(names):
    with open(os.path.join(folder, name), "wb") as handle:
      handle.write(pngs[i % len(pngs)])
    count += 1
  return count


def make_files(root: str, files: int) -> None:
  """Half the files in class folders, half in one flat folder."""
  # Beside the folder: inside it, the marker would be an input too.
  marker = f"{root.rstrip('/')}.complete-{files}"
  if os.path.exists(marker):
    return
  shutil.rmtree(root, ignore_errors=True)
  pngs = tiny_pngs()
  per_class = files // 2 // CLASSES
  for c in range(CLASSES):
    write_files(os.path.join(root, f"class{c}"),
                (f"{i:07d}.png" for i in range(per_class)), pngs)
  flat = files - per_class * CLASSES
  write_files(os.path.join(root, "flat"),
              (f"{i:07d}.png" for i in range(flat)), pngs)
  with open(marker, "w"):
    pass


def make_shard(path: str, rows: int) -> None:
  if os.path.exists(path) and _shard_rows(path) == rows:
    return
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  pngs = tiny_pngs()
  schema = pa.schema([("id", pa.string()), ("image", pa.binary()),
                      ("label", pa.string())])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with pq.ParquetWriter(path + ".tmp", schema) as writer:
    for start in range(0, rows, ROW_GROUP):
      stop = min(rows, start + ROW_GROUP)
      writer.write_table(pa.table({
          "id": [f"row{i:07d}" for i in range(start, stop)],
          "image": [pngs[i % len(pngs)] for i in range(start, stop)],
          "label": [f"class{i % CLASSES}" for i in range(start, stop)],
      }, schema=schema), row_group_size=ROW_GROUP)
  os.replace(path + ".tmp", path)


def _shard_rows(path: str) -> int:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  return pq.ParquetFile(path).metadata.num_rows


def shard_items(path: str) -> int:
  """How many work items this checkout's planner makes of a shard."""
  from beam_jobs.sources import row_groups  # pylint: disable=import-outside-toplevel
  return len(list(row_groups.plan_items(path, row_groups.footer_rows(path))))


# One monitored run ------------------------------------------------------------


def _children() -> dict:
  """{parent pid: [child pids]} over every process."""
  tree = {}
  for stat in glob.glob("/proc/[0-9]*/stat"):
    try:
      with open(stat) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    tree.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
  return tree


def _sample(pid: int):
  """(peak RSS in MiB, CPU seconds, command line) of a live process."""
  try:
    with open(f"/proc/{pid}/status") as handle:
      peak = next(int(line.split()[1]) for line in handle
                  if line.startswith("VmHWM:"))
    with open(f"/proc/{pid}/stat") as handle:
      fields = handle.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
      command = handle.read().replace(b"\0", b" ").decode(errors="replace")
  except (OSError, StopIteration):
    return None
  return peak / 1024, (int(fields[11]) + int(fields[12])) / TICKS, command


def _role(pid: int, root: int, command: str) -> str:
  if pid == root:
    return "launcher+runner"
  # The runner starts each worker through a shell; the shell is not one.
  python = command.split(" ", 1)[0].endswith(("python", "python3"))
  return "worker" if python and "worker" in command else "other"


def monitored_run(code: str, arguments: list, output: str) -> dict:
  """Runs predict from checkout `code`; samples its process tree."""
  env = dict(os.environ, PYTHONPATH=code, TF_CPP_MIN_LOG_LEVEL="2")
  load = os.getloadavg()[0]
  started = time.monotonic()
  process = subprocess.Popen(
      [sys.executable, "-m", "beam_jobs.predict"] + arguments + RUNNER_FLAGS,
      cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  seen, first = {}, None
  staged = os.path.join(output, "predictions", "beam-temp-predictions-*", "*")
  while process.poll() is None:
    tree = _children()
    pending, family = [process.pid], []
    while pending:
      pid = pending.pop()
      family.append(pid)
      pending.extend(tree.get(pid, []))
    for pid in family:
      sample = _sample(pid)
      if sample:
        peak, cpu, command = sample
        entry = seen.setdefault(pid, {"peak": 0.0, "cpu": 0.0,
                                      "role": _role(pid, process.pid,
                                                    command)})
        entry["peak"] = max(entry["peak"], peak)
        entry["cpu"] = max(entry["cpu"], cpu)
    if first is None and glob.glob(staged):
      first = time.monotonic() - started
    time.sleep(0.1)
  wall = time.monotonic() - started
  stdout, stderr = process.communicate()
  if process.returncode:
    raise RuntimeError(f"predict exited {process.returncode}:\n"
                       f"{stderr[-3000:]}")
  with open(os.path.join(output, "_run.json")) as handle:
    manifest = json.load(handle)
  workers = sorted((e for e in seen.values() if e["role"] == "worker"),
                   key=lambda e: -e["cpu"])
  launcher = [e for e in seen.values() if e["role"] == "launcher+runner"][0]
  return {"load": load, "wall": wall, "first": first,
          "counts": manifest["counts"], "launcher": launcher,
          "workers": workers, "summary": stdout.strip().splitlines()[:1]}


# The cases --------------------------------------------------------------------


def _codes(args) -> list:
  codes = [("this", REPO)]
  if args.baseline:
    codes.insert(0, ("baseline", args.baseline))
  return codes


def _each(workers: list, key: str, spec: str) -> str:
  return " / ".join(format(worker[key], spec) for worker in workers)


def _row(case: str, label: str, result: dict, note: str = "") -> str:
  workers = result["workers"]
  first = f"{result['first']:.1f}" if result["first"] is not None else "-"
  counts = result["counts"]
  return (f"| {case} | {label} | {result['load']:.1f} | {result['wall']:.1f} "
          f"| {first} | {result['launcher']['cpu']:.1f} | "
          f"{_each(workers, 'cpu', '.1f')} | "
          f"{result['launcher']['peak']:.0f} | "
          f"{_each(workers, 'peak', '.0f')} | "
          f"{counts['inputs']} | {counts['predictions']} | "
          f"{counts['skipped']} | {note} |")


HEADER = ("| case | code | load | wall s | first prediction s | launcher CPU s "
          "| worker CPU s | launcher peak RSS MiB | worker peak RSS MiB "
          "| inputs | predictions | skipped | notes |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
          "| --- | --- |")


def run_files(args, model, rows):
  folder = os.path.join(args.work, "files")
  make_files(folder, args.files)
  for label, code in _codes(args):
    output = os.path.join(args.work, f"out-files-{label}")
    shutil.rmtree(output, ignore_errors=True)
    result = monitored_run(code, ["--input", folder, "--model", model,
                                  "--output", output], output)
    rows.append(_row(f"files ({args.files:,})", label, result))
    print(rows[-1], flush=True)


def run_parquet(args, model, rows):
  shard = os.path.join(args.work, "shard", "big.parquet")
  make_shard(shard, args.rows)
  items = shard_items(shard)
  for label, code in _codes(args):
    output = os.path.join(args.work, f"out-parquet-{label}")
    shutil.rmtree(output, ignore_errors=True)
    result = monitored_run(code, ["--input", shard, "--model", model,
                                  "--output", output, "--label_column",
                                  "label"], output)
    note = f"{items} work items" if label == "this" else "1 work item"
    rows.append(_row(f"parquet ({args.rows:,} rows)", label, result, note))
    print(rows[-1], flush=True)


def run_skip(args, model, rows):
  folder = os.path.join(args.work, "files")
  earlier = os.path.join(args.work, "out-files-this")
  if not os.path.exists(os.path.join(earlier, "_run.json")):
    raise SystemExit("the skip case needs the files case's output; run "
                     "--cases files,skip")
  new = os.path.join(folder, "new")
  write_files(new, (f"{i:07d}.png" for i in range(args.new)), tiny_pngs())
  try:
    for label, code in _codes(args):
      output = os.path.join(args.work, f"out-skip-{label}")
      shutil.rmtree(output, ignore_errors=True)
      shutil.copytree(earlier, output)
      result = monitored_run(code, ["--input", folder, "--model", model,
                                    "--output", output, "--skip_existing"],
                             output)
      rows.append(_row(f"skip ({args.files:,} earlier + {args.new:,} new)",
                       label, result))
      print(rows[-1], flush=True)
  finally:
    shutil.rmtree(new, ignore_errors=True)


CASES = {"files": run_files, "parquet": run_parquet, "skip": run_skip}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--work", required=True,
                      help="scratch folder for the data and outputs")
  parser.add_argument("--baseline", default=None,
                      help="a checkout of the code to compare with")
  parser.add_argument("--files", type=int, default=1_000_000)
  parser.add_argument("--rows", type=int, default=1_000_000)
  parser.add_argument("--new", type=int, default=10_000)
  parser.add_argument("--cases", default="files,parquet,skip")
  parser.add_argument("--clean", action="store_true",
                      help="delete --work when done")
  args = parser.parse_args(argv)
  os.makedirs(args.work, exist_ok=True)
  model = make_model(args.work)
  rows = []
  print(HEADER, flush=True)
  try:
    for case in args.cases.split(","):
      CASES[case](args, model, rows)
  finally:
    if args.clean:
      shutil.rmtree(args.work, ignore_errors=True)
  print()
  print(HEADER)
  print("\n".join(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
