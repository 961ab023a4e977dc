"""Adopted models against their authors' own predictions, on real data.

Usage:
  python -m benchmarks.adopt_parity [--data ../shared/data] [--work DIR]
      [--flowers_epochs 2]

Makes models the way two TensorFlow tutorials' readers do, then serves them
with model.adopt and beam_jobs.predict and compares top-1 labels:

* fashion: the basic-classification tutorial's MLP, trained on the 6,000
  training images divided by 255 outside the model, saved as my.keras, and
  its full-integer (int8) TFLite conversion. The author's predictions are
  model.predict(test_images / 255.0) and, for int8, the TFLite guide's
  interpreter loop; served from the 1,000 test images written as PNG files.
* flowers: the image-classification tutorial's CNN (Rescaling inside, 180x180,
  logits), trained on image_dataset_from_directory's seeded 80% split and
  converted to model.tflite. The author's predictions are the interpreter's
  on the validation split as image_dataset_from_directory yields it; served
  from the validation photos' own files.

Prints one table row per model: images compared, top-1 agreement with the
author, accuracy as served, and the largest confidence difference.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks import tutorials

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve(model_file, class_names, flags, images, work, name):
  """model.adopt then beam_jobs.predict, as a user runs them."""
  model_dir = os.path.join(work, name + "_model")
  out = os.path.join(work, name + "_out")
  subprocess.run([sys.executable, "-m", "model.adopt", model_file, "--output",
                  model_dir, "--class_names", ",".join(class_names)] + flags,
                 check=True, cwd=REPO)
  subprocess.run([sys.executable, "-m", "beam_jobs.predict", "--input", images,
                  "--model", model_dir, "--output", out, "--overwrite"],
                 check=True, cwd=REPO)
  import glob  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  rows = {}
  for path in glob.glob(os.path.join(out, "predictions", "*.parquet")):
    rows.update((row["id"], row) for row in pq.read_table(path).to_pylist())
  return rows


def _row(name, rows, ids, class_names, logits, true_labels):
  from model import engines  # pylint: disable=import-outside-toplevel
  probabilities = engines.softmax(logits.astype(np.float64))
  expected = [class_names[k] for k in probabilities.argmax(1)]
  served = [rows[i]["label"] for i in ids]
  agreement = np.mean([a == b for a, b in zip(served, expected)])
  accuracy = np.mean([a == class_names[t] for a, t in zip(served,
                                                          true_labels)])
  confidence = np.abs(np.array([rows[i]["confidence"] for i in ids]) -
                      probabilities.max(1)).max()
  print(f"| {name} | {len(ids)} | {agreement:.4f} | {accuracy:.3f} | "
        f"{confidence:.2g} |", flush=True)


def fashion(data, work):
  from model import datasets  # pylint: disable=import-outside-toplevel
  dataset = datasets.load_fashion_mnist(os.path.join(data, "fashion-mnist"))
  train_images, train_labels = dataset.train.images[..., 0], dataset.train.labels
  test_images, test_labels = dataset.test.images[..., 0], dataset.test.labels
  model = tutorials.fashion_mlp(train_images, train_labels, epochs=10)
  model.save(os.path.join(work, "my.keras"))
  logits = model.predict(test_images / 255.0, verbose=0)
  int8_path = os.path.join(work, "fashion_int8.tflite")
  with open(int8_path, "wb") as handle:
    handle.write(tutorials.int8_tflite(model, train_images[:200]))
  int8_logits = tutorials.interpreter_logits(
      int8_path, (test_images / 255.0).astype(np.float32))

  images = os.path.join(work, "fashion_png")
  datasets.write_png_folder(dataset.test, dataset.class_names, images)
  ids = [os.path.join(images, dataset.class_names[label], f"{i:06d}.png")
         for i, label in enumerate(test_labels)]
  names = dataset.class_names
  rows = _serve(os.path.join(work, "my.keras"), names,
                ["--input_scale", "unit"], images, work, "fashion")
  _row("fashion MLP .keras (unit)", rows, ids, names, logits, test_labels)
  rows = _serve(int8_path, names, [], images, work, "fashion_int8")
  _row("fashion MLP int8 .tflite vs its own interpreter", rows, ids, names,
       int8_logits, test_labels)
  _row("fashion MLP int8 .tflite vs the float .keras", rows, ids, names,
       logits, test_labels)


def flowers(data, work, epochs):
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel
  folder = os.path.join(data, "flowers")
  keras.utils.set_random_seed(0)
  train_ds, val_ds = keras.utils.image_dataset_from_directory(
      folder, validation_split=0.2, subset="both", seed=123,
      image_size=(180, 180), batch_size=32)
  class_names = train_ds.class_names
  model = keras.Sequential([
      keras.Input((180, 180, 3)), layers.Rescaling(1. / 255),
      layers.Conv2D(16, 3, padding="same", activation="relu"),
      layers.MaxPooling2D(),
      layers.Conv2D(32, 3, padding="same", activation="relu"),
      layers.MaxPooling2D(),
      layers.Conv2D(64, 3, padding="same", activation="relu"),
      layers.MaxPooling2D(), layers.Flatten(),
      layers.Dense(128, activation="relu"), layers.Dense(len(class_names))])
  model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(
      from_logits=True), metrics=["accuracy"])
  model.fit(train_ds, epochs=epochs, verbose=0)
  tflite_path = os.path.join(work, "model.tflite")
  with open(tflite_path, "wb") as handle:
    handle.write(tf.lite.TFLiteConverter.from_keras_model(model).convert())
  images = np.concatenate([x.numpy() for x, _ in val_ds])
  labels = np.concatenate([y.numpy() for _, y in val_ds])
  logits = tutorials.interpreter_logits(tflite_path, images)
  # The validation photos' own files, in class folders, for the pipeline.
  served = os.path.join(work, "flowers_validation")
  for path in val_ds.file_paths:
    target = os.path.join(served, os.path.basename(os.path.dirname(path)))
    os.makedirs(target, exist_ok=True)
    shutil.copy(path, target)
  ids = [os.path.join(served, os.path.basename(os.path.dirname(p)),
                      os.path.basename(p)) for p in val_ds.file_paths]
  # The tutorial's model rescales inside; a TFLite file cannot say so.
  rows = _serve(tflite_path, class_names, ["--input_scale", "raw"], served,
                work, "flowers")
  _row("flowers tutorial CNN model.tflite (raw)", rows, ids, class_names,
       logits, labels)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.adopt_parity",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", default=os.path.join(REPO, "..", "shared",
                                                     "data"))
  parser.add_argument("--work", default=None)
  parser.add_argument("--flowers_epochs", type=int, default=2)
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  work = args.work or tempfile.mkdtemp(prefix="adopt-parity-")
  os.makedirs(work, exist_ok=True)
  print(f"work folder {work}; load average {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} cores", flush=True)
  print("| model | images | top-1 agreement with the author | accuracy "
        "served | max confidence difference |", flush=True)
  print("| --- | --- | --- | --- | --- |", flush=True)
  fashion(args.data, work)
  flowers(args.data, work, args.flowers_epochs)
  print(f"load average at the end {os.getloadavg()[0]:.2f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
