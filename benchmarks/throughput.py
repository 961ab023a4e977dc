"""Throughput of the pipeline against the loops and flows a user would write.

Usage:
  python -m benchmarks.throughput [--workloads W1,W2,W3] [--repeats 3]
      [--work /tmp/bench] [--fashion_model DIR] [--flowers_model DIR]

Workloads, built once under --work from ../shared/data:
  W1  Fashion-MNIST PNGs replicated to --w1_images, in Parquet shards
  W2  Fashion-MNIST PNGs replicated to --w2_images, one file per image
  W3  the flower JPEGs replicated to about --w3_images, one file per image
Systems, each in a child process of its own (peak RSS is the process tree's):
  B0  a plain loop: read, PIL decode, batches of 256, compiled Keras call,
      pyarrow writing the same output columns
  B1  stock Beam: per-element decode Map, RunInference with a minimal handler
      calling model(x) at Beam's default batching, WriteToParquet; the
      handler returns results as Beam's TFModelHandlerNumpy does
  B1-numpy  B1 with the output copied to numpy once per batch (not stock;
      run it with --systems to see what Beam's TF handler leaves on the table)
  B2  a per-element DoFn calling model.predict (on --b2_images images)
  P   python -m beam_jobs.predict as a user runs it (start-up counts)
Every system is timed as a whole process, start-up included, the way a user
runs it; the baselines also report their loop alone ("loop s"), and P/B0 is
given against both. Times are medians over --repeats runs (B1 and B2 run
once: they are slow and their ratios are large). Each ratio compares figures
from the same run.
"""

import argparse
import glob
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
BATCH = 256
ROWS_PER_SHARD = 10_000


# Workloads ---------------------------------------------------------------


def _fashion_pngs():
  from model import datasets, preprocessing  # pylint: disable=import-outside-toplevel
  data = datasets.load_fashion_mnist(os.path.join(SHARED, "fashion-mnist"))
  images = np.concatenate([data.train.images, data.test.images])
  labels = np.concatenate([data.train.labels, data.test.labels])
  return ([preprocessing.encode_png(x) for x in images],
          [data.class_names[i] for i in labels], data.class_names)


def build_w1(folder, count):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from tools import make_shards  # pylint: disable=import-outside-toplevel
  pngs, labels, _ = _fashion_pngs()
  os.makedirs(folder)
  shards = -(-count // ROWS_PER_SHARD)
  for shard in range(shards):
    rows = range(shard * ROWS_PER_SHARD, min(count, (shard + 1) * ROWS_PER_SHARD))
    table = pa.Table.from_pydict({
        "id": [f"w1/{i:07d}" for i in rows],
        "image": [pngs[i % len(pngs)] for i in rows],
        "label": [labels[i % len(pngs)] for i in rows],
    }, schema=make_shards.shard_schema(raw_pixels=False))
    pq.write_table(table, os.path.join(
        folder, f"images-{shard:05d}-of-{shards:05d}.parquet"))


def build_w2(folder, count):
  pngs, labels, names = _fashion_pngs()
  for name in names:
    os.makedirs(os.path.join(folder, name))
  for i in range(count):
    with open(os.path.join(folder, labels[i % len(pngs)], f"{i:07d}.png"),
              "wb") as handle:
      handle.write(pngs[i % len(pngs)])


def build_w3(folder, count):
  source = os.path.join(SHARED, "flowers")
  files = sorted(glob.glob(os.path.join(source, "*", "*.jpg")))
  copies = max(1, round(count / len(files)))
  for copy in range(copies):
    for path in files:
      name = os.path.basename(os.path.dirname(path))
      os.makedirs(os.path.join(folder, name), exist_ok=True)
      os.link(path, os.path.join(folder, name, f"{copy}_{os.path.basename(path)}"))


def ensure_model(path, data, architecture, extra=()):
  if os.path.exists(os.path.join(path, "model_card.json")):
    return path
  subprocess.run([sys.executable, "-m", "model.train", "--data", data,
                  "--architecture", architecture, "--output", path, "--quiet",
                  *extra], check=True, cwd=REPO)
  return path


def prepare(args):
  """Builds what is missing; returns {workload: (input, model, subset_input)}."""
  work = args.work
  fashion = ensure_model(args.fashion_model or os.path.join(work, "mlp"),
                         os.path.join(SHARED, "fashion-mnist"), "tutorial_mlp")
  workloads = {}
  builders = {"W1": (build_w1, args.w1_images), "W2": (build_w2, args.w2_images),
              "W3": (build_w3, args.w3_images)}
  for name in args.workloads:
    folder = os.path.join(work, f"{name}-{builders[name][1]}")
    if not os.path.exists(folder):
      print(f"building {name} in {folder}", file=sys.stderr)
      builders[name][0](folder + ".tmp", builders[name][1])
      os.rename(folder + ".tmp", folder)
    if name == "W3":
      model = ensure_model(
          args.flowers_model or os.path.join(work, "flowers"),
          os.path.join(SHARED, "flowers"), "photo_xception",
          ("--epochs", "1"))
    else:
      model = fashion
    workloads[name] = (folder, model)
  return workloads


def list_inputs(folder):
  """(kind, items) where items are shard paths or image paths, sorted."""
  shards = sorted(glob.glob(os.path.join(folder, "*.parquet")))
  if shards:
    return "parquet", shards
  return "files", sorted(glob.glob(os.path.join(folder, "*", "*")))


# Systems (run in a child process) ----------------------------------------


def _plain_decode(data, card):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  image = Image.open(io.BytesIO(data))
  image = image.convert("L" if card.color_mode == "grayscale" else "RGB")
  if image.size != (card.width, card.height):
    image = image.resize((card.width, card.height), Image.Resampling.BILINEAR)
  return np.asarray(image).reshape(card.input_shape)


def run_b0(folder, model_dir, output, limit=None):
  """The best plain single-process loop a Keras user would write."""
  import keras  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from beam_jobs import outputs  # pylint: disable=import-outside-toplevel
  from model import card as card_lib, engines  # pylint: disable=import-outside-toplevel
  card = card_lib.load_card(model_dir)
  model = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
  call = tf.function(lambda x: model(x, training=False))
  kind, items = list_inputs(folder)

  def batches():
    if kind == "parquet":
      for shard in items:
        for batch in pq.ParquetFile(shard).iter_batches(BATCH, columns=[
            "id", "image", "label"]):
          yield (batch.column("id").to_pylist(), batch.column("image").to_pylist(),
                 batch.column("label").to_pylist())
    else:
      for start in range(0, len(items), BATCH):
        paths = items[start:start + BATCH]
        data = []
        for path in paths:
          with open(path, "rb") as handle:
            data.append(handle.read())
        yield paths, data, [os.path.basename(os.path.dirname(p)) for p in paths]

  started = time.perf_counter()
  writer = pq.ParquetWriter(output, outputs.predictions_schema())
  images = 0
  for ids, data, labels in batches():
    x = np.stack([_plain_decode(d, card) for d in data]).astype(np.float32)
    probabilities = engines.softmax(call(x).numpy())
    writer.write_table(outputs.predictions_table(
        ids, ids, labels, probabilities, card.class_names, 3, card.model_id,
        "keras", False))
    images += len(ids)
  writer.close()
  return images, time.perf_counter() - started


def _beam_read(pipeline, folder, card, limit):
  """Stock Beam reading and per-element decoding, as in Beam's examples."""
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from apache_beam.io import fileio  # pylint: disable=import-outside-toplevel
  kind, items = list_inputs(folder)
  if kind == "parquet":
    rows = pipeline | beam.io.ReadFromParquet(os.path.join(folder, "*.parquet"))
    if limit:
      keep = set(pq.read_table(items[0], columns=["id"]).column("id")
                 .to_pylist()[:limit])
      rows = rows | beam.Filter(lambda row: row["id"] in keep)
    return rows | "Decode" >> beam.Map(
        lambda row: (row["id"], _plain_decode(row["image"], card)))
  return (pipeline
          | beam.Create(items[:limit] if limit else items)
          | fileio.ReadMatches()
          | "Decode" >> beam.Map(
              lambda f: (f.metadata.path, _plain_decode(f.read(), card))))


def run_beam_baseline(system, folder, model_dir, output, limit=None):
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  from apache_beam.ml.inference import base  # pylint: disable=import-outside-toplevel
  from model import card as card_lib  # pylint: disable=import-outside-toplevel
  card = card_lib.load_card(model_dir)
  keras_path = os.path.join(model_dir, "model.keras")

  class MinimalHandler(base.ModelHandler):
    def load_model(self):
      import keras  # pylint: disable=import-outside-toplevel,redefined-outer-name
      return keras.saving.load_model(keras_path)

    def run_inference(self, batch, model, inference_args=None):
      # Beam's TFModelHandlerNumpy (default_numpy_inference_fn) does exactly
      # this; it can't be imported without tensorflow_hub. Zipping the batch
      # with the model's eager output tensor slices it row by row.
      logits = model(np.stack(batch).astype(np.float32))
      if system == "B1-numpy":  # a hand-tuned handler: one copy to numpy
        logits = np.asarray(logits)
      return [base.PredictionResult(x, y) for x, y in zip(batch, logits)]

  class PredictEach(beam.DoFn):
    def setup(self):
      import keras  # pylint: disable=import-outside-toplevel,redefined-outer-name
      self.model = keras.saving.load_model(keras_path)

    def process(self, element):
      key, x = element
      yield key, base.PredictionResult(
          x, self.model.predict(x[np.newaxis].astype(np.float32), verbose=0)[0])

  def to_row(element):
    key, result = element
    index = int(np.argmax(result.inference))
    return {"id": key, "label": card.class_names[index], "label_index": index}

  schema = pa.schema([("id", pa.string()), ("label", pa.string()),
                      ("label_index", pa.int64())])
  started = time.perf_counter()
  with beam.Pipeline(argv=["--runner", "DirectRunner"]) as pipeline:
    decoded = _beam_read(pipeline, folder, card, limit)
    if system.startswith("B1"):
      results = decoded | base.RunInference(base.KeyedModelHandler(
          MinimalHandler()))
    else:
      results = decoded | beam.ParDo(PredictEach())
    _ = (results | beam.Map(to_row) | beam.io.WriteToParquet(
        output, schema, num_shards=1, shard_name_template=""))
  seconds = time.perf_counter() - started
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  return pq.read_metadata(output).num_rows, seconds


def child(args):
  system, folder, model_dir, output = args.child
  limit = args.limit or None
  if system == "B0":
    images, seconds = run_b0(folder, model_dir, output, limit)
  else:
    images, seconds = run_beam_baseline(system, folder, model_dir, output, limit)
  print(json.dumps({"images": images, "seconds": seconds}))


# The parent: timing, memory, comparison ------------------------------------


def _tree_rss_bytes(root_pid):
  """Resident memory of a process and all its descendants."""
  children = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as handle:
          parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
      except (OSError, IndexError, ValueError):
        continue
  total, stack = 0, [root_pid]
  while stack:
    pid = stack.pop()
    stack.extend(children.get(pid, []))
    try:
      with open(f"/proc/{pid}/statm") as handle:
        total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError):
      pass
  return total


def measure(command):
  """Runs a command; returns (wall seconds, peak tree RSS in MiB, stdout)."""
  started = time.perf_counter()
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
  peak = [0]

  def poll():
    while process.poll() is None:
      peak[0] = max(peak[0], _tree_rss_bytes(process.pid))
      time.sleep(0.1)

  watcher = threading.Thread(target=poll, daemon=True)
  watcher.start()
  stdout, _ = process.communicate()
  watcher.join()
  if process.returncode:
    raise RuntimeError(f"{command} failed with exit {process.returncode}")
  return time.perf_counter() - started, peak[0] / 2**20, stdout


def run_system(system, folder, model, out_dir, limit=0, p_flags=()):
  os.makedirs(out_dir, exist_ok=True)
  if system.startswith("P"):
    output = os.path.join(out_dir, system)
    pattern = folder if not glob.glob(os.path.join(folder, "*.parquet")) else (
        os.path.join(folder, "*.parquet"))
    seconds, rss, _ = measure([
        sys.executable, "-m", "beam_jobs.predict", "--input", pattern,
        "--model", model, "--output", output, "--overwrite", *p_flags])
    manifest = json.load(open(os.path.join(output, "_run.json")))
    return {"images": manifest["counts"]["predictions"], "seconds": seconds,
            "rss": rss, "output": os.path.join(output, "predictions-*.parquet")}
  output = os.path.join(out_dir, f"{system}.parquet")
  seconds, rss, stdout = measure([
      sys.executable, "-m", "benchmarks.throughput", "--limit", str(limit),
      "--child", system, folder, model, output])
  result = json.loads(stdout.strip().splitlines()[-1])
  return {"images": result["images"], "seconds": seconds,
          "loop_seconds": result["seconds"], "rss": rss, "output": output}


def top1_agreement(reference, other):
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  read = lambda pattern: {  # pylint: disable=unnecessary-lambda-assignment
      r["id"]: r["label"] for path in sorted(glob.glob(pattern))
      for r in pq.read_table(path, columns=["id", "label"]).to_pylist()}
  a, b = read(reference), read(other)
  common = a.keys() & b.keys()
  return sum(a[k] == b[k] for k in common) / max(1, len(a)), len(common)


P_FLAGS = ("--direct_num_workers", "2", "--direct_running_mode",
           "multi_processing", "--inference_threads", "1")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workloads", default="W1,W2,W3")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--work", default="/tmp/bench")
  parser.add_argument("--w1_images", type=int, default=300_000)
  parser.add_argument("--w2_images", type=int, default=60_000)
  parser.add_argument("--w3_images", type=int, default=10_000)
  parser.add_argument("--b2_images", type=int, default=2_000)
  parser.add_argument("--fashion_model", default=None)
  parser.add_argument("--flowers_model", default=None)
  parser.add_argument("--systems", default="B0,B1,B2,P")
  parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
  parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    return child(args)
  args.workloads = args.workloads.split(",")
  systems = args.systems.split(",")
  workloads = prepare(args)
  rows = []
  for name, (folder, model) in workloads.items():
    out = os.path.join(args.work, "out", name)
    results = {}
    for system in systems:
      limit = args.b2_images if system == "B2" else 0
      repeats = args.repeats if system in ("B0", "P") else 1
      runs = [run_system(system, folder, model, out, limit, P_FLAGS)
              for _ in range(repeats)]
      seconds = statistics.median(r["seconds"] for r in runs)
      loop = statistics.median(r.get("loop_seconds", r["seconds"]) for r in runs)
      results[system] = dict(runs[-1], seconds=seconds, loop_seconds=loop,
                             rate=runs[-1]["images"] / seconds,
                             loop_rate=runs[-1]["images"] / loop,
                             rss=max(r["rss"] for r in runs))
      print(f"{name} {system}: {results[system]['images']} images, "
            f"{seconds:.1f}s median of {repeats}", file=sys.stderr)
    if name == "W1" and "P" in results:
      tenth = os.path.join(args.work, "W1-tenth")
      if not os.path.exists(tenth):
        os.makedirs(tenth)
        shards = sorted(glob.glob(os.path.join(folder, "*.parquet")))
        for shard in shards[:max(1, len(shards) // 10)]:
          os.link(shard, os.path.join(tenth, os.path.basename(shard)))
      small = run_system("P-tenth", tenth, model, out, 0, P_FLAGS)
      results["P"]["rss_tenth"] = small["rss"]
    rows.append((name, results))
  print_table(rows)


def print_table(rows):
  print("| workload | system | images | seconds | images/s | loop s | "
        "loop images/s | P/system | P/system loop | peak RSS MiB |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for name, results in rows:
    p = results.get("P")
    for system, r in results.items():
      whole = f"{p['rate'] / r['rate']:.2f}" if p and system != "P" else ""
      loop = f"{p['rate'] / r['loop_rate']:.2f}" if p and system != "P" else ""
      loop_seconds = f"{r['loop_seconds']:.1f}" if system != "P" else ""
      loop_rate = f"{r['loop_rate']:.0f}" if system != "P" else ""
      print(f"| {name} | {system} | {r['images']} | {r['seconds']:.1f} | "
            f"{r['rate']:.0f} | {loop_seconds} | {loop_rate} | {whole} | "
            f"{loop} | {r['rss']:.0f} |")
  for name, results in rows:
    p, b0 = results.get("P"), results.get("B0")
    if p and b0:
      agreement, common = top1_agreement(b0["output"], p["output"])
      print(f"\n{name}: P's top-1 matches B0's on {agreement:.4%} of images "
            f"({common} compared)")
    if p and "rss_tenth" in p:
      print(f"{name}: peak RSS of P {p['rss']:.0f} MiB on all, "
            f"{p['rss_tenth']:.0f} MiB on a tenth: ratio "
            f"{p['rss'] / p['rss_tenth']:.2f}")


if __name__ == "__main__":
  main()
