"""The throughput benchmark's workloads and models, built once under --work.

  W1  Fashion-MNIST PNGs replicated to --w1_images, in Parquet shards
  W2  Fashion-MNIST PNGs replicated to --w2_images, one file per image
  W3  the flower JPEGs replicated to about --w3_images, one file per image
  W4  the flower photos enlarged to 500x375 and saved as JPEG quality 90
      (--w4_images of them; past 3,433 each copy enlarges a different crop),
      served by a keras.applications MobileNetV2 (alpha 1.0, 224x224,
      untrained convolutions) adopted with model.adopt, on TFLite
  W5  W4's photos through EfficientNet-Lite0 (ImageNet weights) as its
      PyTorch author exports it to ONNX (benchmarks/pytorch), adopted with
      model.adopt and the author's torchvision recipe, on ONNX Runtime

`python -m benchmarks.workloads --make_mobilenet PATH` makes W4's model in a
process of its own (it imports Keras); benchmarks.throughput calls it.
"""

import argparse
import glob
import io
import os
import subprocess
import sys
from typing import Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/data beside the checkout; --shared_data points elsewhere (a
# worktree's parent has none).
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
BATCH = 256
ROWS_PER_SHARD = 10_000


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


def w4_crop(size: tuple, copy: int, index: int) -> Optional[tuple]:
  """The box of a photo that copy `copy` enlarges: none for the first copy
  (the whole photo), then a seeded crop of 70-95% of each side, anywhere in
  the photo, so every copy decodes to different pixels."""
  if copy == 0:
    return None
  rng = np.random.default_rng((copy, index))
  width, height = size
  scale = rng.uniform(0.70, 0.95)
  box_w, box_h = max(1, round(width * scale)), max(1, round(height * scale))
  left = int(rng.integers(0, width - box_w + 1))
  top = int(rng.integers(0, height - box_h + 1))
  return left, top, left + box_w, top + box_h


def build_w4(folder, count):
  """`count` photos at 500x375, JPEG quality 90, in the flowers' class
  folders: the flowers enlarged (bicubic), as benchmarks.decoders makes them;
  beyond the 3,433 photos each further copy enlarges a different crop
  (`w4_crop`), so no two files are alike."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from benchmarks import decoders  # pylint: disable=import-outside-toplevel
  files = _flower_files()
  for start in range(0, count, 256):
    chunk = range(start, min(count, start + 256))
    payloads = []
    for number in chunk:
      copy, index = divmod(number, len(files))
      with open(files[index], "rb") as handle:
        data = handle.read()
      if copy:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        image = image.crop(w4_crop(image.size, copy, index))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
      payloads.append(data)
    for number, data in zip(chunk, decoders.enlarged(payloads)):
      copy, index = divmod(number, len(files))
      path = files[index]
      name = os.path.basename(os.path.dirname(path))
      os.makedirs(os.path.join(folder, name), exist_ok=True)
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
    subprocess.run([sys.executable, "-m", "benchmarks.workloads",
                    "--shared_data", SHARED, "--make_mobilenet", source],
                   check=True, cwd=REPO)
  classes = sorted(os.path.basename(os.path.dirname(p))
                   for p in glob.glob(os.path.join(SHARED, "flowers", "*", "")))
  subprocess.run([sys.executable, "-m", "model.adopt", source, "--output", path,
                  "--class_names", ",".join(classes), "--input_scale",
                  "symmetric", "--decoder", decoder], check=True, cwd=REPO)
  return path


def ensure_w5_model(path, onnx_file):
  """EfficientNet-Lite0 as its PyTorch author exports it (benchmarks/pytorch:
  ImageNet weights, a dynamic batch), adopted with `python -m model.adopt`
  and the author's evaluation recipe: Resize(256, bicubic), CenterCrop(224),
  Normalize(0.5, 0.5); served by ONNX Runtime."""
  if os.path.exists(os.path.join(path, "model_card.json")):
    return path
  classes = os.path.join(os.path.dirname(onnx_file), "imagenet_classes.txt")
  subprocess.run([sys.executable, "-m", "model.adopt", onnx_file, "--output",
                  path, "--class_names", classes, "--input_scale", "symmetric",
                  "--resize", "256", "--center_crop", "224", "--interpolation",
                  "bicubic"], check=True, cwd=REPO)
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
  # W5 is W4's photos through another model.
  builders["W5"] = builders["W4"]
  for name in args.workloads:
    stem = "W4" if name == "W5" else name
    folder = os.path.join(work, f"{stem}-{builders[name][1]}")
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
    elif name == "W5":
      model = ensure_w5_model(args.w5_model or os.path.join(
          work, "efficientnet_lite0-onnx"), args.w5_onnx)
    else:
      model = fashion
    workloads[name] = (folder, model)
  return workloads


def main(argv=None):
  global SHARED  # pylint: disable=global-statement
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shared_data", default=SHARED)
  parser.add_argument("--make_mobilenet", required=True)
  args = parser.parse_args(argv)
  SHARED = args.shared_data
  make_mobilenet(args.make_mobilenet)
  return 0


if __name__ == "__main__":
  sys.exit(main())
