"""How large an image may be, checked from its header before any pixel is
decoded: every decoder (model/preprocessing.py, keras_decoding.py,
torchvision_decoding.py) refuses the same images the same way."""

import io
from typing import Optional

from PIL import Image

DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own default.
# Pillow refuses images above twice its MAX_IMAGE_PIXELS while opening them,
# before any caller's check; a larger --max_image_pixels cannot take effect.
PILLOW_PIXEL_LIMIT = 2 * Image.MAX_IMAGE_PIXELS
# A classifier's input, height times width: above this it is not one this
# serves (the probe images alone would not fit in memory).
MAX_INPUT_PIXELS = 4096 * 4096


def check_input_size(height: int, width: int, where: str) -> None:
  """Raises ValueError for a model input above MAX_INPUT_PIXELS, before
  anything is made at that size."""
  if height * width > MAX_INPUT_PIXELS:
    raise ValueError(f"{where}: input of {height}x{width} pixels is above "
                     f"the limit of {MAX_INPUT_PIXELS:,} pixels for an image "
                     "classifier")


def check_bytes(data: Optional[bytes]) -> None:
  if data is None:
    raise ValueError("null image cell")
  if not data:
    raise ValueError("empty image: zero bytes")


def open_checked(data: bytes, max_pixels: Optional[int]) -> Image.Image:
  """Opens an image lazily (header only), refusing one above `max_pixels`.

  Raises Image.DecompressionBombError for an image that is too large, and
  PIL.UnidentifiedImageError for bytes that are not an image.
  """
  limit = f"exceeds the limit of {max_pixels} pixels (--max_image_pixels)"
  try:
    # Opening reads the header only; Pillow's own guard refuses images
    # beyond PILLOW_PIXEL_LIMIT here, whatever the caller's limit.
    image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as error:
    raise Image.DecompressionBombError(f"image {limit}; {error}") from None
  # The caller's limit is checked from the header too, with no process-wide
  # setting, so threads decoding with different limits don't interfere.
  if max_pixels is not None and image.width * image.height > max_pixels:
    image.close()
    raise Image.DecompressionBombError(
        f"image of {image.width}x{image.height} pixels {limit}")
  return image
