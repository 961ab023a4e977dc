"""Preprocessing: encoded images to model-sized pixels, driven by the card."""

from typing import Optional

import apache_beam as beam
import numpy as np

from beam_jobs.contracts import ERRORS
from beam_jobs.contracts import ImageBatch
from beam_jobs.contracts import error_row
from model import preprocessing
from model.card import ModelCard


class DecodeImages(beam.DoFn):
  """Decodes each batch with the training decoder; bad images become errors.

  A batch that arrives as raw pixels already has the model's input size and
  passes through untouched.
  """

  def __init__(self, card: ModelCard,
               max_image_pixels: Optional[int] = (
                   preprocessing.DEFAULT_MAX_IMAGE_PIXELS)):
    self._height, self._width = card.height, card.width
    self._channels = card.channels
    self._color_mode = card.color_mode
    self._max_pixels = max_image_pixels

  def process(self, batch: ImageBatch):
    if batch.encoded is None:
      yield batch
      return
    pixels = np.empty((len(batch), self._height, self._width, self._channels),
                      dtype=np.uint8)
    good = []
    for index, data in enumerate(batch.encoded):
      try:
        pixels[len(good)] = preprocessing.decode_image(
            data, self._height, self._width, self._color_mode, self._max_pixels)
        good.append(index)
      except Exception as error:  # pylint: disable=broad-except
        yield beam.pvalue.TaggedOutput(
            ERRORS, error_row(batch.ids[index], batch.sources[index], "decode",
                              error))
    if good:
      decoded = batch.take(good)
      decoded.encoded = None
      decoded.pixels = pixels[:len(good)]
      yield decoded


class Preprocess(beam.PTransform):
  """ImageBatches of any form in, ImageBatches of model-ready pixels out."""

  def __init__(self, card: ModelCard, max_image_pixels: Optional[int]):
    super().__init__()
    self._decode = DecodeImages(card, max_image_pixels)

  def expand(self, batches):
    return batches | "DecodeImages" >> beam.ParDo(self._decode).with_outputs(
        ERRORS, main="images")
