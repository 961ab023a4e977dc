"""Preprocessing: encoded images to model-sized pixels, driven by the card."""

from typing import Optional

import apache_beam as beam

from beam_jobs.contracts import ERRORS
from beam_jobs.contracts import ImageBatch
from beam_jobs.contracts import error_row
from model import image_limits
from model import preprocessing
from model.card import ModelCard


class DecodeImages(beam.DoFn):
  """Decodes each batch with the card's decoder; bad images become errors.

  The decoder is the one the model was trained with: this project's Pillow
  decoder (uint8 pixels), Keras' TensorFlow recipe (float32 pixels, made
  a batch per TensorFlow call) or a PyTorch author's torchvision recipe
  (uint8 pixels). A batch that arrives as raw pixels already has the
  model's input size and passes through untouched.
  """

  def __init__(self, card: ModelCard,
               max_image_pixels: Optional[int] = (
                   image_limits.DEFAULT_MAX_IMAGE_PIXELS)):
    self._card = card
    self._max_image_pixels = max_image_pixels
    self._decoder = None

  def setup(self):
    # Built on the worker: TensorFlow's traced decoder does not pickle, and a
    # Pillow model's worker never imports TensorFlow.
    self._decoder = preprocessing.card_decoder(self._card,
                                               self._max_image_pixels)

  def process(self, batch: ImageBatch):
    if batch.encoded is None:
      yield batch
      return
    if self._decoder is None:
      self.setup()
    pixels, good, errors = self._decoder.decode(batch.encoded)
    for index, error in errors:
      yield beam.pvalue.TaggedOutput(
          ERRORS, error_row(batch.ids[index], batch.sources[index], "decode",
                            error))
    if good:
      decoded = batch.take(good)
      decoded.encoded = None
      decoded.pixels = pixels
      yield decoded


class Preprocess(beam.PTransform):
  """ImageBatches of any form in, ImageBatches of model-ready pixels out."""

  def __init__(self, card: ModelCard, max_image_pixels: Optional[int]):
    super().__init__()
    self._decode = DecodeImages(card, max_image_pixels)

  def expand(self, batches):
    return batches | "DecodeImages" >> beam.ParDo(self._decode).with_outputs(
        ERRORS, main="images")
