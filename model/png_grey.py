"""A PNG's RGB made grey the way TensorFlow's decode_image makes it.

TensorFlow asks libpng (1.6.43 in TensorFlow 2.21) for one channel with
`png_set_rgb_to_gray(png, 1, 0.299, 0.587)`. libpng then weighs the samples
in 15-bit fixed point, before cutting 16 bits to 8, and through gamma
tables when the file's gamma (its gAMA chunk, or 1/2.2 for an sRGB chunk)
is more than 5% from 1: samples go to linear light, are weighed, and come
back. This module repeats that arithmetic, tables included (pngrtran.c
png_do_rgb_to_gray, png.c png_build_gamma_table and its helpers), for
model/keras_decoding.py. Not repeated: libpng's recognition of a few sRGB
ICC profiles in an iCCP chunk, which would set the same 1/2.2 gamma.
"""

import struct

import numpy as np

# png_set_rgb_to_gray's 0.299 and 0.587 in 15-bit fixed point, truncated,
# blue taking the rest of 32768.
GREY_RED, GREY_GREEN = 9797, 19234
GREY_BLUE = 32768 - GREY_RED - GREY_GREEN
# Gammas within 5% of 1 are not applied; 16-bit gamma tables keep at most
# 11 significant bits when the output is 8-bit; an sRGB chunk means 1/2.2.
GAMMA_THRESHOLD = 5000
MAX_GAMMA_8 = 11
GAMMA_SRGB = 45455


def rgb_to_grey(rgb: np.ndarray, png: bytes) -> np.ndarray:
  """(H, W, 3) uint8 or uint16 samples of the PNG `png` (alpha already
  dropped) to (H, W, 1) of the same type, as libpng gives TensorFlow."""
  return _rgb_to_grey(rgb, *_gamma_and_bits(png))


def _chunks(data: bytes):
  """(type, body) of each chunk before the image data."""
  position = 8
  while position + 8 <= len(data):
    length, kind = struct.unpack(">I4s", data[position:position + 8])
    if kind == b"IDAT":
      return
    yield kind, data[position + 8:position + 8 + length]
    position += 12 + length


def _gamma_and_bits(data: bytes):
  """The file gamma libpng 1.6.43 uses (0 if none) and the sBIT maximum."""
  gamma, srgb, significant_bits = 0, False, 0
  for kind, body in _chunks(data):
    if kind == b"gAMA" and len(body) == 4 and not gamma:
      gamma = struct.unpack(">I", body)[0]
    elif kind == b"sRGB":
      srgb = True
    elif kind == b"sBIT" and body:
      significant_bits = max(body[:3])
  return (GAMMA_SRGB if srgb else gamma), significant_bits


def _gamma_significant(gamma: int) -> bool:
  return abs(gamma - 100000) > GAMMA_THRESHOLD


def _reciprocal(gamma: int) -> int:
  return int(np.floor(1e10 / gamma + 0.5))


def _gamma_table_8(gamma: int) -> np.ndarray:
  values = np.arange(256)
  if not _gamma_significant(gamma):
    return values
  corrected = np.floor(255 * np.power(values / 255.0, gamma * 1e-5) + 0.5)
  return np.where((values > 0) & (values < 255), corrected, values).astype(
      np.uint32)


def _gamma_table_16(shift: int, gamma: int) -> np.ndarray:
  """libpng's png_build_16bit_table, flattened to index (low >> shift, high)."""
  low, high = np.meshgrid(np.arange(1 << (8 - shift)), np.arange(256),
                          indexing="ij")
  sample = (high << (8 - shift)) + low
  top = (1 << (16 - shift)) - 1
  if _gamma_significant(gamma):
    table = np.floor(65535.0 * np.power(sample * (1.0 / top), gamma * 1e-5)
                     + 0.5)
  elif shift:
    table = (sample * 65535 + (1 << (15 - shift))) // top
  else:
    table = sample
  return table.astype(np.uint32)


def _gamma_16to8_table(shift: int, gamma: int) -> np.ndarray:
  """libpng's png_build_16to8_table, flattened like _gamma_table_16."""
  table = np.full((1 << (8 - shift), 256), 65535, np.uint32)
  top, last = (1 << (16 - shift)) - 1, 0
  for level in range(255):
    out = level * 257
    bound = int(np.floor(65535 * np.power((out + 128) / 65535.0,
                                          gamma * 1e-5) + 0.5))
    bound = (bound * top + 32768) // 65535 + 1
    samples = np.arange(last, max(last, bound))
    table[samples & (0xFF >> shift), samples >> (8 - shift)] = out
    last = max(last, bound)
  return table


def _rgb_to_grey(rgb: np.ndarray, gamma: int,
                 significant_bits: int) -> np.ndarray:
  """libpng 1.6.43's png_do_rgb_to_gray with TensorFlow's coefficients."""
  # 32768 * 65535 + 16384 fits in 32 bits: 12 bytes a pixel, not 24.
  values = rgb.astype(np.uint32)
  red, green, blue = values[..., 0], values[..., 1], values[..., 2]
  flat = (red == green) & (red == blue)
  if not gamma or not (_gamma_significant(gamma) or
                       _gamma_significant(_reciprocal(gamma))):
    if rgb.dtype == np.uint8:
      grey = (GREY_RED * red + GREY_GREEN * green +
              GREY_BLUE * blue) >> 15
    else:
      grey = (GREY_RED * red + GREY_GREEN * green +
              GREY_BLUE * blue + 16384) >> 15
    return grey.astype(rgb.dtype)[..., np.newaxis]
  screen = _reciprocal(gamma)
  to_linear, from_linear = _reciprocal(gamma), _reciprocal(screen)
  if rgb.dtype == np.uint8:
    to_1, from_1 = _gamma_table_8(to_linear), _gamma_table_8(from_linear)
    same = _gamma_table_8(int(np.floor(1e15 / gamma / screen + 0.5)))
    linear = (GREY_RED * to_1[red] + GREY_GREEN * to_1[green] +
              GREY_BLUE * to_1[blue] + 16384) >> 15
    grey = np.where(flat, same[red], from_1[linear])
    return grey.astype(np.uint8)[..., np.newaxis]
  shift = 16 - significant_bits if 0 < significant_bits < 16 else 0
  shift = min(max(shift, 16 - MAX_GAMMA_8), 8)

  def look_up(table, sample):
    return table[(sample & 0xFF) >> shift, sample >> 8]

  to_1 = _gamma_table_16(shift, to_linear)
  from_1 = _gamma_table_16(shift, from_linear)
  same = _gamma_16to8_table(shift, int(np.floor(gamma * 1e-5 * screen + 0.5)))
  linear = (GREY_RED * look_up(to_1, red) +
            GREY_GREEN * look_up(to_1, green) +
            GREY_BLUE * look_up(to_1, blue) + 16384) >> 15
  grey = np.where(flat, look_up(same, red), look_up(from_1, linear))
  return grey.astype(np.uint16)[..., np.newaxis]
