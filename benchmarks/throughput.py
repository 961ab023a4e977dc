"""Throughput of the pipeline against the loops and flows a user would write.

Usage:
  python -m benchmarks.throughput [--workloads W1,W2,W3,W4] [--repeats 3]
      [--systems B0,B1,B2,P,Ray,Spark] [--work /tmp/bench]
      [--fashion_model DIR] [--flowers_model DIR] [--w4_model DIR]
      [--physical_limit 2000] [--wait_quiet 600]
  python -m benchmarks.throughput --scaling 10000,100000,1000000 [...]

Workloads, built once under --work from ../shared/data:
  W1  Fashion-MNIST PNGs replicated to --w1_images, in Parquet shards
  W2  Fashion-MNIST PNGs replicated to --w2_images, one file per image
  W3  the flower JPEGs replicated to about --w3_images, one file per image
  W4  the flower photos enlarged to 500x375 and saved as JPEG quality 90
      (--w4_images of them), served by a keras.applications MobileNetV2
      (alpha 1.0, 224x224, untrained weights) adopted with model.adopt
Systems, each in a child process of its own, measured as a process tree
(benchmarks/process_tree.py: wall, CPU seconds, peak RSS and PSS):
  B0  a plain loop: read, PIL decode, batches of 256, compiled Keras call,
      pyarrow writing the same output columns
  B1  stock Beam: per-element decode Map, RunInference with a minimal handler
      calling model(x) at Beam's default batching, WriteToParquet; the
      handler returns results as Beam's TFModelHandlerNumpy does
  B1-numpy  B1 with the output copied to numpy once per batch (not stock;
      run it with --systems to see what Beam's TF handler leaves on the table)
  B2  a per-element DoFn calling model.predict (on --b2_images images)
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
import io
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks import process_tree
from benchmarks import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/data beside the checkout; --shared_data points elsewhere (a
# worktree's parent has none).
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
BATCH = 256
ROWS_PER_SHARD = 10_000
PEERS_DIR = os.path.join(REPO, "benchmarks", "peers")
PEER_JOBS = {"Ray": "ray_job.py", "Spark": "spark_job.py"}
# Baselines run once per workload: they are slow and their ratios large.
RUN_ONCE = ("B1", "B1-numpy", "B2")


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


def _flower_files():
  files = sorted(glob.glob(os.path.join(SHARED, "flowers", "*", "*.jpg")))
  if not files:
    raise SystemExit(f"no flower JPEGs under {SHARED}/flowers")
  return files


def build_w4(folder, count):
  """`count` photos at 500x375, JPEG quality 90, in the flowers' class
  folders: the flowers enlarged (bicubic), as benchmarks.decoders makes them."""
  from benchmarks import decoders  # pylint: disable=import-outside-toplevel
  files = _flower_files()
  for start in range(0, count, 256):
    chunk = [files[i % len(files)] for i in range(start, min(count, start + 256))]
    payloads = []
    for path in chunk:
      with open(path, "rb") as handle:
        payloads.append(handle.read())
    for index, (path, data) in enumerate(zip(chunk, decoders.enlarged(
        payloads))):
      name = os.path.basename(os.path.dirname(path))
      os.makedirs(os.path.join(folder, name), exist_ok=True)
      copy = (start + index) // len(files)
      with open(os.path.join(folder, name,
                             f"{copy}_{os.path.basename(path)}"), "wb") as out:
        out.write(data)


def make_mobilenet(path, images=1024):
  """A keras.applications MobileNetV2 (alpha 1.0, 224x224, 5 classes) with
  seeded random weights, so it runs offline at the real network's speed.

  As initialised, its batch statistics are wrong for any input and every
  photo gets the same saturated answer, which would make agreement checks
  vacuous. So its BatchNormalization statistics are measured on W4's photos
  (forward passes in training mode) and its classifier is fitted to the
  flower classes on the pooled features: its answers then depend on the
  photo, as a trained model's do. The convolutions keep their random weights.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from benchmarks import decoders  # pylint: disable=import-outside-toplevel
  from model import preprocessing  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(0)
  model = keras.applications.MobileNetV2(
      input_shape=(224, 224, 3), alpha=1.0, weights=None, classes=5)
  files = _flower_files()
  files = files[::max(1, len(files) // images)][:images]
  classes = sorted({os.path.basename(os.path.dirname(p)) for p in files})
  labels = np.asarray([classes.index(os.path.basename(os.path.dirname(p)))
                       for p in files])
  payloads = []
  for file in files:
    with open(file, "rb") as handle:
      payloads.append(handle.read())
  decoder = preprocessing.BatchDecoder("tensorflow", 224, 224, "rgb")
  x = np.concatenate([
      preprocessing.scale_pixels(decoder.decode(decoders.enlarged(
          payloads[i:i + 64]))[0], "symmetric")
      for i in range(0, len(payloads), 64)])
  # One forward pass in training mode with momentum 0 sets every layer's
  # moving statistics to those of 128 photos.
  norms = [layer for layer in model.layers
           if isinstance(layer, keras.layers.BatchNormalization)]
  for layer in norms:
    layer.momentum = 0.0
  model(x[:128], training=True)
  for layer in norms:
    layer.momentum = 0.999
  pooled = keras.Model(model.input, model.layers[-2].output)
  features = pooled.predict(x, batch_size=64, verbose=0)
  head = keras.Sequential([keras.Input(features.shape[1:]),
                           keras.layers.Dense(5, activation="softmax")])
  head.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
  head.fit(features, labels, epochs=30, batch_size=64, verbose=0)
  model.layers[-1].set_weights(head.layers[-1].get_weights())
  model.save(path)


def ensure_w4_model(path, decoder):
  """The MobileNetV2 as a user brings one: saved by Keras, then adopted with
  `python -m model.adopt` (its preprocess_input is the symmetric scale)."""
  if os.path.exists(os.path.join(path, "model_card.json")):
    return path
  source = path.rstrip("/") + ".keras"
  if not os.path.exists(source):
    subprocess.run([sys.executable, "-m", "benchmarks.throughput",
                    "--shared_data", SHARED, "--make_mobilenet", source],
                   check=True, cwd=REPO)
  classes = sorted(os.path.basename(os.path.dirname(p))
                   for p in glob.glob(os.path.join(SHARED, "flowers", "*", "")))
  subprocess.run([sys.executable, "-m", "model.adopt", source, "--output", path,
                  "--class_names", ",".join(classes), "--input_scale",
                  "symmetric", "--decoder", decoder], check=True, cwd=REPO)
  return path


def ensure_model(path, data, architecture, extra=()):
  if os.path.exists(os.path.join(path, "model_card.json")):
    return path
  subprocess.run([sys.executable, "-m", "model.train", "--data", data,
                  "--architecture", architecture, "--output", path, "--quiet",
                  *extra], check=True, cwd=REPO)
  return path


def prepare(args):
  """Builds what is missing; returns {workload: (input, model, subset_input)}."""
  global SHARED  # pylint: disable=global-statement
  SHARED = args.shared_data
  work = args.work
  fashion = None
  if {"W1", "W2"} & set(args.workloads):
    fashion = ensure_model(args.fashion_model or os.path.join(work, "mlp"),
                           os.path.join(SHARED, "fashion-mnist"),
                           "tutorial_mlp")
  workloads = {}
  builders = {"W1": (build_w1, args.w1_images), "W2": (build_w2, args.w2_images),
              "W3": (build_w3, args.w3_images), "W4": (build_w4, args.w4_images)}
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
    elif name == "W4":
      model = ensure_w4_model(
          args.w4_model or os.path.join(work, f"mobilenet_v2-{args.w4_decoder}"),
          args.w4_decoder)
    else:
      model = fashion
    workloads[name] = (folder, model)
  return workloads


# Systems (run in a child process) ----------------------------------------


def _plain_decode(data, card):
  """What a user's loop does: Pillow for this project's models, Keras'
  image_dataset_from_directory recipe for models that name it."""
  if card.decoder == "tensorflow":
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    image = tf.io.decode_image(data, channels=card.channels,
                               expand_animations=False)
    return tf.image.resize(image, (card.height, card.width)).numpy()
  from PIL import Image  # pylint: disable=import-outside-toplevel
  image = Image.open(io.BytesIO(data))
  image = image.convert("L" if card.color_mode == "grayscale" else "RGB")
  if image.size != (card.width, card.height):
    image = image.resize((card.width, card.height), Image.Resampling.BILINEAR)
  return np.asarray(image).reshape(card.input_shape)


def _model_input(pixels, card):
  """A batch as the model was trained on it (keras.applications' scaling)."""
  from model import preprocessing  # pylint: disable=import-outside-toplevel
  return preprocessing.scale_pixels(np.stack(pixels), card.input_scale,
                                    card.input_mean, card.input_std)


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
  kind, items = stages.list_inputs(folder)

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
    x = _model_input([_plain_decode(d, card) for d in data], card)
    raw = call(x).numpy()
    probabilities = engines.softmax(raw) if card.output == "logits" else raw
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
  kind, items = stages.list_inputs(folder)
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
      logits = model(_model_input(batch, card))
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
          x, self.model.predict(_model_input([x], card), verbose=0)[0])

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
  if args.make_mobilenet:
    global SHARED  # pylint: disable=global-statement
    SHARED = args.shared_data
    return make_mobilenet(args.make_mobilenet)
  system, folder, model_dir, output = args.child
  limit = args.limit or None
  if system == "B0":
    images, seconds = run_b0(folder, model_dir, output, limit)
  else:
    images, seconds = run_beam_baseline(system, folder, model_dir, output, limit)
  print(json.dumps({"images": images, "seconds": seconds}))
  return None


# The parent: timing, memory, comparison ------------------------------------


def measure(command):
  """Runs a command as a measured process tree; (figures, stdout)."""
  figures, stdout = process_tree.measure(command, cwd=REPO,
                                         stderr=subprocess.DEVNULL)
  if figures["returncode"]:
    raise RuntimeError(f"{command} failed with exit {figures['returncode']}")
  return figures, stdout


def _input_flag(folder):
  kind, _ = stages.list_inputs(folder)
  return "--parquet" if kind == "parquet" else "--images"


def run_system(system, folder, model, out_dir, limit=0, p_flags=(),
               peers_python=""):
  """One measured run of a system; its figures and where its output is."""
  os.makedirs(out_dir, exist_ok=True)
  if system.startswith("P"):
    output = os.path.join(out_dir, system)
    pattern = folder if not glob.glob(os.path.join(folder, "*.parquet")) else (
        os.path.join(folder, "*.parquet"))
    figures, _ = measure([
        sys.executable, "-m", "beam_jobs.predict", "--input", pattern,
        "--model", model, "--output", output, "--overwrite", *p_flags])
    with open(os.path.join(output, "_run.json"), encoding="utf-8") as handle:
      manifest = json.load(handle)
    return dict(figures, images=manifest["counts"]["predictions"],
                output=os.path.join(output, "predictions", "*.parquet"))
  if system in PEER_JOBS:
    output = os.path.join(out_dir, system)
    figures, stdout = measure([
        peers_python, os.path.join(PEERS_DIR, PEER_JOBS[system]),
        _input_flag(folder), folder, "--model", model, "--output", output,
        "--batch_size", str(BATCH)])
    result = json.loads(next(line for line in stdout.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    return dict(figures, images=result["predictions"], peer=result,
                output=os.path.join(output, "*.parquet"))
  output = os.path.join(out_dir, f"{system}.parquet")
  figures, stdout = measure([
      sys.executable, "-m", "benchmarks.throughput", "--limit", str(limit),
      "--child", system, folder, model, output])
  result = json.loads(stdout.strip().splitlines()[-1])
  return dict(figures, images=result["images"], loop_s=result["seconds"],
              output=output)


def _labels(pattern):
  """{id: label} over Parquet files; Spark's file URIs become plain paths."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  labels = {}
  for path in sorted(glob.glob(pattern)):
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
           "multi_processing", "--inference_threads", "1", "--engine",
           "tflite")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workloads", default="W1,W2,W3")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--work", default="/tmp/bench")
  parser.add_argument("--shared_data", default=SHARED,
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
  parser.add_argument("--w4_decoder", default="tensorflow",
                      choices=("tensorflow", "pillow"),
                      help="the decoder W4's MobileNetV2 is adopted with")
  parser.add_argument("--systems", default="B0,B1,B2,P")
  parser.add_argument("--peers_python", default=os.path.join(
      PEERS_DIR, ".venv", "bin", "python"),
                      help="the peers' interpreter (benchmarks/peers/setup.sh)")
  parser.add_argument("--physical_limit", type=int, default=0,
                      help="images per workload to time decoder and model "
                      "on (0: skip)")
  parser.add_argument("--wait_quiet", type=float, default=0,
                      help="before each run, wait up to this many seconds "
                      "for fewer than 0.3 cores busy (0: don't wait)")
  parser.add_argument("--scaling", default="",
                      help="comma-separated W1 sizes: run P on each instead")
  parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
  parser.add_argument("--make_mobilenet", help=argparse.SUPPRESS)
  parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


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
            f"{last['wall_s']:.1f} s, {last['cpu_s']:.1f} CPU s, load "
            f"{last['load1_before']:.1f}", file=sys.stderr)
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
  if args.child or args.make_mobilenet:
    return child(args)
  if args.scaling:
    return scaling(args)
  args.workloads = args.workloads.split(",")
  systems = args.systems.split(",")
  _check_peers(args, systems)
  workloads = prepare(args)
  rows = []
  for name, (folder, model) in workloads.items():
    out = os.path.join(args.work, "out", name)
    print(f"{name}: {', '.join(systems)} in turns, {args.repeats} rounds",
          file=sys.stderr)
    runs = run_turns(systems, args.repeats, lambda system: run_system(
        system, folder, model, out, args.b2_images if system == "B2" else 0,
        P_FLAGS, args.peers_python), args.wait_quiet)
    results = {system: summarise(r) for system, r in runs.items()}
    if name == "W1" and "P" in results:
      tenth = os.path.join(args.work, "W1-tenth")
      if not os.path.exists(tenth):
        os.makedirs(tenth)
        shards = sorted(glob.glob(os.path.join(folder, "*.parquet")))
        for shard in shards[:max(1, len(shards) // 10)]:
          os.link(shard, os.path.join(tenth, os.path.basename(shard)))
      small = run_system("P-tenth", tenth, model, out, 0, P_FLAGS)
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
  if any(n % ROWS_PER_SHARD for n in sizes):
    raise SystemExit(f"--scaling sizes must be multiples of {ROWS_PER_SHARD}")
  args.workloads, args.w1_images = ["W1"], sizes[-1]
  full, model = prepare(args)["W1"]
  shards = sorted(glob.glob(os.path.join(full, "*.parquet")))
  folders = {}
  for n in sizes:
    folders[n] = os.path.join(args.work, f"W1-first-{n}")
    if not os.path.exists(folders[n]):
      os.makedirs(folders[n])
      for shard in shards[:n // ROWS_PER_SHARD]:
        os.link(shard, os.path.join(folders[n], os.path.basename(shard)))
  out = os.path.join(args.work, "out", "scaling")
  runs = run_turns([str(n) for n in sizes], args.repeats, lambda n: run_system(
      "P", folders[int(n)], model, os.path.join(out, n), 0, P_FLAGS),
                   args.wait_quiet)
  results = {int(n): summarise(r) for n, r in runs.items()}
  fixed, per_image = _fit(sizes, [results[n]["seconds"] for n in sizes])
  cpu_fixed, cpu_per_image = _fit(sizes, [results[n]["cpu"] for n in sizes])
  limit = (physical_limit(folders[sizes[0]], model, args.physical_limit)
           if args.physical_limit else None)
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
  return 0


if __name__ == "__main__":
  sys.exit(main())
