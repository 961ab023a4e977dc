"""model/keras_decoding.py against TensorFlow's own decoding, pixel for pixel.

Every image is made here (Pillow, simplejpeg, imagecodecs, and small
writers below for what those cannot write); the reference is
tests/tf_reference.py, which imports TensorFlow.
"""

import functools
import io
import os
import struct
import subprocess
import sys
import zlib

import imagecodecs
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from model import engines
from model import keras_decoding
from model import preprocessing
from tests.helpers import REPO

# TensorFlow's own decoder is the reference: the tensorflow extra.
pytest.importorskip("tensorflow")
from tests import tf_reference  # pylint: disable=wrong-import-position

tf = tf_reference.tf


def _photo(height=45, width=61, seed=3):
  """Smooth colour ramps with noise: compresses like a photo."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  ramps = np.dstack([x * 4, y * 5, (x + y) * 3]) % 256
  noisy = ramps + rng.integers(-25, 25, ramps.shape)
  return noisy.clip(0, 255).astype(np.uint8)


def _save(image, file_format, **options):
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buffer = io.BytesIO()
  image.save(buffer, file_format, **options)
  return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
  return (struct.pack(">I", len(body)) + kind + body +
          struct.pack(">I", zlib.crc32(kind + body)))


def _with_chunk(png: bytes, chunk: bytes) -> bytes:
  """A PNG with an ancillary chunk inserted right after IHDR."""
  return png[:33] + chunk + png[33:]


def _interlaced_png(rgb: np.ndarray) -> bytes:
  """An 8-bit RGB Adam7 PNG (Pillow writes none)."""
  passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
            (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
  raw = b""
  for x0, y0, dx, dy in passes:
    sub = rgb[y0::dy, x0::dx]
    if sub.size:
      raw += b"".join(b"\x00" + row.tobytes() for row in sub)
  header = struct.pack(">IIBBBBB", rgb.shape[1], rgb.shape[0], 8, 2, 0, 0, 1)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) +
          _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def _gif_lzw(indices) -> bytes:
  """GIF image data of literal 8-bit codes, cleared often enough that the
  code width stays 9 bits (a valid, uncompressed-size stream)."""
  codes = []
  for start in range(0, len(indices), 254):
    codes += [256] + list(indices[start:start + 254])
  codes.append(257)
  packed = sum(code << (9 * i) for i, code in enumerate(codes))
  data = packed.to_bytes((9 * len(codes) + 7) // 8, "little")
  blocks = b"".join(bytes([len(data[i:i + 255])]) + data[i:i + 255]
                    for i in range(0, len(data), 255))
  return b"\x08" + blocks + b"\x00"


def _gif(screen, palette: bytes, frames, trailer=True) -> bytes:
  """A GIF whose frames are (left, top, indices, transparent index or None);
  what Pillow cannot write: small or offset first frames, no trailer."""
  bits = max(1, (len(palette) // 3 - 1).bit_length())
  table = palette.ljust(3 << bits, b"\x00")
  data = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80 | (bits - 1), 0,
                                 0) + table
  for left, top, indices, transparent in frames:
    if transparent is not None:
      data += b"\x21\xf9\x04\x01\x00\x00" + bytes([transparent]) + b"\x00"
    data += b"\x2c" + struct.pack("<HHHHB", left, top, indices.shape[1],
                                  indices.shape[0], 0)
    data += _gif_lzw(indices.ravel().tolist())
  return data + (b"\x3b" if trailer else b"")


def _top_down_bmp(rgb: np.ndarray) -> bytes:
  """A 24-bit BMP stored top row first (negative height)."""
  bmp = bytearray(_save(rgb, "BMP"))
  offset, = struct.unpack("<i", bmp[10:14])
  height = rgb.shape[0]
  row = len(bmp[offset:]) // height
  rows = [bmp[offset + i * row:offset + (i + 1) * row] for i in range(height)]
  bmp[offset:] = b"".join(reversed(rows))
  bmp[22:26] = struct.pack("<i", -height)
  return bytes(bmp)


@functools.lru_cache(maxsize=None)
def _images() -> dict:
  """Every case: name -> encoded bytes."""
  photo = _photo()
  ramp = (np.arange(photo.shape[1]) * 5 % 256).astype(np.uint8)
  alpha = np.dstack([photo, np.broadcast_to(ramp, photo.shape[:2])])
  grey = photo[..., 1]
  rgb16 = (photo.astype(np.uint16) * 257 + np.random.default_rng(1).integers(
      0, 256, photo.shape)).astype(np.uint16)
  cases = {}
  for subsampling in ("4:4:4", "4:2:2", "4:2:0", "4:1:1"):
    cases[f"jpeg {subsampling}"] = _save(photo, "JPEG", quality=88,
                                         subsampling=subsampling)
  cases["jpeg 4:4:0"] = simplejpeg.encode_jpeg(photo, 85,
                                               colorsubsampling="440")
  cases["jpeg progressive"] = _save(photo, "JPEG", quality=85,
                                    progressive=True)
  cases["jpeg restart markers"] = _save(photo, "JPEG", quality=85,
                                        restart_marker_blocks=3)
  cases["jpeg progressive restart rows"] = _save(
      photo, "JPEG", quality=85, progressive=True, restart_marker_rows=1)
  cases["jpeg grey"] = _save(grey, "JPEG", quality=85)
  cmyk = _save(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=90)
  cases["jpeg cmyk adobe"] = cmyk
  start = cmyk.find(b"\xff\xee")
  length, = struct.unpack(">H", cmyk[start + 2:start + 4])
  cases["jpeg cmyk no adobe"] = cmyk[:start] + cmyk[start + 2 + length:]
  cases["jpeg ycck"] = simplejpeg.encode_jpeg(
      np.dstack([photo, grey]), 85, colorspace="CMYK", colorsubsampling="420")
  # An RGB-coded JPEG: JFIF replaced by an Adobe marker with transform 0.
  plain = _save(photo, "JPEG", quality=90, subsampling="4:4:4")
  length, = struct.unpack(">H", plain[4:6])
  adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
  cases["jpeg rgb coded"] = plain[:2] + adobe + plain[4 + length:]

  png = _save(photo, "PNG")
  png16 = imagecodecs.png_encode(rgb16)
  cases["png rgb"] = png
  cases["png rgba"] = _save(alpha, "PNG")
  cases["png grey"] = _save(grey, "PNG")
  cases["png grey alpha"] = _save(Image.fromarray(grey).convert("LA"), "PNG")
  cases["png palette"] = _save(Image.fromarray(photo).convert("P"), "PNG")
  cases["png palette trns"] = _save(Image.fromarray(alpha).convert("P"), "PNG")
  cases["png 1-bit"] = _save(Image.fromarray(grey).convert("1"), "PNG")
  cases["png grey 16-bit"] = _save(Image.fromarray(rgb16[..., 0]), "PNG")
  cases["png rgb 16-bit"] = png16
  cases["png rgba 16-bit"] = imagecodecs.png_encode(
      np.dstack([rgb16, rgb16[..., 0]]))
  cases["png interlaced"] = _interlaced_png(photo)
  for gamma in (45455, 220000):
    chunk = _png_chunk(b"gAMA", struct.pack(">I", gamma))
    cases[f"png rgb gamma {gamma}"] = _with_chunk(png, chunk)
    cases[f"png rgb 16-bit gamma {gamma}"] = _with_chunk(png16, chunk)
  cases["png rgb sRGB"] = _with_chunk(png, _png_chunk(b"sRGB", b"\x00"))
  cases["png palette gamma"] = _with_chunk(
      cases["png palette"], _png_chunk(b"gAMA", struct.pack(">I", 45455)))
  cases["png rgb 16-bit gamma sBIT 12"] = _with_chunk(
      cases["png rgb 16-bit gamma 45455"], _png_chunk(b"sBIT", b"\x0c" * 3))

  rng = np.random.default_rng(7)
  palette = bytes(rng.integers(0, 256, 48, dtype=np.uint8))
  small, big = rng.integers(0, 16, (4, 5)), rng.integers(0, 16, (8, 10))
  cases["gif pillow"] = _save(photo, "GIF")  # Interlaced: 16 rows or more.
  cases["gif pillow transparency"] = _save(
      Image.fromarray(alpha).convert("P"), "GIF", transparency=0)
  cases["gif grey palette"] = _save(grey, "GIF")
  cases["gif transparent index"] = _gif((10, 8), palette, [(0, 0, big, 5)])
  cases["gif offset first frame"] = _gif((10, 8), palette,
                                         [(3, 2, small, None)])
  cases["gif small first frame, larger second"] = _gif(
      (10, 8), palette, [(7, 6, small, None), (0, 0, big, None)])
  frames = [Image.fromarray(photo), Image.fromarray(255 - photo)]
  cases["gif animated"] = _save(frames[0], "GIF", save_all=True,
                                append_images=frames[1:])
  cases["gif no trailer"] = _gif((10, 8), palette, [(0, 0, big, None)],
                                 trailer=False)

  cases["bmp 24-bit"] = _save(photo, "BMP")
  cases["bmp 32-bit"] = _save(alpha, "BMP")
  cases["bmp 8-bit grey"] = _save(grey, "BMP")
  cases["bmp 8-bit palette"] = _save(Image.fromarray(photo).convert("P"),
                                     "BMP")
  cases["bmp top-down"] = _top_down_bmp(photo)

  cases["webp lossless"] = _save(photo, "WEBP", lossless=True)
  cases["webp lossy"] = _save(photo, "WEBP", quality=75)
  cases["webp lossy alpha"] = _save(alpha, "WEBP", quality=75)
  return cases


@functools.lru_cache(maxsize=None)
def _animated_webp() -> bytes:
  frames = [Image.fromarray(_photo()), Image.fromarray(255 - _photo())]
  return _save(frames[0], "WEBP", save_all=True, append_images=frames[1:],
               lossless=True)


# What TensorFlow refuses and this decoder converts: (case, channels) ->
# the TensorFlow call a Keras user would write instead.
def _keras_users_workaround(data, channels):
  try:
    rgb = tf_reference.decode_image(data, 3)
  except ValueError:  # A WebP with alpha or animation: RGBA only.
    rgb = tf_reference.decode_image(data, 4)[..., :3]
  return rgb if channels == 3 else tf.image.rgb_to_grayscale(rgb).numpy()


def _refused_by_tensorflow(name, channels):
  if name.startswith(("gif", "bmp", "webp")) and channels == 1:
    return True
  if name.startswith(("jpeg cmyk", "jpeg ycck")) and channels == 1:
    return True
  return name == "webp lossy alpha"


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", list(_images()))
def test_pixels_are_tensorflows(name, channels):
  """uint8 pixels before the resize: tf.io.decode_image's, or where
  TensorFlow refuses, its own conversion of what it gives for RGB."""
  data = _images()[name]
  ours = keras_decoding.decode_pixels(data, channels)
  if _refused_by_tensorflow(name, channels):
    with pytest.raises(ValueError):
      tf_reference.decode_image(data, channels)
    expected = _keras_users_workaround(data, channels)
  else:
    expected = tf_reference.decode_image(data, channels)
  assert ours.dtype == np.uint8 and ours.shape == expected.shape
  np.testing.assert_array_equal(ours, expected)


def test_animated_webp_is_its_first_frame():
  """TensorFlow refuses an animated WebP at 3 channels and at 4 (and
  crashes the process at 0: "malloc(): invalid size"); this decoder gives
  the first frame as libwebp's animation decoder composes it."""
  data = _animated_webp()
  for channels in (3, 4):
    with pytest.raises(ValueError):
      tf_reference.decode_image(data, channels)
  first = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  np.testing.assert_array_equal(keras_decoding.decode_pixels(data, 3), first)
  np.testing.assert_array_equal(
      keras_decoding.decode_pixels(data, 1),
      tf.image.rgb_to_grayscale(first).numpy())


def test_the_restart_marker_cases_hold_restart_markers():
  for name in ("jpeg restart markers", "jpeg progressive restart rows"):
    data = _images()[name]
    assert b"\xff\xdd" in data  # DRI, the restart interval.
    assert any(bytes([0xFF, 0xD0 + n]) in data for n in range(8)), name


@pytest.mark.parametrize("step", [
    5, pytest.param(1, marks=pytest.mark.slow)])
def test_grey_conversion_is_rgb_to_grayscale(step):
  """On every colour (step 1, about 5 s) or every fifth level of each."""
  levels = np.arange(0, 256, step, dtype=np.uint8)
  rgb = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1)
  rgb = rgb.reshape(len(levels), -1, 3)
  np.testing.assert_array_equal(keras_decoding.tf_rgb_to_grayscale(rgb),
                                tf.image.rgb_to_grayscale(rgb).numpy())


SHAPES = [(1, 1), (1, 7), (5, 5), (17, 13), (45, 61), (128, 128), (375, 500)]
SIZES = [(1, 1), (3, 2), (32, 32), (180, 180), (224, 224), (7, 300)]


@pytest.mark.parametrize("channels", [1, 3])
def test_resize_is_tf_image_resize(channels):
  rng = np.random.default_rng(channels)
  for shape in SHAPES:
    images = rng.integers(0, 256, (2,) + shape + (channels,), np.uint8)
    for size in SIZES + [shape]:
      expected = tf.image.resize(images, size, method="bilinear").numpy()
      np.testing.assert_array_equal(
          keras_decoding.resize_bilinear(images, *size), expected)


@pytest.mark.parametrize("color_mode,size", [
    ("rgb", (224, 224)), ("rgb", (24, 20)), ("rgb", (45, 61)),
    ("grayscale", (180, 180)), ("grayscale", (16, 16))])
def test_batches_are_image_dataset_from_directorys(color_mode, size):
  """A mixed batch through BatchDecoder: TensorFlowDecoder's float32
  pixels, bad payloads reported in place, in groups or one by one."""
  channels = keras_decoding.CHANNELS[color_mode]
  names = [name for name in _images()
           if not _refused_by_tensorflow(name, channels)]
  payloads = [_images()[name] for name in names]
  photos = [_save(_photo(h, w, seed=h), "JPEG", quality=90)
            for h, w in ((128, 128), (375, 500), (128, 128), (30, 20))]
  payloads += photos
  expected = tf_reference.TensorFlowDecoder(*size, color_mode).decode_batch(
      payloads)
  bad = [b"", None, b"not an image", photos[0][:400]]
  mixed = payloads[:3] + bad + payloads[3:]
  decoder = preprocessing.BatchDecoder("tensorflow", *size, color_mode)
  pixels, good, errors = decoder.decode(mixed)
  assert [index for index, _ in errors] == [3, 4, 5, 6]
  assert good == [i for i in range(len(mixed)) if i not in (3, 4, 5, 6)]
  assert pixels.dtype == np.float32
  np.testing.assert_array_equal(pixels, expected)


def test_batches_resize_in_bounded_groups(monkeypatch):
  payloads = [_save(_photo(40, 50, seed=i), "PNG") for i in range(5)]
  decoder = keras_decoding.KerasImageDecoder(20, 20, "rgb")
  together, _, _ = decoder.decode_batch(payloads)
  calls = []
  resize = keras_decoding.resize_bilinear
  monkeypatch.setattr(keras_decoding, "RESIZE_GROUP_BYTES", 2 * 40 * 50 * 3)
  monkeypatch.setattr(keras_decoding, "resize_bilinear",
                      lambda images, *size, **out: calls.append(len(images))
                      or resize(images, *size, **out))
  grouped, _, _ = decoder.decode_batch(payloads)
  assert calls == [2, 2, 1]
  np.testing.assert_array_equal(grouped, together)


def _damaged():
  jpeg = _images()["jpeg 4:2:0"]
  progressive = _images()["jpeg progressive"]
  corrupt = bytearray(jpeg)
  corrupt[int(len(jpeg) * 0.7)] ^= 0x5A
  png, gif = _images()["png rgb"], _images()["gif animated"]
  bmp, webp = _images()["bmp 24-bit"], _images()["webp lossless"]
  return {
      "jpeg without its end marker": jpeg[:-2],
      "jpeg cut at 90%": jpeg[:int(len(jpeg) * 0.9)],
      "progressive jpeg cut at 60%": progressive[:int(len(progressive) * .6)],
      "jpeg with corrupt data": bytes(corrupt),
      "jpeg with trailing bytes": jpeg + b"trailing",
      "jpeg header only": jpeg[:200],
      "png without IEND": png[:-12],
      "png cut at 70%": png[:int(len(png) * 0.7)],
      "png with trailing bytes": png + b"trailing",
      "png with a bad ancillary CRC": _with_chunk(
          png, _png_chunk(b"tEXt", b"a\x00b")[:-4] + b"\x00\x00\x00\x01"),
      "gif cut in its second frame": gif[:int(len(gif) * 0.8)],
      "gif cut in its first frame": gif[:int(len(gif) * 0.3)],
      "bmp with 2 bytes more": bmp + b"\x00\x00",
      "bmp cut by 1 byte": bmp[:-1],
      "webp cut at 70%": webp[:int(len(webp) * 0.7)],
      "unknown format": b"RIFF\x00\x00\x00\x00WAVEfmt ",
  }


@pytest.mark.parametrize("name", list(_damaged()))
def test_damaged_files_are_refused_where_tensorflow_refuses_them(name):
  data = _damaged()[name]
  try:
    expected = tf_reference.decode_image(data, 3)
  except ValueError:
    expected = None
  if expected is None:
    with pytest.raises(ValueError):
      keras_decoding.decode_pixels(data, 3)
  else:
    np.testing.assert_array_equal(keras_decoding.decode_pixels(data, 3),
                                  expected)


ACCEPTED_DAMAGE = ("jpeg with corrupt data", "jpeg with trailing bytes",
                   "png with trailing bytes", "png with a bad ancillary CRC",
                   "gif cut in its second frame")


def test_bad_files_are_one_line_errors_and_nothing_on_stderr(capfd, caplog):
  """TensorFlow's decoders print libjpeg's, libpng's and their own log
  lines (`jpeg_mem.cc ... Premature end of JPEG data`); these print and
  log nothing, for bad files and for files a library warns about."""
  decoder = keras_decoding.KerasImageDecoder(16, 16, "grayscale")
  damaged = _damaged()
  for name in ACCEPTED_DAMAGE + ("png interlaced",):
    decoder.decode(damaged.get(name) or _images()[name])
  for name, data in list(damaged.items()) + [("empty", b""), ("null", None)]:
    if name in ACCEPTED_DAMAGE:
      continue
    with pytest.raises(ValueError) as raised:
      decoder.decode(data)
    assert "\n" not in str(raised.value) and str(raised.value), name
  captured = capfd.readouterr()
  assert captured.err == "" and captured.out == ""
  assert not caplog.records


def test_large_images_are_refused_from_their_header(monkeypatch):
  def no_decoding(*_):
    raise AssertionError("decoded an image above the limit")

  for kind in ("jpeg", "png", "gif", "bmp", "webp"):
    monkeypatch.setitem(keras_decoding._DECODERS, kind, no_decoding)  # pylint: disable=protected-access
  for data in [_images()[name] for name in (
      "jpeg 4:2:0", "png rgb", "gif pillow", "bmp 24-bit", "webp lossy",
      "webp lossless", "webp lossy alpha")] + [_animated_webp()]:
    with pytest.raises(Image.DecompressionBombError, match="61x45 pixels"):
      keras_decoding.decode_pixels(data, 3, max_pixels=61 * 45 - 1)


def test_tensorflow_recipe_needs_no_tensorflow():
  """BatchDecoder("tensorflow") in a process where TensorFlow cannot be
  imported gives the pixels it gives here."""
  payloads = [_images()[name] for name in ("jpeg 4:2:0", "png rgba",
                                           "gif pillow", "webp lossy")]
  expected, _, _ = preprocessing.BatchDecoder(
      "tensorflow", 32, 24, "rgb").decode(payloads)
  script = (
      "import sys, pickle\n"
      "sys.modules['tensorflow'] = sys.modules['keras'] = None\n"
      "from model import preprocessing\n"
      "payloads = pickle.load(sys.stdin.buffer)\n"
      "pixels, good, errors = preprocessing.BatchDecoder(\n"
      "    'tensorflow', 32, 24, 'rgb').decode(payloads)\n"
      "assert not errors, errors\n"
      "sys.stdout.buffer.write(pixels.tobytes())\n")
  import pickle  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", script],
                          input=pickle.dumps(payloads), capture_output=True,
                          cwd=REPO, env=env, check=False)
  assert result.returncode == 0, result.stderr.decode()[-2000:]
  pixels = np.frombuffer(result.stdout, np.float32).reshape(expected.shape)
  np.testing.assert_array_equal(pixels, expected)


def test_a_tensorflow_recipe_card_goes_to_dataflow_with_setup_file():
  """Only the keras and savedmodel engines need TensorFlow on a worker: a
  TFLite folder with the `tensorflow` decoder recipe passes the launcher's
  check with --setup_file (the slim install)."""
  from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel
  from beam_jobs import preflight  # pylint: disable=import-outside-toplevel
  card = type("Card", (), {"decoder": "tensorflow"})()
  assert not engines.needs_tensorflow(card, "tflite")
  assert engines.needs_tensorflow(card, "keras")
  assert engines.needs_tensorflow(card, "savedmodel")
  options = pipeline_options.PipelineOptions(
      ["--runner", "DataflowRunner", "--setup_file", "./setup.py"])
  tflite = type("Config", (), {"engine": "tflite"})()
  preflight.check_workers(tflite, card, options)
  keras = type("Config", (), {"engine": "keras"})()
  with pytest.raises(preflight.ConfigError, match="--engine keras needs"):
    preflight.check_workers(keras, card, options)
