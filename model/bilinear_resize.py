"""`tf.image.resize(images, size, method="bilinear")` in numpy, value for
value: half-pixel centres, no antialiasing, float32 in TensorFlow's order
of operations (resize_bilinear_op.cc). model/keras_decoding.py uses it."""

import functools
from typing import Optional

import numpy as np

# The resize works on blocks of output rows of about this many values:
# its float32 temporaries then fit in a core's cache.
RESIZE_BLOCK_VALUES = 1 << 16


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
