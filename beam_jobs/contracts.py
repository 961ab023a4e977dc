"""What the pipeline's stages share: elements, the error tag, counters, defaults.

Beam's per-element cost is larger than classifying a small image, so every
stage from the read to the write moves a batch of images, and errors travel
as plain rows beside them. Every stage imports these names from here.
"""

import dataclasses
import re
import zlib
from typing import Optional, Sequence

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
# Models loaded, one per worker process that served.
MODEL_LOADS = "model_loads"
# Of the predictions: those whose given label names a class, and those whose
# given label matches none (the rest came without a label).
LABELLED, UNMATCHED_LABELS = "labelled", "unmatched_labels"
LABEL_COUNTERS = (LABELLED, UNMATCHED_LABELS)


# The column true labels are read from, in a Parquet shard or a CSV or
# Parquet list that has it, when --label_column is not given (make_shards
# writes it, and so do Hugging Face datasets); --label_column '' reads none.
DEFAULT_LABEL_COLUMN = "label"


def label_column_to_read(flag: Optional[str]) -> Optional[str]:
  """The label column a source reads, given --label_column (None when the
  flag was not given, '' for none)."""
  if flag is None:
    return DEFAULT_LABEL_COLUMN
  return flag or None


def counter(name: str):
  """One of the pipeline's Beam counters, by its name."""
  known = COUNTERS + (DUPLICATE_IDS, MODEL_LOADS) + LABEL_COUNTERS
  if name not in known:
    raise ValueError(f"unknown counter {name!r}: expected one of {known}")
  return beam.metrics.Metrics.counter(METRICS_NAMESPACE, name)


def id_bucket(id_: str, buckets: int) -> int:
  """The bucket of an id among `buckets`, the same in every process (a
  CRC-32, not Python's salted hash): stages that meet ids by bucket (the
  --skip_existing join, the duplicate count) agree on it."""
  return zlib.crc32(id_.encode("utf-8", "backslashreplace")) % buckets


_DIGITS = re.compile(r"[0-9]+")


class LabelMatcher:
  """Turns the labels inputs come with into the model's class names.

  A label whose text is a class name matches that class. Otherwise an
  integer, or a string of digits, is a class index (Fashion-MNIST and Keras'
  datasets store labels as 0-9), unless some class name is itself a string
  of digits (class folders named 0-9): then names alone match, so no value
  can mean two classes. Anything else (an index out of range, a name the
  model does not know) matches no class.
  """

  def __init__(self, class_names: Sequence[str]):
    self._names = {name: name for name in class_names}
    self._by_index = ({} if any(_DIGITS.fullmatch(n) for n in class_names)
                      else dict(enumerate(class_names)))

  def match(self, value) -> Optional[str]:
    """The class name `value` stands for, or None."""
    return self._match_text(given_label(value))

  def _match_text(self, text: Optional[str]) -> Optional[str]:
    if text is None:
      return None
    name = self._names.get(text)
    if name is None and _DIGITS.fullmatch(text):
      name = self._by_index.get(int(text))
    return name

  def match_all(self, values: Sequence):
    """For a batch: (class names or None, the labels as text, how many
    matched a class, how many were given but matched none)."""
    if all(value is None for value in values):
      nothing = [None] * len(values)
      return nothing, nothing, 0, 0
    given = [given_label(value) for value in values]
    names = [self._match_text(text) for text in given]
    labelled = sum(name is not None for name in names)
    return (names, given, labelled,
            sum(text is not None for text in given) - labelled)


def given_label(value) -> Optional[str]:
  """A label as its source gave it, as text: 3.0 from a float column (an
  integer column with nulls, through pandas) is "3", bytes are decoded as
  UTF-8; booleans are no label."""
  if value is None or isinstance(value, bool):
    return None
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  if isinstance(value, bytes):
    return value.decode("utf-8", "backslashreplace")
  return str(value)


@dataclasses.dataclass
class ImageBatch:
  """Images with their ids, where they came from and their given labels.

  `true_labels` holds each input's label as its source gave it (a class
  folder's name, a label column's value, or None); FormatPredictions matches
  them to the card's class names.

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

  def without_images(self) -> "ImageBatch":
    """The same rows without their bytes or pixels, which no stage after
    inference reads."""
    return ImageBatch(self.ids, self.sources, self.true_labels)


@dataclasses.dataclass
class BatchResult:
  """Inference's output: the rows that ran (without their images) with their
  probabilities (and with --write_embeddings their embeddings, (N, D)
  float32), and an error row for each row that did not."""
  batch: ImageBatch
  probabilities: np.ndarray
  errors: list
  embeddings: Optional[np.ndarray] = None


def error_row(id_: str, source: str, stage: str, error) -> dict:
  """One row of the errors output. `error` is an exception or a message."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}: expected one of {STAGES}")
  if isinstance(error, BaseException):
    message = f"{type(error).__name__}: {error}"
  else:
    message = str(error)
  return {"id": id_, "source": source, "stage": stage, "error": message}
