"""Inference: this project's ModelHandler for Beam's RunInference.

RunInference loads the model once per worker process through Beam's
`Shared` and hands it to every thread. Batches arrive already formed by the
sources, so RunInference's own batching is skipped.
"""

import dataclasses
import logging
import os
import tempfile
from typing import Any, Iterable, Optional

import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference import base

from beam_jobs.batches import ImageBatch
from beam_jobs.batches import error_row
from model import card as card_lib
from model import engines

METRICS_NAMESPACE = "RunInference"
MODEL_FILES = (card_lib.CARD_FILE, card_lib.MODEL_FILE, card_lib.TFLITE_FILE)


@dataclasses.dataclass
class BatchResult:
  """Probabilities for the rows that ran, error rows for those that did not."""
  batch: ImageBatch
  probabilities: np.ndarray
  errors: list


def local_model_dir(model_dir: str) -> str:
  """Returns a local folder holding the model, copying remote ones once."""
  if "://" not in model_dir:
    return model_dir
  local = tempfile.mkdtemp(prefix="model-")
  for name in MODEL_FILES:
    with FileSystems.open(card_lib.join(model_dir, name)) as source, open(
        os.path.join(local, name), "wb") as target:
      target.write(source.read())
  return local


class ImageClassifierHandler(base.ModelHandler[ImageBatch, BatchResult,
                                               engines.Engine]):
  """Serves an exported model folder with the Keras or TFLite engine."""

  def __init__(self, model_dir: str, engine: str = "tflite",
               threads: int = 0):
    super().__init__()
    self._model_dir = model_dir
    self._engine = engine
    self._threads = threads

  def load_model(self) -> engines.Engine:
    local = local_model_dir(self._model_dir)
    logging.info("loading %s model from %s (pid %d)", self._engine,
                 self._model_dir, os.getpid())
    return engines.load_engine(local, self._engine, self._threads)

  def run_inference(self, batch: ImageBatch, model: engines.Engine,
                    inference_args: Optional[dict[str, Any]] = None
                   ) -> Iterable[BatchResult]:
    probabilities, errors = _isolate_failures(batch, model)
    return [BatchResult(batch, probabilities, errors)]

  def get_num_bytes(self, batch: ImageBatch) -> int:
    return int(batch.pixels.nbytes)

  def get_metrics_namespace(self) -> str:
    return METRICS_NAMESPACE


def _isolate_failures(batch: ImageBatch, model: engines.Engine):
  """Runs a batch; if it fails, splits it until the failing rows are found.

  Returns probabilities with NaN rows for the failures, and their error rows,
  so one bad input never takes its batch mates down with it.
  """
  try:
    return model.probabilities(batch.pixels.astype(np.float32)), []
  except Exception as error:  # pylint: disable=broad-except
    if len(batch) == 1:
      row = np.full((1, model.card.num_classes), np.nan, dtype=np.float32)
      return row, [error_row(batch.ids[0], batch.sources[0], "inference",
                             error)]
  middle = len(batch) // 2
  halves = [_isolate_failures(batch.take(range(start, stop)), model)
            for start, stop in ((0, middle), (middle, len(batch)))]
  return (np.concatenate([h[0] for h in halves]),
          halves[0][1] + halves[1][1])

