"""Inference: this project's ModelHandler for Beam's RunInference.

RunInference loads the model once per worker process through Beam's
`Shared` and hands it to every thread. Batches arrive already formed by the
sources, so RunInference's own batching is skipped.
"""

import logging
import os
import tempfile
import threading
import weakref
from typing import Any, Iterable, Optional

import numpy as np
from apache_beam.ml.inference import base

from beam_jobs.contracts import MODEL_LOADS
from beam_jobs.contracts import BatchResult
from beam_jobs.contracts import ImageBatch
from beam_jobs.contracts import counter
from beam_jobs.contracts import error_row
from model import card as card_lib
from model import engines
from imagebatch import paths

# Beam's RunInference reports its own metrics under this namespace.
METRICS_NAMESPACE = "RunInference"
# The models of this process already counted in MODEL_LOADS. A model loads
# in a DoFn's setup, where Beam counts nothing, so it is counted on its
# first batch; threads share it through Beam's Shared.
_COUNTED = weakref.WeakSet()
_COUNTED_LOCK = threading.Lock()


def local_model_dir(model_dir: str, engine: str) -> str:
  """Returns a local folder holding the model, copying remote ones once:
  the card and the files the engine reads."""
  if not paths.is_remote(model_dir):
    return model_dir
  local = tempfile.mkdtemp(prefix="model-")
  card_bytes = paths.read_bytes(paths.join(model_dir, card_lib.CARD_FILE))
  card = card_lib.load_card(model_dir, card_bytes)
  with open(os.path.join(local, card_lib.CARD_FILE), "wb") as target:
    target.write(card_bytes)
  for name in card_lib.model_files(model_dir, card, [engine]):
    os.makedirs(os.path.dirname(os.path.join(local, name)), exist_ok=True)
    with open(os.path.join(local, name), "wb") as target:
      target.write(paths.read_bytes(paths.join(model_dir, name)))
  return local


class ImageClassifierHandler(base.ModelHandler[ImageBatch, BatchResult,
                                               engines.Engine]):
  """Serves a model folder with one of its engines (see model/engines.py)."""

  def __init__(self, model_dir: str, engine: str = "tflite",
               threads: int = 0, write_embeddings: bool = False):
    super().__init__()
    self._model_dir = model_dir
    self._engine = engine
    self._threads = threads
    self._write_embeddings = write_embeddings

  def load_model(self) -> engines.Engine:
    local = local_model_dir(self._model_dir, self._engine)
    logging.info("loading %s model from %s (pid %d)", self._engine,
                 self._model_dir, os.getpid())
    return engines.load_engine(local, self._engine, self._threads)

  def run_inference(self, batch: ImageBatch, model: engines.Engine,
                    inference_args: Optional[dict[str, Any]] = None
                   ) -> Iterable[BatchResult]:
    with _COUNTED_LOCK:
      if model not in _COUNTED:
        _COUNTED.add(model)
        counter(MODEL_LOADS).inc()
    ran, probabilities, embeddings, errors = _isolate_failures(
        batch, model, np.arange(len(batch)), self._write_embeddings)
    # A NaN or infinite output is no prediction: no label or confidence
    # can be read from it, and no distance from such an embedding.
    finite = np.isfinite(probabilities).all(axis=1)
    if embeddings is not None:
      finite &= np.isfinite(embeddings).all(axis=1)
    if not finite.all():
      errors = errors + [
          error_row(batch.ids[i], batch.sources[i], "inference",
                    "the model's outputs for this input are not finite "
                    "(NaN or infinite); no label can be given")
          for i in ran[~finite]]
      ran, probabilities = ran[finite], probabilities[finite]
      if embeddings is not None:
        embeddings = embeddings[finite]
    rows = batch.without_images()
    if len(ran) < len(batch):
      rows = rows.take(ran)
    return [BatchResult(rows, probabilities, errors, embeddings)]

  def get_num_bytes(self, batch: ImageBatch) -> int:
    return int(batch.pixels.nbytes)

  def get_metrics_namespace(self) -> str:
    return METRICS_NAMESPACE


def _isolate_failures(batch: ImageBatch, model: engines.Engine,
                      rows: np.ndarray, with_embeddings: bool = False):
  """Runs a batch; if it fails, splits it until the failing rows are found.

  Returns the indices into the original batch of the rows that ran, their
  probabilities, their embeddings (None unless `with_embeddings`), and an
  error row for each row that failed, so one bad input never takes its
  batch mates down with it.
  """
  try:
    # Pixels arrive as uint8 (Pillow, raw Parquet) or float32 (TensorFlow's
    # decoder, unrounded); the engine scales either.
    if with_embeddings:
      probabilities, embeddings = model.probabilities_and_embeddings(
          batch.pixels)
      return rows, probabilities, embeddings, []
    return rows, model.probabilities(batch.pixels), None, []
  except Exception as error:  # pylint: disable=broad-except
    if len(batch) == 1:
      empty = np.zeros((0, model.card.num_classes), dtype=np.float32)
      no_embeddings = (np.zeros((0, model.card.embedding_dimension),
                                dtype=np.float32) if with_embeddings else None)
      return rows[:0], empty, no_embeddings, [error_row(
          batch.ids[0], batch.sources[0], "inference", error)]
  middle = len(batch) // 2
  halves = [_isolate_failures(batch.take(range(start, stop)), model,
                              rows[start:stop], with_embeddings)
            for start, stop in ((0, middle), (middle, len(batch)))]
  return (np.concatenate([h[0] for h in halves]),
          np.concatenate([h[1] for h in halves]),
          np.concatenate([h[2] for h in halves]) if with_embeddings else None,
          halves[0][3] + halves[1][3])
