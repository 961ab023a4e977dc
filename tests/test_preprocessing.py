"""The shared decoder: same bytes, same array, in training and serving."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from model import datasets
from model import preprocessing
from tests.helpers import REPO
from tests.helpers import image_bytes
from tests.helpers import run_predict


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
  decoded = preprocessing.decode_image(image_bytes(image, fmt), 16, 12, "rgb")
  assert decoded.shape == (16, 12, 3)
  grey = preprocessing.decode_image(image_bytes(image, fmt), 16, 12, "grayscale")
  assert grey.shape == (16, 12, 1)


def test_resize_is_pillow_bilinear():
  rng = np.random.default_rng(1)
  image = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
  expected = np.asarray(image.resize((20, 10), Image.Resampling.BILINEAR))
  decoded = preprocessing.decode_image(image_bytes(image, "PNG"), 10, 20, "rgb")
  np.testing.assert_array_equal(decoded, expected)


def test_exif_orientation_is_applied():
  # A 20x10 image whose EXIF says "rotate 90 degrees" is 10x20 upright.
  pixels = np.zeros((10, 20, 3), dtype=np.uint8)
  pixels[:, :10] = 255  # Left half white.
  image = Image.fromarray(pixels)
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 CW to view.
  data = image_bytes(image, "JPEG", exif=exif, quality=95)
  decoded = preprocessing.decode_image(data, 20, 10, "grayscale")
  assert decoded.shape == (20, 10, 1)
  # After a clockwise turn, the white left half is on top.
  assert decoded[:8].mean() > 200 and decoded[12:].mean() < 50


def test_sixteen_bit_png_is_scaled_not_clipped():
  wide = np.full((4, 4), 65535 // 2, dtype=np.uint16)
  data = image_bytes(Image.fromarray(wide), "PNG")
  decoded = preprocessing.decode_image(data, 4, 4, "grayscale")
  assert abs(int(decoded[0, 0, 0]) - 127) <= 1


def test_transparent_pixels_become_white():
  rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # Black, fully transparent.
  data = image_bytes(Image.fromarray(rgba, "RGBA"), "PNG")
  decoded = preprocessing.decode_image(data, 4, 4, "rgb")
  assert (decoded == 255).all()


def test_empty_and_non_image_bytes_raise():
  with pytest.raises(ValueError, match="zero bytes"):
    preprocessing.decode_image(b"", 4, 4, "rgb")
  with pytest.raises(Exception, match="cannot identify"):
    preprocessing.decode_image(b"hello, not an image", 4, 4, "rgb")


def test_decompression_bomb_is_refused_before_decoding():
  data = image_bytes(Image.new("L", (200, 200)), "PNG")
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
      "grey": image_bytes(grey, "PNG"),
      "grey, best compression": image_bytes(grey, "PNG", compress_level=9),
      "rgb": image_bytes(rgb, "PNG"),
      "rgb, interlaced": image_bytes(rgb, "PNG", interlace=1),
      "rgb, with text": image_bytes(rgb, "PNG", pnginfo=_text_chunk()),
      "rgb, EXIF rotated": image_bytes(rgb, "PNG", exif=exif),
      "rgb, transparent colour": image_bytes(rgb, "PNG", transparency=(0, 0, 0)),
      "palette": image_bytes(rgb.convert("P"), "PNG"),
      "grey + alpha": image_bytes(grey.convert("LA"), "PNG"),
      "16-bit grey": image_bytes(Image.fromarray(
          rng.integers(0, 65535, (8, 8), dtype=np.uint16)), "PNG"),
      "1-bit": image_bytes(grey.convert("1"), "PNG"),
      "truncated": image_bytes(rgb, "PNG")[:-40],
      "cut inside the header": image_bytes(grey, "PNG")[:20],
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
  data = image_bytes(Image.new("L", (200, 200)), "PNG")
  before = Image.MAX_IMAGE_PIXELS
  with pytest.raises(Image.DecompressionBombError):
    preprocessing.decode_image(data, 4, 4, "grayscale", max_pixels=100 * 100)
  assert Image.MAX_IMAGE_PIXELS == before
  rgb = image_bytes(Image.new("RGB", (30, 30)), "JPEG")
  preprocessing.decode_image(rgb, 4, 4, "rgb", max_pixels=50 * 50)
  assert Image.MAX_IMAGE_PIXELS == before


def test_limits_hold_per_call_in_threads_with_no_global_setting():
  """Threads decoding with different limits each get their own."""
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  # JPEG: Pillow's path, where the old code swapped a process-wide limit.
  big = image_bytes(Image.new("L", (200, 200)), "JPEG")
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


# Memory -----------------------------------------------------------------------


@pytest.mark.slow
def test_large_images_are_reduced_before_any_conversion():
  side = 4200  # 17.6 MP: above REDUCE_ABOVE_PIXELS
  assert side * side > preprocessing.REDUCE_ABOVE_PIXELS
  ramp = np.linspace(0, 65535, side).astype(np.uint16)
  wide = np.ascontiguousarray(np.broadcast_to(ramp, (side, side)))
  decoded = preprocessing.decode_image(
      image_bytes(Image.fromarray(wide), "PNG"), 28, 28, "grayscale")
  # What the unreduced path gives: 8 bits first, then the resize.
  expected = np.asarray(preprocessing._to_eight_bit(  # pylint: disable=protected-access
      Image.fromarray(wide)).resize((28, 28), Image.Resampling.BILINEAR))
  assert np.abs(decoded[..., 0].astype(int) - expected).max() <= 2
  # EXIF orientation still applies to a reduced JPEG: dark left half, turned
  # a quarter (orientation 6), becomes a dark top half.
  halves = np.zeros((side, side), dtype=np.uint8)
  halves[:, side // 2:] = 255
  exif = Image.Exif()
  exif[0x0112] = 6
  turned = preprocessing.decode_image(
      image_bytes(Image.fromarray(halves), "JPEG", exif=exif), 28, 28, "grayscale")
  assert turned[:10].mean() < 30 and turned[-10:].mean() > 225


@pytest.mark.slow
def test_a_huge_sixteen_bit_png_decodes_in_bounded_memory(tmp_path):
  """The review's 9400x9400 16-bit PNG took 2.4 GB; it must stay near its
  own decoded size (177 MB)."""
  result = subprocess.run(
      [sys.executable, "-c",
       "from benchmarks import decode_memory as d; import sys; "
       "cases = d.make_cases(sys.argv[1]); "
       "d.measure(cases['16-bit grey PNG'][0], 28, 'grayscale')",
       str(tmp_path)], capture_output=True, text=True, cwd=REPO, check=True)
  assert float(result.stdout.split()[-1]) < 400


# Bad and unusual images in a run ----------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
  """A PNG whose header declares width x height, with no pixel data."""
  import struct  # pylint: disable=import-outside-toplevel
  import zlib  # pylint: disable=import-outside-toplevel

  def chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body +
            struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
          chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def unusual_images() -> dict:
  """Valid images in awkward forms: each must be classified."""
  rng = np.random.default_rng(5)
  rgb = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 6
  frames = [Image.new("L", (28, 28), v) for v in (30, 200)]
  animated = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
  palette_alpha = rgb.convert("P")
  palette_alpha.info["transparency"] = 0
  return {
      "cmyk.jpg": image_bytes(rgb.convert("CMYK"), "JPEG"),
      "sixteen_bit.png": image_bytes(Image.fromarray(
          rng.integers(0, 65535, (28, 28), dtype=np.uint16)), "PNG"),
      "palette.png": image_bytes(rgb.convert("P"), "PNG"),
      "palette_alpha.png": image_bytes(palette_alpha, "PNG"),
      "rgba.png": image_bytes(rgb.convert("RGBA"), "PNG"),
      "grey_alpha.png": image_bytes(rgb.convert("LA"), "PNG"),
      "animated.gif": animated,
      "one_pixel.png": image_bytes(Image.new("L", (1, 1), 128), "PNG"),
      "exif_rotated.jpg": image_bytes(rgb, "JPEG", exif=exif),
      "bitmap.bmp": image_bytes(rgb, "BMP"),
      "photo.webp": image_bytes(rgb, "WEBP"),
      "scan.tiff": image_bytes(rgb, "TIFF"),
  }


def broken_files(sample) -> dict:
  """Files that are not images a model can see: each must be an error row."""
  png = preprocessing.encode_png(sample.test.images[0])
  jpeg = image_bytes(Image.fromarray(sample.test.images[0][..., 0]), "JPEG")
  return {
      "zero_bytes.png": b"",
      "truncated.png": png[:len(png) // 2],
      "truncated.jpg": jpeg[:len(jpeg) // 2],
      "not_an_image.jpg": b"Just some text that pretends to be a JPEG.\n",
      ".DS_Store": b"\x00\x00\x00\x01Bud1\x00\x00\x10\x00",
      "notes.txt": b"shot list, not a photo",
      "bomb.png": _png_header_only(100_000, 100_000),
  }


def test_bad_and_unusual_images_in_one_run(tmp_path, tiny_model, sample):
  folder = tmp_path / "pile"
  good = datasets.Split(sample.test.images[:20], sample.test.labels[:20])
  datasets.write_png_folder(good, sample.class_names, str(folder))
  unusual, broken = unusual_images(), broken_files(sample)
  for name, data in {**unusual, **broken}.items():
    (folder / "Bag" / name).write_bytes(data)
  # A real 200x200 image over a tight pixel limit is refused as well.
  (folder / "Coat" / "large.png").write_bytes(
      image_bytes(Image.new("L", (200, 200), 90), "PNG"))

  run = run_predict(tmp_path / "out", input=str(folder), model=tiny_model,
                    batch_size=64, max_image_pixels=150 * 150)
  manifest, rows, errors = run.manifest, run.predictions, run.errors

  predicted = {os.path.basename(r["id"]) for r in rows}
  failed = {os.path.basename(e["id"]): e for e in errors}
  assert set(unusual) <= predicted, set(unusual) - predicted
  assert set(failed) == set(broken) | {"large.png"}
  assert len(rows) == 20 + len(unusual)
  for name in ("bomb.png", "large.png"):
    assert "DecompressionBombError" in failed[name]["error"]
    assert "exceeds the limit" in failed[name]["error"]
  assert "zero bytes" in failed["zero_bytes.png"]["error"]
  assert all(e["stage"] == "decode" and e["source"] == e["id"]
             for e in errors)
  assert manifest["counts"]["inputs"] == 20 + len(unusual) + len(broken) + 1
