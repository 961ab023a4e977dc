"""The elements that flow through the pipeline: batches, never single images.

Beam's per-element cost is larger than classifying a small image, so every
stage from the read to the write moves a batch of images, and errors travel
as plain rows beside them.
"""

import dataclasses
from typing import Optional

import numpy as np

STAGES = ("read", "decode", "preprocess", "inference")


@dataclasses.dataclass
class ImageBatch:
  """Images with their ids, where they came from and their known labels.

  Sources fill `encoded` (image file bytes) or `pixels` (raw uint8 rows);
  preprocessing turns either into `pixels` of shape (N, H, W, C).
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


def error_row(id_: str, source: str, stage: str, error) -> dict:
  """One row of the errors output. `error` is an exception or a message."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}: expected one of {STAGES}")
  if isinstance(error, BaseException):
    message = f"{type(error).__name__}: {error}"
  else:
    message = str(error)
  return {"id": id_, "source": source, "stage": stage, "error": message}
