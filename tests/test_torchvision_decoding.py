"""model.torchvision_decoding against a hand-written PIL pipeline.

The reference below is written from torchvision's documented behaviour with
other arithmetic (integer division for the long side, an integer rule for
rounding halves to even, PIL's own zero-filled crop for padding), so the
two do not share a mistake. Parity with torch itself is measured in the
benchmark, in a venv that has it.
"""

import io

import numpy as np
import pytest
from PIL import Image

from model import preprocessing
from model import torchvision_decoding

FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR,
           "bicubic": Image.BICUBIC, "box": Image.BOX,
           "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}
# (width, height): odd sizes, both orientations, both sides smaller than
# the crop, one side smaller.
SIZES = [(37, 23), (23, 37), (300, 200), (201, 301), (41, 41), (27, 60),
         (10, 7), (30, 12)]


def _half_even(excess: int) -> int:
  """Half of `excess`, a half rounded to the even neighbour."""
  half = excess // 2
  if excess % 2 and half % 2:
    half += 1
  return half


def reference(data: bytes, color_mode: str, resize, crop, interpolation,
              rounding: str = "half_even") -> np.ndarray:
  image = Image.open(io.BytesIO(data)).convert("RGB")
  if color_mode == "grayscale":
    image = image.convert("L")
  width, height = image.size
  if isinstance(resize, int):
    if width <= height:
      size = (resize, resize * height // width)
    else:
      size = (resize * width // height, resize)
  elif resize is not None:
    size = (resize[1], resize[0])
  else:
    size = image.size
  if size != image.size:
    image = image.resize(size, FILTERS[interpolation])
  if crop is not None:
    crop_height, crop_width = (crop, crop) if isinstance(crop, int) else crop
    offsets = []
    for have, want in ((image.width, crop_width),
                       (image.height, crop_height)):
      if have >= want:
        offsets.append(_half_even(have - want) if rounding == "half_even"
                       else (have - want) // 2)
      else:  # padded: torchvision puts the odd pixel after, HF before
        excess = want - have
        offsets.append(-(excess // 2) if rounding == "half_even"
                       else -((excess + 1) // 2))
    left, top = offsets
    image = image.crop((left, top, left + crop_width, top + crop_height))
  pixels = np.asarray(image)
  return pixels.reshape(pixels.shape[0], pixels.shape[1], -1)


def encoded(width: int, height: int, seed: int = 0, fmt: str = "PNG",
            mode: str = "RGB") -> bytes:
  """Noise over gradients: every filter gives different pixels."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                   (x + y) * 127 // max(1, width + height - 2)], axis=-1)
  pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(
      np.uint8)
  image = Image.fromarray(pixels).convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


@pytest.mark.parametrize("interpolation", sorted(FILTERS))
@pytest.mark.parametrize("color_mode", ["rgb", "grayscale"])
def test_resize_then_center_crop_matches_the_reference(interpolation,
                                                       color_mode):
  decoder = torchvision_decoding.TorchvisionDecoder(
      27, 24, interpolation, color_mode, 24, 24)
  payloads = [encoded(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
  payloads.append(encoded(45, 31, 9, fmt="JPEG"))
  pixels, good, errors = decoder.decode(payloads)
  assert not errors and good == list(range(len(payloads)))
  assert pixels.dtype == np.uint8
  for data, got in zip(payloads, pixels):
    np.testing.assert_array_equal(
        got, reference(data, color_mode, 27, 24, interpolation))


def test_torchvision_size_rule_and_crop_rounding():
  # Resize(256) of 500x375: the long side is int(256 * 500 / 375) = 341.
  assert torchvision_decoding.resized_size(375, 500, 256) == (256, 341)
  assert torchvision_decoding.resized_size(500, 375, [256]) == (341, 256)
  assert torchvision_decoding.resized_size(10, 20, (7, 9)) == (7, 9)
  # CenterCrop(224): 341 - 224 = 117 starts at 58, 343 - 224 = 119 at 60.
  for width, left in ((341, 58), (343, 60), (342, 59)):
    pixels = np.arange(width, dtype=np.int32)[None, :, None].repeat(224, 0)
    assert torchvision_decoding.center_crop(pixels, 224)[0, 0, 0] == left
    floor = torchvision_decoding.center_crop(pixels, 224, "floor")
    assert floor[0, 0, 0] == (width - 224) // 2


@pytest.mark.parametrize("rounding", ["half_even", "floor"])
def test_exact_resize_and_crop_with_padding(rounding):
  exact = torchvision_decoding.TorchvisionDecoder(
      (20, 30), None, "bicubic", "rgb", 20, 30, crop_rounding=rounding)
  crop_only = torchvision_decoding.TorchvisionDecoder(
      None, (24, 25), "bilinear", "rgb", 24, 25, crop_rounding=rounding)
  payloads = [encoded(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
  for data, got in zip(payloads, exact.decode(payloads)[0]):
    np.testing.assert_array_equal(got, reference(data, "rgb", (20, 30), None,
                                                 "bicubic", rounding))
  for data, got in zip(payloads, crop_only.decode(payloads)[0]):
    np.testing.assert_array_equal(got, reference(data, "rgb", None, (24, 25),
                                                 "bilinear", rounding))


def test_an_image_at_the_resize_size_is_not_resampled():
  data = encoded(40, 27, 3)
  decoder = torchvision_decoding.TorchvisionDecoder(27, 27, "lanczos", "rgb",
                                                    27, 27)
  original = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  np.testing.assert_array_equal(decoder.decode_one(data),
                                original[:, 6:33])


def test_no_exif_rotation_and_alpha_dropped_as_imagefolder_does():
  image = Image.fromarray(np.random.default_rng(5).integers(
      0, 256, (12, 20, 3), dtype=np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees when displayed
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
  jpeg = buffer.getvalue()
  decoder = torchvision_decoding.TorchvisionDecoder(None, None, "bilinear",
                                                    "rgb", 12, 20)
  np.testing.assert_array_equal(
      decoder.decode_one(jpeg),
      np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
  rgba = np.zeros((12, 20, 4), np.uint8)
  rgba[..., 0] = 200  # red under full transparency
  buffer = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
  assert decoder.decode_one(buffer.getvalue())[0, 0].tolist() == [200, 0, 0]


def test_grayscale_of_palette_and_gif_images_matches_the_reference():
  decoder = torchvision_decoding.TorchvisionDecoder(16, 16, "bilinear",
                                                    "grayscale", 16, 16)
  for data in (encoded(33, 21, 6, fmt="GIF"), encoded(21, 33, 7, mode="P")):
    np.testing.assert_array_equal(
        decoder.decode_one(data),
        reference(data, "grayscale", 16, 16, "bilinear"))


def test_the_batch_contract_one_error_per_bad_image():
  decoder = torchvision_decoding.TorchvisionDecoder(
      None, None, "bilinear", "rgb", 8, 8, max_pixels=100)
  payloads = [encoded(8, 8, 1), b"not an image", None, b"", encoded(9, 8, 2),
              encoded(20, 20, 3), encoded(8, 8, 4)]
  pixels, good, errors = decoder.decode(payloads)
  assert good == [0, 6] and pixels.shape == (2, 8, 8, 3)
  assert [index for index, _ in errors] == [1, 2, 3, 4, 5]
  messages = {index: str(error) for index, error in errors}
  assert "null image cell" in messages[2]
  assert "zero bytes" in messages[3]
  assert "9x8" in messages[4] and "8x8" in messages[4]
  assert "exceeds the limit of 100 pixels" in messages[5]


@pytest.mark.parametrize("arguments, message", [
    ((256, None, "bilinear", "rgb", 224, 224), "sets only the shorter side"),
    ((256, 200, "bilinear", "rgb", 224, 224), "does not give"),
    (((200, 100), None, "bilinear", "rgb", 224, 224), "does not give"),
    ((256, 224, "area", "rgb", 224, 224), "interpolation"),
    ((256, 224, "bilinear", "cmyk", 224, 224), "color_mode"),
])
def test_recipes_that_do_not_end_at_the_model_size_are_refused(arguments,
                                                               message):
  with pytest.raises(ValueError, match=message):
    torchvision_decoding.TorchvisionDecoder(*arguments)


def _exact_float32(operation, a, b):
  """One float32 operation rounded once (IEEE): float64 holds every float32
  sum, difference and quotient closely enough that rounding it to float32
  is the correctly rounded result (53 >= 2 * 24 + 2)."""
  return operation(np.float64(a), np.float64(b)).astype(np.float32)


@pytest.mark.parametrize("input_scale, mean, std", [
    ("torch", preprocessing.TORCH_MEAN, preprocessing.TORCH_STD),
    ("symmetric", (0.5,) * 3, (0.5,) * 3),
    ("unit", (0.0,) * 3, (1.0,) * 3),
])
def test_scale_pixels_is_to_tensor_and_normalize_bit_for_bit(input_scale,
                                                             mean, std):
  # torchvision on the CPU: ToTensor() is uint8 -> float32, then div(255);
  # Normalize is sub_(mean) then div_(std), float32 tensors; ATen divides
  # (no reciprocal) for float32 on the CPU. Every uint8 value is checked.
  values = np.arange(256, dtype=np.float32)
  expected = np.stack([
      _exact_float32(np.divide, _exact_float32(
          np.subtract, _exact_float32(np.divide, values, 255.0),
          np.float32(m)), np.float32(s)) for m, s in zip(mean, std)], axis=-1)
  pixels = np.repeat(values[:, None], 3, axis=1)[None, None]
  got = preprocessing.scale_pixels(pixels, input_scale)[0, 0]
  np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


def test_a_card_preprocessing_block_builds_the_decoder():
  fields = {"decoder": "torchvision", "input_scale": "torch",
            "layout": "NCHW", "resize": 27, "center_crop": [24, 24],
            "interpolation": "bicubic"}
  decoder = torchvision_decoding.TorchvisionDecoder.from_card(fields, "rgb",
                                                              24, 24)
  data = encoded(37, 23, 1)
  np.testing.assert_array_equal(decoder.decode_one(data),
                                reference(data, "rgb", 27, 24, "bicubic"))
  with pytest.raises(ValueError, match="does not give"):
    torchvision_decoding.TorchvisionDecoder.from_card(fields, "rgb", 28, 28)
