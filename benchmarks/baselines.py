"""The throughput benchmark's baselines, each run as a process of its own:

  python -m benchmarks.baselines B0|B1|B1-numpy|B2 INPUT MODEL_DIR OUTPUT
      [--limit N]

  B0  a plain loop: read, PIL decode, batches of 256, compiled Keras call,
      pyarrow writing the same output columns
  B1  stock Beam: per-element decode Map, RunInference with a minimal handler
      calling model(x) at Beam's default batching, WriteToParquet; the
      handler returns results as Beam's TFModelHandlerNumpy does
  B1-numpy  B1 with the output copied to numpy once per batch (not stock)
  B2  a per-element DoFn calling model.predict

Prints {"images": N, "seconds": S} (the loop alone) as its last line.
"""

import argparse
import io
import json
import os
import sys
import time

import numpy as np

from benchmarks import stages
from benchmarks.workloads import BATCH


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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("system", choices=("B0", "B1", "B1-numpy", "B2"))
  parser.add_argument("folder")
  parser.add_argument("model_dir")
  parser.add_argument("output")
  parser.add_argument("--limit", type=int, default=0,
                      help="images to classify (0: all)")
  args = parser.parse_args(argv)
  limit = args.limit or None
  if args.system == "B0":
    images, seconds = run_b0(args.folder, args.model_dir, args.output, limit)
  else:
    images, seconds = run_beam_baseline(args.system, args.folder,
                                        args.model_dir, args.output, limit)
  print(json.dumps({"images": images, "seconds": seconds}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
