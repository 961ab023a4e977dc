"""What the pipeline's stages share: elements, the error tag, counters, defaults.

Beam's per-element cost is larger than classifying a small image, so every
stage from the read to the write moves a batch of images, and errors travel
as plain rows beside them. Every stage imports these names from here.
"""

import dataclasses
import zlib
from typing import Optional

import apache_beam as beam
import numpy as np

DEFAULT_BATCH_SIZE = 256
# The tag of every stage's second output: rows for inputs it could not handle.
ERRORS = "errors"
STAGES = ("read", "decode", "preprocess", "inference")

METRICS_NAMESPACE = "beam_jobs"
# inputs == predictions + errors when a run ends; skipped inputs are counted
# apart, before they are read.
INPUTS, PREDICTIONS, ERROR_ROWS, SKIPPED = ("inputs", "predictions", "errors",
                                            "skipped")
COUNTERS = (INPUTS, PREDICTIONS, ERROR_ROWS, SKIPPED)
# Rows whose id an earlier row of the same run had; reported apart from the
# counts, since such rows are still predictions or errors.
DUPLICATE_IDS = "duplicate_ids"


def counter(name: str):
  """One of the pipeline's Beam counters, by its name."""
  if name not in COUNTERS + (DUPLICATE_IDS,):
    raise ValueError(f"unknown counter {name!r}: expected one of "
                     f"{COUNTERS + (DUPLICATE_IDS,)}")
  return beam.metrics.Metrics.counter(METRICS_NAMESPACE, name)


def id_bucket(id_: str, buckets: int) -> int:
  """The bucket of an id among `buckets`, the same in every process (a
  CRC-32, not Python's salted hash): stages that meet ids by bucket (the
  --skip_existing join, the duplicate count) agree on it."""
  return zlib.crc32(id_.encode("utf-8", "backslashreplace")) % buckets


@dataclasses.dataclass
class ImageBatch:
  """Images with their ids, where they came from and their known labels.

  Sources fill `encoded` (image file bytes) or `pixels` (raw uint8 rows);
  preprocessing turns either into `pixels` of shape (N, H, W, C): uint8, or
  float32 from the TensorFlow decoder, whose values are not rounded.
  """
  ids: list
  sources: list
  true_labels: list
  encoded: Optional[list] = None
  pixels: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, indices) -> "ImageBatch":
    """The rows at `indices`, as a new batch."""
    indices = list(indices)
    return ImageBatch(
        ids=[self.ids[i] for i in indices],
        sources=[self.sources[i] for i in indices],
        true_labels=[self.true_labels[i] for i in indices],
        encoded=None if self.encoded is None else
        [self.encoded[i] for i in indices],
        pixels=None if self.pixels is None else self.pixels[indices])


@dataclasses.dataclass
class BatchResult:
  """Inference's output: the rows that ran with their probabilities, and an
  error row for each row that did not."""
  batch: ImageBatch
  probabilities: np.ndarray
  errors: list


def error_row(id_: str, source: str, stage: str, error) -> dict:
  """One row of the errors output. `error` is an exception or a message."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}: expected one of {STAGES}")
  if isinstance(error, BaseException):
    message = f"{type(error).__name__}: {error}"
  else:
    message = str(error)
  return {"id": id_, "source": source, "stage": stage, "error": message}
