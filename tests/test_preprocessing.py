"""The shared decoder: same bytes, same array, in training and serving."""

import io

import numpy as np
import pytest
from PIL import Image

from model import preprocessing


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def test_png_round_trip_is_exact(sample):
  pixels = sample.test.images[0]
  decoded = preprocessing.decode_image(preprocessing.encode_png(pixels), 28, 28,
                                       "grayscale")
  assert decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_reads_each_format_to_model_shape(fmt):
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
  decoded = preprocessing.decode_image(_encode(image, fmt), 16, 12, "rgb")
  assert decoded.shape == (16, 12, 3)
  grey = preprocessing.decode_image(_encode(image, fmt), 16, 12, "grayscale")
  assert grey.shape == (16, 12, 1)


def test_resize_is_pillow_bilinear():
  rng = np.random.default_rng(1)
  image = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
  expected = np.asarray(image.resize((20, 10), Image.Resampling.BILINEAR))
  decoded = preprocessing.decode_image(_encode(image, "PNG"), 10, 20, "rgb")
  np.testing.assert_array_equal(decoded, expected)


def test_exif_orientation_is_applied():
  # A 20x10 image whose EXIF says "rotate 90 degrees" is 10x20 upright.
  pixels = np.zeros((10, 20, 3), dtype=np.uint8)
  pixels[:, :10] = 255  # Left half white.
  image = Image.fromarray(pixels)
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 CW to view.
  data = _encode(image, "JPEG", exif=exif, quality=95)
  decoded = preprocessing.decode_image(data, 20, 10, "grayscale")
  assert decoded.shape == (20, 10, 1)
  # After a clockwise turn, the white left half is on top.
  assert decoded[:8].mean() > 200 and decoded[12:].mean() < 50


def test_sixteen_bit_png_is_scaled_not_clipped():
  wide = np.full((4, 4), 65535 // 2, dtype=np.uint16)
  data = _encode(Image.fromarray(wide), "PNG")
  decoded = preprocessing.decode_image(data, 4, 4, "grayscale")
  assert abs(int(decoded[0, 0, 0]) - 127) <= 1


def test_transparent_pixels_become_white():
  rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # Black, fully transparent.
  data = _encode(Image.fromarray(rgba, "RGBA"), "PNG")
  decoded = preprocessing.decode_image(data, 4, 4, "rgb")
  assert (decoded == 255).all()


def test_empty_and_non_image_bytes_raise():
  with pytest.raises(ValueError, match="zero bytes"):
    preprocessing.decode_image(b"", 4, 4, "rgb")
  with pytest.raises(Exception, match="cannot identify"):
    preprocessing.decode_image(b"hello, not an image", 4, 4, "rgb")


def test_decompression_bomb_is_refused_before_decoding():
  data = _encode(Image.new("L", (200, 200)), "PNG")
  with pytest.raises(Image.DecompressionBombError):
    preprocessing.decode_image(data, 4, 4, "grayscale", max_pixels=100 * 100)
  assert preprocessing.decode_image(data, 4, 4, "grayscale",
                                    max_pixels=None).shape == (4, 4, 1)
