"""How an encoded image becomes a model input, shared by training and serving.

Three decoders, named in the card's `preprocessing.decoder` (`card_decoder`
builds the one a card names):

* `pillow`, this project's own: `decode_image` turns bytes into uint8 pixels
  of the model's input size. Training on image folders and the Beam pipeline
  both call it, so the same file always becomes the same array.
* `tensorflow`, the recipe of `keras.utils.image_dataset_from_directory`,
  for models trained elsewhere: `tf.image.decode_image` and an unrounded
  bilinear `tf.image.resize`, float32 out, given pixel for pixel without
  TensorFlow by model/keras_decoding.py.
* `torchvision`, a PyTorch author's evaluation recipe (ImageFolder's PIL
  decode, Resize, CenterCrop), for ONNX models: model/torchvision_decoding.py.

`scale_pixels` then maps [0, 255] pixels to the range the model was trained
on (the card's `input_scale`), a whole batch at once.
"""

import io
import struct
from typing import Optional

import imagecodecs
import numpy as np
from PIL import Image
from PIL import ImageOps

from model import image_limits
from model import keras_decoding
from model import torchvision_decoding
from model.image_limits import DEFAULT_MAX_IMAGE_PIXELS

RESIZE_INTERPOLATION = "bilinear"

_PIL_MODES = {"grayscale": "L", "rgb": "RGB"}
_CHANNELS = {"grayscale": 1, "rgb": 3}

DECODERS = ("pillow", "tensorflow", "torchvision")
# How [0, 255] pixels become the model input. The keras.applications names
# are those of `imagenet_utils.preprocess_input`: symmetric is its "tf" mode.
INPUT_SCALES = ("raw", "unit", "symmetric", "caffe", "torch", "custom")
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
# Pillow's "I;16" -> "L" conversion clips at 255 instead of scaling; these
# modes are scaled to 8 bits by hand.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


# Batches of images larger than this many values in all are decoded and run
# through the model in slices: the working memory of both grows with the
# rows they handle at once, and neither is faster for rows beyond a few.
MAX_SLICE_VALUES = 1 << 22


def rows_per_slice(values_per_row: int) -> int:
  """The largest power of two of rows within MAX_SLICE_VALUES (at least 1)."""
  rows = max(1, MAX_SLICE_VALUES // max(1, values_per_row))
  return 1 << (rows.bit_length() - 1)


# Images above this many pixels are first reduced, in their own mode, by a
# whole factor that leaves them at least twice the model's size (JPEGs by
# the decoder's own DCT scaling, before decoding). Every conversion after it
# (16 bits to 8, alpha compositing, colour) then works on the small image,
# so a decode's peak memory is about the decoded image itself: at most 4
# bytes a pixel in Pillow, whatever the mode, within --max_image_pixels
# (benchmarks/decode_memory.py). Smaller images decode exactly as before.
REDUCE_ABOVE_PIXELS = 4096 * 4096

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_HEADER_END = 33  # signature, IHDR length and type, 13 bytes, CRC
_PNG_COLOUR_TYPES = {"grayscale": 0, "rgb": 2}  # 8-bit grey, 8-bit RGB
# Chunks that make Pillow change the pixels (transparency, EXIF orientation,
# animation). A match inside compressed data only costs the fast path.
_PNG_SLOW_MARKERS = (b"tRNS", b"eXIf", b"Raw profile type exif", b"acTL")


def _decode_plain_png(data: bytes, color_mode: str,
                      max_pixels: Optional[int]) -> Optional[np.ndarray]:
  """Pixels of an 8-bit PNG already in `color_mode`, which Pillow keeps as is.

  Pillow's cost on a small PNG is mostly Python; imagecodecs' libpng call
  is a fraction of it (README, "Libraries"). PNG is lossless and these need
  no conversion, so the pixels are the same; anything else returns None and
  goes to Pillow, as does any decoding error, so messages stay Pillow's.
  """
  if (len(data) < _PNG_HEADER_END or data[:8] != _PNG_SIGNATURE
      or data[12:16] != b"IHDR"):
    return None
  width, height, depth, colour_type = struct.unpack(">IIBB", data[16:26])
  if (depth != 8 or colour_type != _PNG_COLOUR_TYPES[color_mode]
      or (max_pixels is not None and width * height > max_pixels)
      or any(marker in data for marker in _PNG_SLOW_MARKERS)):
    return None
  try:
    return imagecodecs.png_decode(data)
  except Exception:  # pylint: disable=broad-except
    return None


def _resize(image: Image.Image, height: int, width: int) -> Image.Image:
  """The one resize of both decoding paths (RESIZE_INTERPOLATION)."""
  return image.resize((width, height), Image.Resampling.BILINEAR)


def _reduce_large(image: Image.Image, height: int,
                  width: int) -> Image.Image:
  """A large image reduced by a whole factor, in its own mode (see
  REDUCE_ABOVE_PIXELS); the orientation is applied later, so the factor
  leaves twice the model's larger side on the image's shorter one."""
  factor = min(image.width, image.height) // (2 * max(height, width))
  if image.width * image.height <= REDUCE_ABOVE_PIXELS or factor < 2:
    return image
  if image.format == "JPEG":
    # Decodes at 1/2, 1/4 or 1/8 scale, never below the size asked for.
    image.draft(image.mode, (image.width // factor, image.height // factor))
    factor = min(image.width, image.height) // (2 * max(height, width))
    if factor < 2:
      return image
  size = (image.width // factor, image.height // factor)
  try:
    return image.reduce(factor)
  except ValueError:
    # Modes reduce() lacks (16-bit, palette, 1-bit): the same box average.
    return image.resize(size, Image.Resampling.BOX)


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
  image_limits.check_bytes(data)
  pixels = _decode_plain_png(data, color_mode, max_pixels)
  if pixels is not None:
    if pixels.shape[:2] != (height, width):
      pixels = np.asarray(_resize(Image.fromarray(pixels), height, width))
    return pixels.reshape(height, width, -1)
  with image_limits.open_checked(data, max_pixels) as image:
    reduced = _reduce_large(image, height, width)
    if reduced is not image:
      reduced.info = image.info  # The EXIF orientation, still to apply.
      image = reduced
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
      image = _resize(image, height, width)
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


def scale_pixels(pixels: np.ndarray, input_scale: str,
                 mean: Optional[list] = None,
                 std: Optional[list] = None) -> np.ndarray:
  """Maps a batch (N, H, W, C) of [0, 255] pixels to the model's input range.

  The arithmetic is float32 and in the order keras.applications'
  `preprocess_input` uses, so a model gets the values its author fed it.
  `custom` is (pixels - mean) / std per channel, in pixel units.
  """
  x = np.asarray(pixels, dtype=np.float32)
  if input_scale == "raw":
    return x
  if input_scale == "unit":
    return x / np.float32(255.0)
  if input_scale == "symmetric":
    return x / np.float32(127.5) - np.float32(1.0)
  if input_scale == "caffe":
    return x[..., ::-1] - np.asarray(CAFFE_MEAN_BGR, np.float32)
  if input_scale == "torch":
    return ((x / np.float32(255.0) - np.asarray(TORCH_MEAN, np.float32)) /
            np.asarray(TORCH_STD, np.float32))
  if input_scale == "custom":
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
  raise ValueError(f"unknown input_scale {input_scale!r}: expected one of "
                   f"{INPUT_SCALES}")


def card_decoder(card, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
  """The decoder a model card names, for its input size and colour mode: a
  BatchDecoder, or for `torchvision` the card's recipe
  (`TorchvisionDecoder`, with the same `decode` contract)."""
  if card.decoder == "torchvision":
    return torchvision_decoding.TorchvisionDecoder.from_card(
        card.preprocessing, card.color_mode, card.height, card.width,
        max_pixels)
  return BatchDecoder(card.decoder, card.height, card.width, card.color_mode,
                      max_pixels)


class BatchDecoder:
  """Decodes batches of encoded images with the decoder a card names.

  `decode` returns the pixels of the images that decoded, their indices in
  the batch, and an (index, exception) pair for each that did not, so one
  bad file is one error and its batch mates go on.
  """

  def __init__(self, decoder: str, height: int, width: int, color_mode: str,
               max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
    if decoder not in DECODERS:
      raise ValueError(f"unknown decoder {decoder!r}: expected one of "
                       f"{DECODERS}")
    if decoder == "torchvision":
      raise ValueError("the torchvision decoder follows the card's recipe: "
                       "build it with card_decoder(card)")
    self._decoder = decoder
    self._shape = (height, width, _CHANNELS[color_mode])
    self._color_mode = color_mode
    self._max_pixels = max_pixels
    self._keras = keras_decoding.KerasImageDecoder(height, width, color_mode,
                                                   max_pixels)

  def decode(self, payloads: list):
    if self._decoder == "pillow":
      return self._decode_with_pillow(payloads)
    return self._keras.decode_batch(payloads)

  def _decode_with_pillow(self, payloads):
    pixels = np.empty((len(payloads),) + self._shape, dtype=np.uint8)
    good, errors = [], []
    for index, data in enumerate(payloads):
      try:
        pixels[len(good)] = decode_image(data, *self._shape[:2],
                                         self._color_mode, self._max_pixels)
        good.append(index)
      except Exception as error:  # pylint: disable=broad-except
        errors.append((index, error))
    return pixels[:len(good)], good, errors
