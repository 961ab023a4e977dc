"""Keras' image decoding, pixel for pixel, without importing TensorFlow.

`keras.utils.image_dataset_from_directory` turns a file into a model input
with `tf.io.decode_image(data, channels, expand_animations=False)` (uint8)
and `tf.image.resize(image, size, method="bilinear")`: half-pixel centres,
no antialiasing, float32 out, neither rounded nor clipped, and run even at
the image's own size. Adopted models were trained on exactly those values,
so the card's `tensorflow` decoder must give them again. This module does,
with libjpeg-turbo (simplejpeg), libpng and libwebp (imagecodecs), Pillow's
GIF reader and numpy, each step written to TensorFlow 2.21's own code:

* JPEG: libjpeg-turbo with TensorFlow's settings, the fast integer IDCT
  (JDCT_IFAST) and fancy upsampling; a grey model gets libjpeg's own
  JCS_GRAYSCALE output (the Y channel of a YCbCr JPEG). CMYK and YCCK JPEGs
  are read as CMYK and turned into RGB with TensorFlow's integer formula
  (inverted when an Adobe marker is present, as TensorFlow does).
* PNG: libpng's transformations as TensorFlow asks for them: alpha and tRNS
  dropped (not composited), 16 bits cut to their high byte, grey repeated
  into RGB, and RGB to grey by libpng's fixed-point weights and gamma
  tables (model/png_grey.py).
* GIF: the first frame on a canvas of the largest frame's size, black
  where the frame does not reach and where its pixels are transparent
  (model/gif_decoding.py).
* BMP: TensorFlow's own reader: 8, 24 and 32-bit rows, an 8-bit BMP's bytes
  taken as grey whatever its palette, no compression, and a file size that
  must match the rows exactly.
* WebP: the first frame, alpha dropped.
* Resize: `bilinear_resize.resize_bilinear`, TensorFlow's float32
  arithmetic in its order.

Keras itself refuses some inputs; this decoder converts them instead, so
they become predictions rather than error rows:

* A grey model (channels=1) given a GIF, BMP or WebP (TensorFlow: "channels
  must be 0 or 3 for GIF", "`channels` must be 0, 3 or 4 for BMP", "WebP
  only supports 3 or 4 channels") or a CMYK JPEG (libjpeg: "Unsupported
  color conversion request"): the RGB image above, made grey by
  `tf.image.rgb_to_grayscale` (float32 weights 0.2989, 0.5870, 0.1140 on
  pixels / 255, times 255.5, truncated to uint8), which is what a Keras
  user writes when decode_image refuses.
* An RGB model given a WebP with alpha or an animated WebP (TensorFlow:
  "Number of channels requested does not match input", "WebP Animation
  must be 4 channel RGBA"): the first frame with its alpha dropped, as
  TensorFlow drops a PNG's.

Accepted and refused as TensorFlow does with damaged files (measured):
a JPEG whose data ends early, even by its end marker alone, is refused,
and one with corrupt but complete data decodes with libjpeg's repairs; a
PNG without its IEND chunk is refused; a GIF may break off anywhere after
its first frame; a BMP must be exactly its header and rows. Keras'
directory loader reads .bmp, .gif, .jpeg, .jpg and .png files only; WebP
decodes as tf.io.decode_image decodes it, and JPEG XL, which
decode_image also reads, is refused here.
No decoder here writes to stderr (TensorFlow's print libjpeg's warnings and
their own log lines); a failure is a ValueError of one line, and an image
above `max_pixels` is refused from its header, before any pixel is
decoded, with Pillow's DecompressionBombError.
"""

import logging
import struct
from typing import Optional

import imagecodecs
import numpy as np
import simplejpeg
from PIL import Image

from model import gif_decoding
from model import png_grey
from model.bilinear_resize import resize_bilinear

CHANNELS = {"grayscale": 1, "rgb": 3}

# tf.image.rgb_to_grayscale: float32 weights applied to pixels / 255, then
# times 255.5 and truncated back to uint8 by convert_image_dtype.
TF_GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)

# Consecutive decoded images of one source size wait for a shared resize
# until they hold this many bytes; a larger image is resized alone.
RESIZE_GROUP_BYTES = 32 << 20

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _NoLibpngWarnings(logging.Filter):
  """imagecodecs passes libpng's warnings to Python's logging: "Interlace
  handling should be turned on" for every interlaced PNG, a CRC error in an
  ancillary chunk (which libpng skips, as in TensorFlow). The pixels stand;
  a warning line per image would be noise in a run promised to be quiet."""

  def filter(self, record):
    return not record.getMessage().startswith("PNG ")


logging.getLogger("imagecodecs").addFilter(_NoLibpngWarnings())
_JXL_SIGNATURES = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")


def _fail(what: str, error) -> ValueError:
  """A ValueError of one line for a library's error."""
  text = str(error).strip().splitlines()
  return ValueError(f"invalid {what}: {text[0] if text else type(error).__name__}")


# ---------------------------------------------------------------- formats


def image_format(data: bytes) -> str:
  """The format TensorFlow's decode_image would pick from the magic bytes."""
  if data[:3] == b"\xff\xd8\xff":
    return "jpeg"
  if data[:8] == _PNG_SIGNATURE:
    return "png"
  if data[:4] == b"GIF8":
    return "gif"
  if data[:2] == b"BM":
    return "bmp"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "webp"
  if data.startswith(_JXL_SIGNATURES):
    raise ValueError("JPEG XL images are not supported by the tensorflow "
                     "decoder recipe (Keras' directory loader skips them)")
  raise ValueError("unknown image format: expected JPEG, PNG, GIF, BMP or "
                   "WebP")


def _jpeg_size(data: bytes):
  try:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
  except ValueError as error:
    raise _fail("JPEG header", error) from None
  return width, height


def _png_size(data: bytes):
  if len(data) < 33 or data[12:16] != b"IHDR":
    raise ValueError("invalid PNG: no IHDR header")
  return struct.unpack(">II", data[16:24])


def _bmp_size(data: bytes):
  if len(data) < 32:
    raise ValueError(f"invalid BMP: {len(data)} bytes, too short for a "
                     "header")
  width, height = struct.unpack("<ii", data[18:26])
  return width, abs(height)


def _webp_size(data: bytes):
  """The canvas size from the first chunk of a WebP's RIFF container."""
  chunk, body = data[12:16], data[20:30]
  if chunk == b"VP8X" and len(body) >= 10:
    return (int.from_bytes(body[4:7], "little") + 1,
            int.from_bytes(body[7:10], "little") + 1)
  if chunk == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
    bits = int.from_bytes(body[1:5], "little")
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
  if chunk == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
    width, height = struct.unpack("<HH", body[6:10])
    return width & 0x3FFF, height & 0x3FFF
  raise ValueError("invalid WebP: no VP8, VP8L or VP8X chunk first")


# ---------------------------------------------------------------- colour


def tf_rgb_to_grayscale(rgb: np.ndarray) -> np.ndarray:
  """uint8 (..., 3) to uint8 (..., 1) as `tf.image.rgb_to_grayscale` does.

  The sum runs in the order TensorFlow's tensordot gives (checked on all
  16,777,216 colours against TensorFlow 2.21 on x86-64).
  """
  scaled = rgb.astype(np.float32) * np.float32(1.0 / 255.0)
  red, green, blue = (np.float32(weight) for weight in TF_GREY_WEIGHTS)
  grey = (scaled[..., 0] * red + scaled[..., 1] * green) + scaled[..., 2] * blue
  return (grey * np.float32(255.5)).astype(np.uint8)[..., np.newaxis]


def _cmyk_to_rgb(cmyk: np.ndarray, adobe: bool) -> np.ndarray:
  """TensorFlow's jpeg_mem.cc CMYK conversion, integer division included."""
  values = cmyk.astype(np.uint32)
  if not adobe:
    values = 255 - values
  return (values[..., :3] * values[..., 3:] // 255).astype(np.uint8)


# ---------------------------------------------------------------- JPEG


def _saw_adobe_marker(data: bytes) -> bool:
  """Whether libjpeg sees an Adobe APP14 marker before the first scan."""
  position = 2
  while position + 4 <= len(data) and data[position] == 0xFF:
    marker = data[position + 1]
    if marker == 0xFF:  # Fill byte.
      position += 1
      continue
    if marker in (0xDA, 0xD9):  # Start of scan, end of image.
      return False
    length = struct.unpack(">H", data[position + 2:position + 4])[0]
    if (marker == 0xEE and length >= 14 and
        data[position + 4:position + 9] == b"Adobe"):
      return True
    position += 2 + length
  return False


def _simplejpeg(data: bytes, colorspace: str) -> np.ndarray:
  """libjpeg-turbo with TensorFlow's settings and its acceptance rules.

  TensorFlow accepts a JPEG that libjpeg decodes with warnings (corrupt
  data it repairs) but refuses one whose data ends early, even if only the
  end marker is missing. simplejpeg's strict mode refuses both; a strict
  failure that is not the end of the data decodes again leniently.
  """
  options = dict(colorspace=colorspace, fastdct=True, fastupsample=False)
  try:
    return simplejpeg.decode_jpeg(data, strict=True, **options)
  except ValueError as error:
    message = str(error)
  scan = data.find(b"\xff\xda")
  if "Premature end of JPEG file" in message or data.rfind(b"\xff\xd9") < scan:
    raise ValueError("invalid JPEG: the data ends before the image does "
                     "(truncated)")
  try:
    return simplejpeg.decode_jpeg(data, strict=False, **options)
  except ValueError as error:
    raise _fail("JPEG", error) from None


def decode_jpeg(data: bytes, channels: int) -> np.ndarray:
  _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
  if colorspace in ("CMYK", "YCCK"):
    rgb = _cmyk_to_rgb(_simplejpeg(data, "CMYK"), _saw_adobe_marker(data))
    return rgb if channels == 3 else tf_rgb_to_grayscale(rgb)
  pixels = _simplejpeg(data, "GRAY" if channels == 1 else "RGB")
  return pixels.reshape(pixels.shape[0], pixels.shape[1], channels)


# ---------------------------------------------------------------- PNG


def _check_png_end(data: bytes) -> None:
  """TensorFlow reads a PNG to its IEND chunk and fails without one."""
  position = 8
  while position + 12 <= len(data):
    length, kind = struct.unpack(">I4s", data[position:position + 8])
    if kind == b"IEND":
      return
    position += 12 + length
  raise ValueError("invalid PNG: the data ends before the IEND chunk "
                   "(truncated)")


def decode_png(data: bytes, channels: int) -> np.ndarray:
  _check_png_end(data)
  try:
    pixels = imagecodecs.png_decode(data)
  except Exception as error:  # pylint: disable=broad-except
    raise _fail("PNG", error) from None
  if pixels.ndim == 2:
    pixels = pixels[..., np.newaxis]
  if pixels.shape[2] in (2, 4):  # png_set_strip_alpha: tRNS and alpha go.
    pixels = pixels[..., :-1]
  if channels == 1 and pixels.shape[2] == 3:
    pixels = png_grey.rgb_to_grey(pixels, data)
  if pixels.dtype == np.uint16:  # png_set_strip_16 keeps the high byte.
    pixels = (pixels >> 8).astype(np.uint8)
  if channels == 3 and pixels.shape[2] == 1:
    pixels = np.repeat(pixels, 3, axis=2)
  return pixels


# ---------------------------------------------------------------- GIF


def decode_gif(data: bytes, channels: int) -> np.ndarray:
  canvas = gif_decoding.decode_gif_rgb(data)
  return canvas if channels == 3 else tf_rgb_to_grayscale(canvas)


# ---------------------------------------------------------------- BMP


def decode_bmp(data: bytes, channels: int) -> np.ndarray:
  """TensorFlow's decode_image_op.cc BMP reader, rule for rule."""
  offset, = struct.unpack("<i", data[10:14])
  width, height = struct.unpack("<ii", data[18:26])
  bits, = struct.unpack("<h", data[28:30])
  depth = int(bits / 8)  # C's division, truncating toward zero.
  if depth not in (1, 3, 4):
    raise ValueError(f"invalid BMP: {bits} bits a pixel; TensorFlow's "
                     "reader takes 8, 24 or 32")
  if width <= 0 or height == 0 or offset < 0:
    raise ValueError(f"invalid BMP: size {width}x{height}, pixel data at "
                     f"{offset}")
  rows = abs(height)
  row_bytes = (depth * width + 3) // 4 * 4
  extra = len(data) - offset - row_bytes * rows
  if extra != 0:
    raise ValueError("invalid BMP: the file size should be the header plus "
                     f"the rows, but they differ by {extra} bytes")
  pixels = np.frombuffer(data, np.uint8, row_bytes * rows, offset)
  pixels = pixels.reshape(rows, row_bytes)[:, :width * depth]
  pixels = pixels.reshape(rows, width, depth)
  if height > 0:  # Bottom-up rows.
    pixels = pixels[::-1]
  rgb = (np.repeat(pixels, 3, axis=2) if depth == 1 else
         pixels[..., 2::-1])
  return np.ascontiguousarray(rgb) if channels == 3 else tf_rgb_to_grayscale(
      rgb)


# ---------------------------------------------------------------- WebP


def decode_webp(data: bytes, channels: int) -> np.ndarray:
  try:
    pixels = imagecodecs.webp_decode(data, index=0)
  except Exception as error:  # pylint: disable=broad-except
    raise _fail("WebP", error) from None
  rgb = pixels[..., :3]
  return rgb if channels == 3 else tf_rgb_to_grayscale(rgb)


_SIZES = {"jpeg": _jpeg_size, "png": _png_size, "gif": gif_decoding.gif_size,
          "bmp": _bmp_size, "webp": _webp_size}
_DECODERS = {"jpeg": decode_jpeg, "png": decode_png, "gif": decode_gif,
             "bmp": decode_bmp, "webp": decode_webp}


def decode_pixels(data: bytes, channels: int,
                  max_pixels: Optional[int] = None) -> np.ndarray:
  """uint8 (H, W, channels): `tf.io.decode_image(data, channels,
  expand_animations=False)`, or its conversion where TensorFlow refuses
  (see the module's docstring). The header's size is checked against
  `max_pixels` before any pixel is decoded."""
  if data is None:
    raise ValueError("null image cell")
  if not data:
    raise ValueError("empty image: zero bytes")
  data = bytes(data)
  kind = image_format(data)
  width, height = _SIZES[kind](data)
  if max_pixels is not None and width * height > max_pixels:
    raise Image.DecompressionBombError(
        f"image of {width}x{height} pixels exceeds the limit of {max_pixels}"
        " pixels (--max_image_pixels)")
  return _DECODERS[kind](data, channels)


# ---------------------------------------------------------------- decoder


class KerasImageDecoder:
  """Encoded images to the float32 inputs `image_dataset_from_directory`
  gives a model of this size and colour mode."""

  def __init__(self, height: int, width: int, color_mode: str,
               max_pixels: Optional[int] = None):
    if color_mode not in CHANNELS:
      raise ValueError(f"unknown color_mode {color_mode!r}: expected one of "
                       f"{tuple(CHANNELS)}")
    self.shape = (height, width, CHANNELS[color_mode])
    self._max_pixels = max_pixels

  def decode_uint8(self, data: bytes) -> np.ndarray:
    """The decoded image at its own size, before the resize."""
    return decode_pixels(data, self.shape[2], self._max_pixels)

  def decode(self, data: bytes) -> np.ndarray:
    """float32 (height, width, C); a bad image raises a one-line ValueError
    (DecompressionBombError above max_pixels)."""
    pixels = self.decode_uint8(data)
    return resize_bilinear(pixels[np.newaxis], *self.shape[:2])[0]

  def decode_batch(self, payloads: list):
    """(pixels float32 (n, H, W, C), indices of the n that decoded, and an
    (index, exception) pair for each that did not), in payload order.

    Consecutive images of one source size are resized together, straight
    into the output, once they hold RESIZE_GROUP_BYTES or the next image
    has another size: memory stays about one group (or one large image)
    whatever the batch.
    """
    pixels = np.empty((len(payloads),) + self.shape, np.float32)
    good, errors, group = [], [], []

    def resize_group():
      if group:
        first = len(good) - len(group)
        resize_bilinear(np.stack(group), *self.shape[:2],
                        out=pixels[first:len(good)])
        group.clear()

    for index, data in enumerate(payloads):
      try:
        image = self.decode_uint8(data)
      except Exception as error:  # pylint: disable=broad-except
        errors.append((index, error))
        continue
      if group and (image.shape != group[0].shape or
                    len(group) * image.nbytes >= RESIZE_GROUP_BYTES):
        resize_group()
      group.append(image)
      good.append(index)
    resize_group()
    return pixels[:len(good)], good, errors
