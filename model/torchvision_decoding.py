"""The image recipe of a model trained in PyTorch: torchvision's, on PIL.

What a PyTorch author's evaluation loader does to a file before
`ToTensor()`, reproduced pixel for pixel (uint8, (H, W, C)):

* decode as torchvision's `ImageFolder` does (`datasets.folder.pil_loader`):
  `PIL.Image.open(f).convert("RGB")`, first frame, no EXIF rotation, alpha
  dropped (not composited). Grayscale is `transforms.Grayscale()` after it:
  `.convert("L")` of the RGB image (an "L" image is kept as it is, which is
  the same);
* `transforms.Resize(N)` on a PIL image: the shorter side becomes N and the
  longer `int(N * long / short)` (torchvision's
  `_compute_resized_output_size`, `max_size` None); `Resize((h, w))` is that
  size exactly; an image already at the size is not resampled. PIL's
  resample, which antialiases, with the named interpolation;
* `transforms.CenterCrop(M)`: an image smaller than M is first padded with
  zeros (`(M - w) // 2` left, `(M - w + 1) // 2` right, the same for top and
  bottom), then cropped at `int(round((h - M) / 2.0))` from the top and the
  left. Python's `round` rounds halves to even, so 117 / 2 gives 58 and
  119 / 2 gives 60. Hugging Face's image processors crop at `(h - M) // 2`
  instead and pad with `ceil` on the top and left (`crop_rounding` "floor").

`ToTensor()` and `Normalize(mean, std)` are not here: the engine applies the
card's `input_scale` (`preprocessing.scale_pixels`), which computes
`(x / 255 - mean) / std` in float32, as torchvision does on the CPU.
"""

import math
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from model import image_limits

# The names torchvision's InterpolationMode gives PIL's resampling filters.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
# transforms.Resize's default.
DEFAULT_INTERPOLATION = "bilinear"
# Where a centre crop starts: torchvision's int(round(d / 2)) or Hugging
# Face's d // 2.
CROP_ROUNDINGS = ("half_even", "floor")
_CHANNELS = {"grayscale": 1, "rgb": 3}
# The card's `preprocessing` keys for this decoder (beside `decoder:
# torchvision`): resize is N or [height, width], center_crop [height, width]
# (or null for either), interpolation one of INTERPOLATIONS, crop_rounding
# one of CROP_ROUNDINGS (absent: half_even).
CARD_FIELDS = ("resize", "center_crop", "interpolation", "crop_rounding")

Size = Union[int, Sequence[int]]


def _pair(size: Size, name: str) -> tuple:
  """(height, width) of a crop size: an int, or one or two ints."""
  values = [size] if isinstance(size, int) else list(size)
  if len(values) == 1:
    values = values * 2
  if len(values) != 2 or not all(
      isinstance(v, int) and not isinstance(v, bool) and v > 0
      for v in values):
    raise ValueError(f"{name} must be a positive int or (height, width), got "
                     f"{size!r}")
  return tuple(values)


def resized_size(height: int, width: int, resize: Size) -> tuple:
  """(height, width) after `transforms.Resize(resize)` on a PIL image: an
  int (or one int) sets the shorter side, two ints the size."""
  if not isinstance(resize, int) and len(resize) == 2:
    return tuple(resize)
  size = resize if isinstance(resize, int) else resize[0]
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(size * long / short)
  return (new_long, size) if width <= height else (size, new_long)


def _crop_offset(excess: int, rounding: str) -> int:
  if rounding == "floor":
    return excess // 2
  return int(round(excess / 2.0))


def center_crop(pixels: np.ndarray, size: Size,
                rounding: str = "half_even") -> np.ndarray:
  """`transforms.CenterCrop(size)` (or, with rounding "floor", Hugging
  Face's `center_crop`) of (H, W, C) pixels."""
  crop_height, crop_width = _pair(size, "center_crop")
  height, width = pixels.shape[:2]
  if crop_height <= height and crop_width <= width:
    top = _crop_offset(height - crop_height, rounding)
    left = _crop_offset(width - crop_width, rounding)
    return pixels[top:top + crop_height, left:left + crop_width]
  if rounding == "floor":
    # Hugging Face: pad to at least the crop, ceil of half the excess on the
    # top and left, then crop from the shifted floor offsets.
    top_pad = math.ceil(max(0, crop_height - height) / 2)
    left_pad = math.ceil(max(0, crop_width - width) / 2)
    padded = np.zeros((max(height, crop_height), max(width, crop_width)) +
                      pixels.shape[2:], pixels.dtype)
    padded[top_pad:top_pad + height, left_pad:left_pad + width] = pixels
    top = (height - crop_height) // 2 + top_pad
    left = (width - crop_width) // 2 + left_pad
    return padded[max(0, top):top + crop_height, max(0, left):left + crop_width]
  # torchvision: pad with zeros, the extra pixel of an odd excess on the
  # right and bottom, then crop as usual.
  pad_height, pad_width = max(0, crop_height - height), max(0, crop_width -
                                                            width)
  padded = np.pad(pixels, ((pad_height // 2, (pad_height + 1) // 2),
                           (pad_width // 2, (pad_width + 1) // 2)) +
                  ((0, 0),) * (pixels.ndim - 2))
  return center_crop(padded, (crop_height, crop_width), rounding)


def torchvision_pixels(image: Image.Image, color_mode: str,
                       resize: Optional[Size] = None,
                       center_crop_size: Optional[Size] = None,
                       interpolation: str = DEFAULT_INTERPOLATION,
                       crop_rounding: str = "half_even") -> np.ndarray:
  """An opened image through the recipe in the module docstring: uint8
  (H, W, C)."""
  if color_mode == "grayscale":
    image = image if image.mode == "L" else image.convert("RGB").convert("L")
  else:
    image = image.convert("RGB")
  if resize is not None:
    height, width = resized_size(image.height, image.width, resize)
    if (height, width) != (image.height, image.width):
      image = image.resize((width, height), INTERPOLATIONS[interpolation])
  pixels = np.asarray(image, dtype=np.uint8)
  if pixels.ndim == 2:
    pixels = pixels[:, :, np.newaxis]
  if center_crop_size is not None:
    pixels = center_crop(pixels, center_crop_size, crop_rounding)
  return pixels


class TorchvisionDecoder:
  """Decodes batches of encoded images with the recipe in the module
  docstring, to uint8 (N, height, width, C).

  `decode` has `preprocessing.BatchDecoder.decode`'s contract: the pixels of
  the images that decoded, their indices in the batch, and an (index,
  exception) pair for each that did not. Each image's header is read first
  (`image_limits.open_checked`), so one above `max_pixels` is refused
  before its pixels are decoded.

  The recipe must end at the model's size: `center_crop` equal to it, or
  `resize` to it exactly; with neither, each image must already be that
  size (as a model fed ToTensor() alone needs), and any other is an error.
  """

  def __init__(self, resize: Optional[Size], center_crop: Optional[Size],
               interpolation: str, color_mode: str, height: int, width: int,
               max_pixels: Optional[int] = (
                   image_limits.DEFAULT_MAX_IMAGE_PIXELS),
               crop_rounding: str = "half_even"):
    if interpolation not in INTERPOLATIONS:
      raise ValueError(f"interpolation must be one of "
                       f"{sorted(INTERPOLATIONS)}, got {interpolation!r}")
    if color_mode not in _CHANNELS:
      raise ValueError(f"color_mode must be one of {sorted(_CHANNELS)}, got "
                       f"{color_mode!r}")
    if crop_rounding not in CROP_ROUNDINGS:
      raise ValueError(f"crop_rounding must be one of {CROP_ROUNDINGS}, got "
                       f"{crop_rounding!r}")
    if resize is not None:
      values = [resize] if isinstance(resize, int) else list(resize)
      if len(values) not in (1, 2):
        raise ValueError(f"resize must be N or (height, width), got "
                         f"{resize!r}")
      _pair(values, "resize")
    size = (height, width)
    if center_crop is not None and _pair(center_crop, "center_crop") != size:
      raise ValueError(f"center_crop {center_crop} does not give the model's "
                       f"input size {height}x{width}")
    if center_crop is None and resize is not None:
      if isinstance(resize, int) or len(resize) == 1:
        raise ValueError(f"resize {resize} alone sets only the shorter side; "
                         f"pass center_crop {height} (or {height},{width}) or "
                         f"resize {height},{width}")
      if tuple(resize) != size:
        raise ValueError(f"resize {tuple(resize)} does not give the model's "
                         f"input size {height}x{width}")
    self._resize = resize
    self._center_crop = center_crop
    self._interpolation = interpolation
    self._color_mode = color_mode
    self._crop_rounding = crop_rounding
    self._shape = size + (_CHANNELS[color_mode],)
    self._max_pixels = max_pixels

  @classmethod
  def from_card(cls, preprocessing_fields: dict, color_mode: str,
                height: int, width: int,
                max_pixels: Optional[int] = (
                    image_limits.DEFAULT_MAX_IMAGE_PIXELS)
               ) -> "TorchvisionDecoder":
    """The decoder a card's `preprocessing` (CARD_FIELDS) describes; a
    ValueError of one line if those fields are not a recipe ending at the
    card's input size, so a card can be validated by building one."""
    return cls(preprocessing_fields.get("resize"),
               preprocessing_fields.get("center_crop"),
               preprocessing_fields.get("interpolation", DEFAULT_INTERPOLATION),
               color_mode, height, width, max_pixels,
               preprocessing_fields.get("crop_rounding", "half_even"))

  def decode_one(self, data: bytes) -> np.ndarray:
    """One image's pixels; raises for bytes that are not a readable image,
    one above the pixel limit, or one that does not end at the model's
    size."""
    if data is None:
      raise ValueError("null image cell")
    if not data:
      raise ValueError("empty image: zero bytes")
    with image_limits.open_checked(data, self._max_pixels) as image:
      pixels = torchvision_pixels(image, self._color_mode, self._resize,
                                  self._center_crop, self._interpolation,
                                  self._crop_rounding)
    if pixels.shape != self._shape:
      raise ValueError(f"image is {pixels.shape[1]}x{pixels.shape[0]} but the "
                       f"model takes {self._shape[1]}x{self._shape[0]} and "
                       "its recipe has no resize or center crop")
    return pixels

  def decode(self, payloads: list):
    pixels = np.empty((len(payloads),) + self._shape, dtype=np.uint8)
    good, errors = [], []
    for index, data in enumerate(payloads):
      try:
        pixels[len(good)] = self.decode_one(data)
        good.append(index)
      except Exception as error:  # pylint: disable=broad-except
        errors.append((index, error))
    return pixels[:len(good)], good, errors
