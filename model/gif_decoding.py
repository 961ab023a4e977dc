"""A GIF's first frame as TensorFlow's GIF reader (giflib) gives it, without
TensorFlow: on a canvas of the largest complete frame's size, black where
the frame does not reach and where its pixels are transparent. Used by
model/keras_decoding.py."""

import io
import struct

import numpy as np
from PIL import Image


def _fail(what: str, error) -> ValueError:
  """A ValueError of one line for a library's error."""
  text = str(error).strip().splitlines()
  return ValueError(f"invalid {what}: {text[0] if text else type(error).__name__}")


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


def gif_size(data: bytes):
  """The larger of the canvas and the logical screen, which Pillow
  allocates to read the first frame."""
  width, height = _gif_layout(data)[0]
  screen_width, screen_height = struct.unpack("<HH", data[6:10])
  return max(width, screen_width), max(height, screen_height)


def decode_gif_rgb(data: bytes) -> np.ndarray:
  """The first frame on its canvas, (H, W, 3) uint8."""
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
  return canvas
