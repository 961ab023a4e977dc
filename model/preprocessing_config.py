"""Preprocessing read from a PyTorch author's own files.

`read_preprocessing_config(path)` reads one of

* a timm model's `config.json` (its `pretrained_cfg`) or a bare
  `pretrained_cfg`: `input_size`, `interpolation`, `crop_pct`, `crop_mode`,
  `mean`, `std`, with timm's defaults (`resolve_data_config`: bicubic,
  crop_pct 0.875, ImageNet mean and std). Evaluation is timm's
  `transforms_imagenet_eval`: `Resize(floor(size / crop_pct))` then
  `CenterCrop(size)`; crop_mode "squash" resizes both sides to
  `floor(side / crop_pct)`;
* a Hugging Face `preprocessor_config.json` for the PIL image processors:
  `size` (an int, `{shortest_edge}` or `{height, width}`), `crop_size` with
  `do_center_crop` (cropped at `(h - M) // 2`: crop_rounding "floor"),
  `resample` (PIL's codes), `do_rescale` with `rescale_factor`,
  `do_normalize` with `image_mean` and `image_std`, and ConvNeXt's
  `crop_pct` (resize the shorter side to `int(shortest_edge / crop_pct)`,
  then crop `shortest_edge`, below 384);

and returns the flags they imply, each with where it came from.
`merge_flags(from_file, explicit)` adds the flags given by hand and refuses
any that contradicts the file. Anything the file asks for that the
torchvision decoder cannot reproduce is refused, in one line, rather than
served differently. The file is untrusted: its size and nesting are
bounded before it is parsed.
"""

import dataclasses
import json
import math
import os
from typing import Optional

import numpy as np

from model import model_checks
from model import preprocessing
from model import torchvision_decoding

MAX_CONFIG_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
# timm's defaults (timm/data/config.py, resolve_data_config).
TIMM_DEFAULT_INTERPOLATION = "bicubic"
TIMM_DEFAULT_CROP_PCT = 0.875
# PIL's resampling codes, which Hugging Face configs store as `resample`.
PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic",
                      4: "box", 5: "hamming"}
# Hugging Face processors for which an int `size` is the shorter side
# (get_size_dict(default_to_square=False)); for these it is a square.
_HF_INT_SIZE_SHORTEST = ("ConvNextImageProcessor", "CLIPImageProcessor",
                         "BitImageProcessor", "MobileNetV1ImageProcessor",
                         "MobileNetV2ImageProcessor")
_HF_INT_SIZE_SQUARE = ("ViTImageProcessor", "DeiTImageProcessor",
                       "BeitImageProcessor")
# Hugging Face switches this module reproduces; any other `do_*` switch that
# is on changes the pixels in a way it does not, and is refused.
_HF_SWITCHES = ("do_resize", "do_center_crop", "do_rescale", "do_normalize",
                "do_convert_rgb")
# Other Hugging Face keys that change the pixels and are not reproduced.
_HF_UNSUPPORTED = ("rescale_offset", "include_top", "size_divisor",
                   "size_divisibility")
# Keys that mark a Hugging Face image processor's config (as do "do_*").
_HF_KEYS = ("image_processor_type", "feature_extractor_type", "image_mean",
            "image_std", "resample", "crop_size", "rescale_factor")
# ConvNeXt's processor resizes without cropping from this size up.
_CONVNEXT_NO_CROP_FROM = 384

_SCALE_FLAGS = ("input_scale", "input_mean", "input_std")
FLAG_NAMES = ("resize", "center_crop", "interpolation", "crop_rounding",
              "input_scale", "input_mean", "input_std", "image_size",
              "color_mode")


@dataclasses.dataclass(frozen=True)
class PreprocessingFlags:
  """Flag values (None where not set) and where each came from."""
  resize: Optional[object] = None  # N, or [height, width]
  center_crop: Optional[list] = None  # [height, width]
  interpolation: Optional[str] = None
  crop_rounding: Optional[str] = None  # torchvision_decoding.CROP_ROUNDINGS
  input_scale: Optional[str] = None
  input_mean: Optional[list] = None  # pixel units, for input_scale custom
  input_std: Optional[list] = None
  image_size: Optional[list] = None  # [height, width]
  color_mode: Optional[str] = None
  provenance: dict = dataclasses.field(default_factory=dict)

  def values(self) -> dict:
    return {name: getattr(self, name) for name in FLAG_NAMES}


def _load_json(path: str):
  """The parsed file, after bounding its size and nesting."""
  name = os.path.basename(path)
  size = os.path.getsize(path)
  if size > MAX_CONFIG_BYTES:
    raise ValueError(f"{name} is {size:,} bytes, above the limit of "
                     f"{MAX_CONFIG_BYTES:,} for a preprocessing config")
  with open(path, "rb") as handle:
    raw = handle.read(MAX_CONFIG_BYTES + 1)
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    raise ValueError(f"{name} is not UTF-8 JSON") from None
  # Nesting, counted outside strings before parsing: the parser recurses.
  if model_checks.json_depth(text) > MAX_JSON_DEPTH:
    raise ValueError(f"{name} nests deeper than {MAX_JSON_DEPTH} levels")

  def refuse_constant(constant):
    raise ValueError(f"{name} holds {constant}, which is not a number")

  try:
    return json.loads(text, parse_constant=refuse_constant)
  except json.JSONDecodeError as error:
    raise ValueError(f"{name} is not valid JSON: {error}") from None


def read_preprocessing_config(path: str) -> PreprocessingFlags:
  """The flags a timm or Hugging Face preprocessing file implies."""
  name = os.path.basename(path)
  data = _load_json(path)
  if not isinstance(data, dict):
    raise ValueError(f"{name} is not a JSON object")
  if isinstance(data.get("pretrained_cfg"), dict):
    return _timm_flags(data["pretrained_cfg"], f"{name} pretrained_cfg")
  if "input_size" in data:
    return _timm_flags(data, name)
  if any(key in _HF_KEYS or key.startswith("do_") for key in data):
    return _hugging_face_flags(data, name)
  raise ValueError(f"{name} is neither a timm config (pretrained_cfg, "
                   "input_size) nor a Hugging Face preprocessor_config.json")


def _number_list(value, length: int, what: str) -> list:
  if (not isinstance(value, (list, tuple)) or len(value) not in (1, length)
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and
                 math.isfinite(v) for v in value)):
    raise ValueError(f"{what} must be {length} numbers, got {value!r}")
  return [float(v) for v in value] * (length if len(value) == 1 else 1)


def _positive_int(value, what: str) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{what} must be a positive integer, got {value!r}")
  return value


def scale_from_mean_std(mean: list, std: list, unit: bool,
                        where: str) -> dict:
  """input_scale (and mean and std in pixel units for custom) for pixels
  divided by 255 when `unit`, then normalised with mean and std."""
  if any(s <= 0 for s in std):
    raise ValueError(f"{where}: std must be positive, got {std}")
  channels = len(mean)
  as_f32 = lambda values: np.asarray(values, np.float32).tolist()
  if unit:
    known = {"torch": (preprocessing.TORCH_MEAN, preprocessing.TORCH_STD),
             "symmetric": ((0.5,) * channels, (0.5,) * channels),
             "unit": ((0.0,) * channels, (1.0,) * channels)}
    for scale, (known_mean, known_std) in known.items():
      if (len(known_mean) == channels and as_f32(mean) == as_f32(known_mean)
          and as_f32(std) == as_f32(known_std)):
        return {"input_scale": scale}
    mean, std = [m * 255.0 for m in mean], [s * 255.0 for s in std]
  if all(m == 0 for m in mean) and all(s == 1 for s in std):
    return {"input_scale": "raw"}
  return {"input_scale": "custom", "input_mean": mean, "input_std": std}


def _timm_flags(cfg: dict, where: str) -> PreprocessingFlags:
  input_size = cfg.get("input_size") or [3, 224, 224]
  if (not isinstance(input_size, (list, tuple)) or len(input_size) != 3):
    raise ValueError(f"{where}: input_size must be [channels, height, width],"
                     f" got {input_size!r}")
  channels, height, width = [_positive_int(v, f"{where}: input_size")
                             for v in input_size]
  if channels not in (1, 3):
    raise ValueError(f"{where}: input_size has {channels} channels; "
                     "grayscale (1) or RGB (3) only")
  interpolation = cfg.get("interpolation") or TIMM_DEFAULT_INTERPOLATION
  if interpolation not in torchvision_decoding.INTERPOLATIONS:
    raise ValueError(f"{where}: interpolation {interpolation!r} is not one of "
                     f"{sorted(torchvision_decoding.INTERPOLATIONS)}")
  crop_pct = cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT
  if (not isinstance(crop_pct, (int, float)) or isinstance(crop_pct, bool)
      or not 0 < crop_pct <= 4):
    raise ValueError(f"{where}: crop_pct must be a number in (0, 4], got "
                     f"{crop_pct!r}")
  crop_mode = cfg.get("crop_mode") or "center"
  if cfg.get("crop_border_pixels"):
    raise ValueError(f"{where}: crop_border_pixels is not reproduced; "
                     "refused rather than served differently")
  if crop_mode == "squash":
    resize = [math.floor(height / crop_pct), math.floor(width / crop_pct)]
    resize_key = "input_size, crop_pct, crop_mode squash"
  elif crop_mode == "center" and height == width:
    resize = math.floor(height / crop_pct)
    resize_key = "input_size, crop_pct"
  elif crop_mode == "center":
    raise ValueError(f"{where}: a non-square input_size {height}x{width} is "
                     "resized by timm's ResizeKeepRatio, which is not "
                     "reproduced")
  else:
    raise ValueError(f"{where}: crop_mode {crop_mode!r} is not reproduced "
                     "(center and squash are)")
  mean = _number_list(cfg.get("mean") or preprocessing.TORCH_MEAN, channels,
                      f"{where}: mean")
  std = _number_list(cfg.get("std") or preprocessing.TORCH_STD, channels,
                     f"{where}: std")
  scale = scale_from_mean_std(mean, std, unit=True, where=where)
  provenance = {
      "resize": f"{where}: {resize_key}",
      "center_crop": f"{where}: input_size",
      "interpolation": f"{where}: interpolation" if cfg.get(
          "interpolation") else f"{where}: timm's default interpolation",
      "crop_rounding": f"{where}: timm crops with torchvision's CenterCrop",
      "image_size": f"{where}: input_size",
      "color_mode": f"{where}: input_size",
  }
  for field in scale:
    provenance[field] = f"{where}: mean, std"
  return PreprocessingFlags(
      resize=resize, center_crop=[height, width], interpolation=interpolation,
      crop_rounding="half_even", image_size=[height, width],
      color_mode="rgb" if channels == 3 else "grayscale",
      provenance=provenance, **scale)


def _hf_size(value, processor: str, where: str) -> tuple:
  """(resize flag, what the key said) for a Hugging Face `size`."""
  if isinstance(value, int) and not isinstance(value, bool):
    if processor in _HF_INT_SIZE_SHORTEST:
      return _positive_int(value, f"{where}: size"), "size (shorter side)"
    if processor in _HF_INT_SIZE_SQUARE:
      side = _positive_int(value, f"{where}: size")
      return [side, side], "size (square)"
    raise ValueError(f"{where}: an int size {value} means the shorter side "
                     f"or a square depending on the processor, and "
                     f"{processor or 'no image_processor_type'} is not one "
                     "this reads; write size as {shortest_edge} or "
                     "{height, width}")
  if isinstance(value, dict) and set(value) == {"shortest_edge"}:
    return _positive_int(value["shortest_edge"],
                         f"{where}: size.shortest_edge"), "size.shortest_edge"
  if isinstance(value, dict) and set(value) == {"height", "width"}:
    return [_positive_int(value["height"], f"{where}: size.height"),
            _positive_int(value["width"], f"{where}: size.width")], (
                "size.height, size.width")
  raise ValueError(f"{where}: size {value!r} is not reproduced (an int, "
                   "{shortest_edge} or {height, width} are)")


def _hf_crop(value, where: str) -> list:
  if isinstance(value, int) and not isinstance(value, bool):
    side = _positive_int(value, f"{where}: crop_size")
    return [side, side]
  if isinstance(value, dict) and set(value) == {"height", "width"}:
    return [_positive_int(value["height"], f"{where}: crop_size.height"),
            _positive_int(value["width"], f"{where}: crop_size.width")]
  raise ValueError(f"{where}: crop_size {value!r} is not an int or "
                   "{height, width}")


def _hugging_face_flags(cfg: dict, where: str) -> PreprocessingFlags:
  processor = str(cfg.get("image_processor_type") or
                  cfg.get("feature_extractor_type") or "")
  processor = processor[:-4] if processor.endswith("Fast") else processor
  # transformers still reads the legacy names (ConvNextFeatureExtractor,
  # CLIPFeatureExtractor, ...) that many published configs carry: each is
  # an alias of the image processor of the same model.
  if processor.endswith("FeatureExtractor"):
    processor = processor[:-len("FeatureExtractor")] + "ImageProcessor"
  for key, value in cfg.items():
    if (key.startswith("do_") and key not in _HF_SWITCHES and value) or (
        key in _HF_UNSUPPORTED and value):
      raise ValueError(f"{where}: {key} is not reproduced; refused rather "
                       "than served differently")
  provenance, flags = {}, {"crop_rounding": "floor"}
  resize, crop = None, None
  if cfg.get("do_resize", True):
    if "size" not in cfg or "resample" not in cfg:
      raise ValueError(f"{where}: do_resize needs size and resample")
    resize, size_key = _hf_size(cfg["size"], processor, where)
    provenance["resize"] = f"{where}: {size_key}"
    resample = cfg["resample"]
    if resample not in PIL_RESAMPLE_NAMES or isinstance(resample, bool):
      raise ValueError(f"{where}: resample {resample!r} is not one of PIL's "
                       f"codes {sorted(PIL_RESAMPLE_NAMES)}")
    flags["interpolation"] = PIL_RESAMPLE_NAMES[resample]
    provenance["interpolation"] = f"{where}: resample {resample}"
  crop_pct = cfg.get("crop_pct")
  if crop_pct is not None:
    if processor != "ConvNextImageProcessor" or not isinstance(resize, int):
      raise ValueError(f"{where}: crop_pct is reproduced for "
                       "ConvNextImageProcessor with size.shortest_edge only")
    if not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 4:
      raise ValueError(f"{where}: crop_pct must be in (0, 4], got "
                       f"{crop_pct!r}")
    if resize < _CONVNEXT_NO_CROP_FROM:
      resize, crop = int(resize / crop_pct), [resize, resize]
      provenance["resize"] = f"{where}: size.shortest_edge / crop_pct"
      provenance["center_crop"] = f"{where}: size.shortest_edge (crop_pct)"
    else:
      resize = [resize, resize]
  if cfg.get("do_center_crop"):
    if crop is not None or "crop_size" not in cfg:
      raise ValueError(f"{where}: do_center_crop needs crop_size (and no "
                       "crop_pct)")
    crop = _hf_crop(cfg["crop_size"], where)
    provenance["center_crop"] = f"{where}: crop_size"
  if crop is not None:
    provenance["crop_rounding"] = (f"{where}: Hugging Face crops at "
                                   "(h - M) // 2")
  else:
    flags.pop("crop_rounding")
  image_size = crop or (resize if isinstance(resize, list) else None)
  if image_size is not None:
    flags["image_size"] = list(image_size)
    provenance["image_size"] = provenance.get("center_crop",
                                              provenance.get("resize"))
  unit = bool(cfg.get("do_rescale", True))
  if unit:
    factor = cfg.get("rescale_factor", 1 / 255)
    if not isinstance(factor, (int, float)) or not math.isclose(
        factor, 1 / 255, rel_tol=1e-9):
      raise ValueError(f"{where}: rescale_factor {factor!r} is not 1/255")
  if cfg.get("do_normalize", True):
    mean = cfg.get("image_mean")
    channels = len(mean) if isinstance(mean, list) else 3
    mean = _number_list(mean, channels, f"{where}: image_mean")
    std = _number_list(cfg.get("image_std"), channels, f"{where}: image_std")
    scale = scale_from_mean_std(mean, std, unit, where)
    keys = "do_rescale, rescale_factor, image_mean, image_std"
  else:
    scale = {"input_scale": "unit" if unit else "raw"}
    keys = "do_rescale, do_normalize"
  for field in scale:
    provenance[field] = f"{where}: {keys}"
  flags.update(scale)
  return PreprocessingFlags(resize=resize, center_crop=crop,
                            provenance=provenance, **flags)


def _comparable(name: str, value):
  """A flag value in one spelling: sizes as lists, numbers as float32."""
  if value is None:
    return None
  if name == "resize":
    values = [value] if isinstance(value, int) else list(value)
    return values[0] if len(values) == 1 else values
  if name in ("center_crop", "image_size"):
    values = [value] if isinstance(value, int) else list(value)
    return values * 2 if len(values) == 1 else values
  if name in ("input_mean", "input_std"):
    return np.asarray(value, np.float32).tolist()
  return value


def merge_flags(from_file: PreprocessingFlags, explicit: dict,
                source: str = "the preprocessing config") -> PreprocessingFlags:
  """The file's flags plus those given by hand (`explicit`, None where not
  given); a given flag that differs from the file's is refused."""
  unknown = set(explicit) - set(FLAG_NAMES)
  if unknown:
    raise ValueError(f"unknown preprocessing flags {sorted(unknown)}")
  values, provenance = from_file.values(), dict(from_file.provenance)
  # The scale, mean and std are one choice: a file that sets the scale
  # sets all three, even where it leaves mean and std unset.
  scale_set = from_file.input_scale is not None
  for name, given in explicit.items():
    if given is None:
      continue
    have = values[name]
    decided = have is not None or (scale_set and name in _SCALE_FLAGS)
    if decided and _comparable(name, have) != _comparable(name, given):
      raise ValueError(f"--{name} {_flag_text(given)} contradicts "
                       f"{provenance.get(name, source)}, which gives "
                       f"{_flag_text(have)}")
    if not decided:
      values[name] = given
      provenance[name] = "argument"
  return PreprocessingFlags(provenance=provenance, **values)


def _flag_text(value) -> str:
  if value is None:
    return "none"
  if isinstance(value, (list, tuple)):
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v)
                    for v in value)
  return str(value)
