"""What the Ray Data and Spark jobs share: the project's serving code.

Both peers do the work per image exactly as the pipeline does: the card's
decoder (`preprocessing.card_decoder`: this project's Pillow decoder, Keras'
recipe without TensorFlow, or a PyTorch author's torchvision recipe) at the
card's size and colour mode, then the card's default engine on one thread
(`engines.load_engine`: LiteRT for a TFLite folder, ONNX Runtime for an
adopted ONNX one), which applies the card's input scale.
Only the framework around it differs. The peers' venv has no Beam and does
not install the project: `use_repo` puts this checkout on the path of the
job and of every worker process it starts.
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def use_repo():
  """Makes `model` importable here and in worker processes (they inherit
  PYTHONPATH from the driver's environment)."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  paths = [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(
      os.pathsep) if p and p != REPO]
  os.environ["PYTHONPATH"] = os.pathsep.join(paths)


def job_parser(doc):
  """The flags both jobs share: input, model, output."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--parquet", help="folder of Parquet shards (id, image)")
  source.add_argument("--images", help="folder of image files")
  parser.add_argument("--model", required=True, help="exported model folder")
  parser.add_argument("--output", required=True, help="output folder (replaced)")
  return parser


def load_card(model_dir):
  """The model card from a local folder (read directly: no Beam FileSystems)."""
  from model import card as card_lib  # pylint: disable=import-outside-toplevel
  with open(os.path.join(model_dir, card_lib.CARD_FILE), "rb") as handle:
    return card_lib.load_card(model_dir, card_bytes=handle.read())


class Classifier:
  """Decodes and classifies batches of encoded images; load once per worker.

  Returns, for each payload, the predicted class name and its probability,
  or (None, NaN) for an image that did not decode.
  """

  def __init__(self, model_dir):
    # pylint: disable=import-outside-toplevel
    import numpy as np
    from model import engines
    from model import preprocessing
    self._np = np
    card = load_card(model_dir)
    self._classes = np.asarray(card.class_names, dtype=object)
    self._decoder = preprocessing.card_decoder(card)
    self._engine = engines.load_engine(model_dir, threads=1, card=card)

  def __call__(self, payloads):
    np = self._np
    pixels, good, _ = self._decoder.decode(list(payloads))
    labels = np.full(len(payloads), None, dtype=object)
    confidences = np.full(len(payloads), np.nan, dtype=np.float32)
    if good:
      probabilities = self._engine.probabilities(pixels)
      best = probabilities.argmax(axis=1)
      labels[good] = self._classes[best]
      confidences[good] = probabilities[np.arange(len(best)), best]
    return labels, confidences


def count_inputs(parquet, images):
  """Rows of the Parquet shards, or files under the image folder."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  if parquet:
    return sum(pq.read_metadata(os.path.join(root, name)).num_rows
               for root, _, files in os.walk(parquet)
               for name in files if name.endswith(".parquet"))
  return sum(len(files) for _, _, files in os.walk(images))


def count_predictions(folder):
  """(rows, rows with a label) over the Parquet files a job wrote."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  rows = labelled = 0
  for name in os.listdir(folder):
    if name.endswith(".parquet"):
      column = pq.read_table(os.path.join(folder, name),
                             columns=["label"]).column("label")
      rows += len(column)
      labelled += len(column) - column.null_count
  return rows, labelled


def report(peer, version, settings, times, inputs, output):
  """Prints the job's RESULT line; exits 1 unless every input has a row.

  `times` are the monotonic clock at the start, once the framework was up,
  and once the output was written.
  """
  import time  # pylint: disable=import-outside-toplevel
  start, started, finished = times
  rows, labelled = count_predictions(output)
  result = {"peer": peer, "version": version, "settings": settings,
            "startup_s": round(started - start, 2),
            "pipeline_s": round(finished - started, 2),
            "wall_s": round(time.monotonic() - start, 2),
            "inputs": inputs, "predictions": rows, "labelled": labelled}
  print("RESULT " + json.dumps(result), flush=True)
  if rows != inputs:
    sys.exit(f"{rows} prediction rows for {inputs} inputs")
