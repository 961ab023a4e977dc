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


def _png_corpus():
  """PNGs of every kind the fast path takes or must hand to Pillow."""
  rng = np.random.default_rng(2)
  grey = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8))
  rgb = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 6
  return {
      "grey": _encode(grey, "PNG"),
      "grey, best compression": _encode(grey, "PNG", compress_level=9),
      "rgb": _encode(rgb, "PNG"),
      "rgb, interlaced": _encode(rgb, "PNG", interlace=1),
      "rgb, with text": _encode(rgb, "PNG", pnginfo=_text_chunk()),
      "rgb, EXIF rotated": _encode(rgb, "PNG", exif=exif),
      "rgb, transparent colour": _encode(rgb, "PNG", transparency=(0, 0, 0)),
      "palette": _encode(rgb.convert("P"), "PNG"),
      "grey + alpha": _encode(grey.convert("LA"), "PNG"),
      "16-bit grey": _encode(Image.fromarray(
          rng.integers(0, 65535, (8, 8), dtype=np.uint16)), "PNG"),
      "1-bit": _encode(grey.convert("1"), "PNG"),
      "truncated": _encode(rgb, "PNG")[:-40],
      "cut inside the header": _encode(grey, "PNG")[:20],
  }


def _text_chunk():
  from PIL import PngImagePlugin  # pylint: disable=import-outside-toplevel
  info = PngImagePlugin.PngInfo()
  info.add_text("Comment", "a text chunk the fast path can ignore")
  return info


@pytest.mark.parametrize("color_mode", ["grayscale", "rgb"])
@pytest.mark.parametrize("size", [(28, 28), (40, 30), (10, 20)])
def test_png_fast_path_gives_pillows_pixels_or_pillows_error(
    monkeypatch, color_mode, size):
  height, width = size
  corpus = _png_corpus()
  fast = {}
  for name, data in corpus.items():
    try:
      fast[name] = preprocessing.decode_image(data, height, width, color_mode)
    except Exception as error:  # pylint: disable=broad-except
      fast[name] = error
  taken = [name for name, data in corpus.items()
           if preprocessing._decode_plain_png(data, color_mode, None) is not None]  # pylint: disable=protected-access
  # Only 8-bit PNGs already in the colour mode, untouched by Pillow, go fast.
  assert taken == ({"grayscale": ["grey", "grey, best compression"],
                    "rgb": ["rgb", "rgb, interlaced", "rgb, with text"]}
                   [color_mode])
  monkeypatch.setattr(preprocessing, "_decode_plain_png",
                      lambda *args: None)
  for name, data in corpus.items():
    try:
      expected = preprocessing.decode_image(data, height, width, color_mode)
    except Exception as error:  # pylint: disable=broad-except
      assert isinstance(fast[name], type(error)), name
      assert str(fast[name]) == str(error), name
      continue
    assert isinstance(fast[name], np.ndarray), name
    assert fast[name].dtype == np.uint8, name
    np.testing.assert_array_equal(fast[name], expected, err_msg=name)


def test_a_tight_limit_does_not_outlive_its_call():
  data = _encode(Image.new("L", (200, 200)), "PNG")
  before = Image.MAX_IMAGE_PIXELS
  with pytest.raises(Image.DecompressionBombError):
    preprocessing.decode_image(data, 4, 4, "grayscale", max_pixels=100 * 100)
  assert Image.MAX_IMAGE_PIXELS == before
  rgb = _encode(Image.new("RGB", (30, 30)), "JPEG")
  preprocessing.decode_image(rgb, 4, 4, "rgb", max_pixels=50 * 50)
  assert Image.MAX_IMAGE_PIXELS == before


def test_limits_hold_per_call_in_threads_with_no_global_setting():
  """Threads decoding with different limits each get their own."""
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  # JPEG: Pillow's path, where the old code swapped a process-wide limit.
  big = _encode(Image.new("L", (200, 200)), "JPEG")
  before = Image.MAX_IMAGE_PIXELS

  def decode(limit):
    try:
      preprocessing.decode_image(big, 4, 4, "grayscale", max_pixels=limit)
      return "decoded"
    except Image.DecompressionBombError:
      return "refused"

  limits = [100 * 100, 300 * 300] * 200
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(decode, limits))
  assert results == ["refused", "decoded"] * 200
  assert Image.MAX_IMAGE_PIXELS == before
