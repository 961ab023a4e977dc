"""The one image decoder, shared by training and serving.

Training on image folders and the Beam pipeline both call `decode_image`, so
the same file always becomes the same array. The model holds its own
rescaling; this module only turns encoded bytes into uint8 pixels of the
model's input size.
"""

import io
from typing import Optional

import numpy as np
from PIL import Image
from PIL import ImageOps

RESIZE_INTERPOLATION = "bilinear"
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default guard.

_PIL_MODES = {"grayscale": "L", "rgb": "RGB"}
# Pillow's "I;16" -> "L" conversion clips at 255 instead of scaling; these
# modes are scaled to 8 bits by hand.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_eight_bit(image: Image.Image) -> Image.Image:
  pixels = np.asarray(image, dtype=np.float64)
  top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
  scaled = np.clip(np.rint(pixels * (255.0 / top)), 0, 255).astype(np.uint8)
  return Image.fromarray(scaled, mode="L")


def decode_image(data: bytes,
                 height: int,
                 width: int,
                 color_mode: str,
                 max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
  """Decodes an encoded image into a uint8 array of shape (height, width, C).

  EXIF orientation is applied, the image is converted to the colour mode,
  and resized with bilinear filtering when its size differs. Raises
  ValueError for bytes that are empty or not an image Pillow can read, and
  Image.DecompressionBombError for images larger than `max_pixels`.
  """
  if data is None:
    raise ValueError("null image cell")
  if not data:
    raise ValueError("empty image: zero bytes")
  # Pillow reads the guard from a module global; it is set per call so that a
  # flag can tighten it, and a worker never keeps a stale value.
  Image.MAX_IMAGE_PIXELS = max_pixels
  limit = f"exceeds the limit of {max_pixels} pixels (--max_image_pixels)"
  try:
    image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as error:
    # Pillow refuses beyond twice its limit, from the header alone.
    raise Image.DecompressionBombError(f"image {limit}; {error}") from None
  with image:
    if max_pixels is not None and image.width * image.height > max_pixels:
      # Between the limit and twice it Pillow only warns; refuse outright.
      raise Image.DecompressionBombError(
          f"image of {image.width}x{image.height} pixels {limit}")
    # In place: the copying form copies every image, rotated or not.
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in _WIDE_MODES:
      image = _to_eight_bit(image)
    elif image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
      # Transparent pixels are composited on white, as a viewer shows them,
      # rather than whatever colour happens to sit under alpha 0.
      rgba = image.convert("RGBA")
      background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      image = Image.alpha_composite(background, rgba)
    if image.mode != _PIL_MODES[color_mode]:
      image = image.convert(_PIL_MODES[color_mode])
    if image.size != (width, height):
      image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
  if pixels.ndim == 2:
    pixels = pixels[:, :, np.newaxis]
  return pixels


def encode_png(pixels: np.ndarray) -> bytes:
  """Encodes a (H, W) or (H, W, C) uint8 array as PNG bytes."""
  if pixels.ndim == 3 and pixels.shape[2] == 1:
    pixels = pixels[:, :, 0]
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()
