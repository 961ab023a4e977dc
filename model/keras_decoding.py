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
  where the frame does not reach and where its pixels are transparent.
* BMP: TensorFlow's own reader: 8, 24 and 32-bit rows, an 8-bit BMP's bytes
  taken as grey whatever its palette, no compression, and a file size that
  must match the rows exactly.
* WebP: the first frame, alpha dropped.
* Resize: `resize_bilinear`, TensorFlow's float32 arithmetic in its order.

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

import functools
import io
import logging
import struct
from typing import Optional

import imagecodecs
import numpy as np
import simplejpeg
from PIL import Image

from model import png_grey

CHANNELS = {"grayscale": 1, "rgb": 3}

# tf.image.rgb_to_grayscale: float32 weights applied to pixels / 255, then
# times 255.5 and truncated back to uint8 by convert_image_dtype.
TF_GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)

# Consecutive decoded images of one source size wait for a shared resize
# until they hold this many bytes; a larger image is resized alone.
RESIZE_GROUP_BYTES = 32 << 20
# The resize works on blocks of output rows of about this many values:
# its float32 temporaries then fit in a core's cache.
RESIZE_BLOCK_VALUES = 1 << 16

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


def _gif_sub_blocks_end(data: bytes, position: int) -> int:
  """The position after a chain of GIF data sub-blocks (raises IndexError
  if the data ends first)."""
  while True:
    size = data[position]
    position += 1 + size
    if size == 0:
      if position > len(data):
        raise IndexError("sub-block past the end")
      return position


def _gif_layout(data: bytes):
  """What TensorFlow's GIF reader (giflib) gives, without decoding pixels:
  the canvas (the largest complete frame's width and height), the first
  frame's box, its colour table and its transparent index (-1 for none).

  As TensorFlow does (measured), the first frame must be complete, and the
  file may stop anywhere after it: a truncated or unreadable later frame,
  or a missing trailer, ends the list of frames instead of failing.
  """
  if len(data) < 13:
    raise ValueError("invalid GIF: too short for a header")
  flags = data[10]
  position = 13
  global_table = None
  if flags & 0x80:
    size = 3 << ((flags & 7) + 1)
    global_table = data[position:position + size]
    position += size
  frames, transparent = [], None
  try:
    while data[position] != 0x3B:
      kind = data[position]
      if kind == 0x21:
        label = data[position + 1]
        if label == 0xF9 and not frames and transparent is None:
          if data[position + 2] >= 4:
            transparent = data[position + 6] if data[position + 3] & 1 else -1
        position = _gif_sub_blocks_end(data, position + 2)
      elif kind == 0x2C:
        left, top, width, height, packed = struct.unpack(
            "<HHHHB", data[position + 1:position + 10])
        position += 10
        table = global_table
        if packed & 0x80:
          size = 3 << ((packed & 7) + 1)
          table = data[position:position + size]
          position += size
        position = _gif_sub_blocks_end(data, position + 1)
        frames.append((left, top, width, height, table,
                       -1 if transparent is None else transparent))
      else:
        raise IndexError(f"unknown block 0x{kind:02x}")
  except (IndexError, struct.error):
    if not frames:
      raise ValueError("invalid GIF: the data breaks off before the first "
                       "frame is complete") from None
  if not frames:
    raise ValueError("invalid GIF: no image in the file")
  canvas = (max(frame[2] for frame in frames),
            max(frame[3] for frame in frames))
  return canvas, frames[0]


def _gif_size(data: bytes):
  """The larger of the canvas and the logical screen, which Pillow
  allocates to read the first frame."""
  width, height = _gif_layout(data)[0]
  screen_width, screen_height = struct.unpack("<HH", data[6:10])
  return max(width, screen_width), max(height, screen_height)


def decode_gif(data: bytes, channels: int) -> np.ndarray:
  (width, height), first = _gif_layout(data)
  left, top, frame_width, frame_height, table, transparent = first
  if table is None:
    raise ValueError("invalid GIF: missing color map")
  try:
    with Image.open(io.BytesIO(data)) as image:
      x0, y0, x1, y1 = image.tile[0][1]
      image.load()
      if image.mode not in ("P", "L"):
        raise ValueError(f"unexpected first-frame mode {image.mode}")
      indices = np.asarray(image)[y0:y1, x0:x1]
  except (OSError, ValueError, IndexError, SyntaxError) as error:
    raise _fail("GIF", error) from None
  if indices.shape != (frame_height, frame_width):
    raise ValueError("invalid GIF: the first frame's size does not match "
                     "its descriptor")
  colours = np.frombuffer(table, np.uint8).reshape(-1, 3)
  visible = indices[:max(0, height - top), :max(0, width - left)]
  opaque = visible != transparent
  outside = opaque & (visible >= len(colours))
  if outside.any():
    bad = int(visible.flat[np.argmax(outside)])  # The first, as TF reports.
    raise ValueError(f"invalid GIF: found color index {bad} outside of "
                     f"color map range {len(colours)}")
  canvas = np.zeros((height, width, 3), np.uint8)
  rows, columns = visible.shape
  canvas[top:top + rows, left:left + columns] = np.where(
      opaque[..., np.newaxis], colours[np.minimum(visible, len(colours) - 1)],
      0)
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


_SIZES = {"jpeg": _jpeg_size, "png": _png_size, "gif": _gif_size,
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


# ---------------------------------------------------------------- resize


@functools.lru_cache(maxsize=256)
def _axis(in_size: int, out_size: int):
  """TensorFlow's CachedInterpolation for one axis: HalfPixelScaler on a
  float32 scale, floor and ceil clamped to the image, and the fraction."""
  scale = np.float32(in_size) / np.float32(out_size)
  position = ((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) *
              scale - np.float32(0.5))
  floor = np.floor(position)
  lower = np.maximum(floor, 0).astype(np.intp)
  upper = np.minimum(np.ceil(position), in_size - 1).astype(np.intp)
  return lower, upper, position - floor


@functools.lru_cache(maxsize=256)
def _plan(in_height: int, in_width: int, channels: int, height: int,
          width: int):
  """Index arrays and weights of one resize, on rows of W * C values, with
  the output rows cut into blocks of about RESIZE_BLOCK_VALUES values."""
  lower_y, upper_y, lerp_y = _axis(in_height, height)
  lower_x, upper_x, lerp_x = _axis(in_width, width)
  channel = np.arange(channels)
  columns = np.concatenate([(lower_x[:, np.newaxis] * channels + channel),
                            (upper_x[:, np.newaxis] * channels + channel)])
  rows_per_block = max(1, RESIZE_BLOCK_VALUES // (width * channels))
  blocks = []
  for first in range(0, height, rows_per_block):
    last = min(height, first + rows_per_block)
    # Only the input rows these output rows read are lerped horizontally.
    rows, where = np.unique(np.concatenate([lower_y[first:last],
                                            upper_y[first:last]]),
                            return_inverse=True)
    blocks.append((first, last, rows, where[:last - first],
                   where[last - first:], lerp_y[first:last, np.newaxis]))
  return columns.ravel(), np.repeat(lerp_x, channels), blocks


def resize_bilinear(images: np.ndarray, height: int, width: int,
                    out: Optional[np.ndarray] = None) -> np.ndarray:
  """`tf.image.resize(images, (height, width), "bilinear")` for an (N, H, W,
  C) batch of one size: float32, each output the lerp of two horizontal
  lerps, `a + (b - a) * t`, as resize_bilinear_op.cc computes it. Written
  into `out` (float32, C-contiguous, (N, height, width, C)) if given."""
  count, in_height, in_width, channels = images.shape
  if out is None:
    out = np.empty((count, height, width, channels), np.float32)
  if (in_height, in_width) == (height, width):
    # Every weight is 0 and every position exact: TensorFlow's resize is
    # the identity here (tested), and only the type changes.
    out[...] = images
    return out
  columns, lerp_x, blocks = _plan(in_height, in_width, channels, height,
                                  width)
  rows_out = out.reshape(count, height, width * channels)
  rows_in = images.reshape(count, in_height, in_width * channels)
  # A block of output rows at a time, or of whole images when they are
  # small: the float32 temporaries stay in a core's cache (20-35% faster
  # than whole batches, measured), and small images still share each call.
  step = max(1, RESIZE_BLOCK_VALUES // (height * width * channels))
  for start in range(0, count, step):
    source, target = rows_in[start:start + step], rows_out[start:start + step]
    for first, last, rows, top_rows, bottom_rows, lerp_y in blocks:
      picked = source[:, rows][:, :, columns].astype(np.float32)
      left, across = np.split(picked, 2, axis=2)
      across -= left
      across *= lerp_x
      across += left
      top = across[:, top_rows]
      bottom = target[:, first:last]
      np.take(across, bottom_rows, axis=1, out=bottom)
      bottom -= top
      bottom *= lerp_y
      bottom += top
  return out


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
