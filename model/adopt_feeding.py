"""How an adopted model is fed: the decoder and its recipe, and the input
scale, from the flags and the author's own preprocessing file.

`feeding_flags` merges the flags given by hand with a timm or Hugging Face
preprocessing file (model/preprocessing_config.py), recording where each
value came from and refusing a flag that contradicts the file.
`choose_decoder` and `feeding_recipe` turn them into the card's
`preprocessing`; `input_scale` decides the scale, which an ONNX graph cannot
tell.
"""

import os
from typing import Optional

from model import card as card_lib
from model import model_formats
from model import preprocessing
from model import preprocessing_config
from model import torchvision_decoding
from model.model_formats import AdoptError

# The steps of the torchvision decoder (its card fields), which no other
# decoder has.
TORCHVISION_STEPS = torchvision_decoding.CARD_FIELDS
# The scales a refusal for a missing --input_scale names.
_SCALE_CHOICES = (
    "pass --input_scale unit (the author divided by 255), symmetric "
    "(x / 127.5 - 1, keras.applications' \"tf\" mode), raw (the model "
    "rescales inside), caffe, torch or custom (--input_mean, --input_std)")
# An ONNX graph has no rescaling layer to read the input scale from.
ONNX_NEEDS_SCALE = (
    "an ONNX graph does not say how its author scaled pixels: pass "
    "--input_scale torch (ToTensor, then Normalize with ImageNet's mean and "
    "std), symmetric (Normalize(0.5, 0.5)), unit (ToTensor alone), raw, "
    "caffe or custom (--input_mean, --input_std), or --preprocessing_config "
    "with the author's config.json or preprocessor_config.json, or "
    "--eval_data with labelled images to measure which fits")
# The layers that show a Keras model scales its own input.
RESCALING_LAYERS = frozenset(["Rescaling", "Normalization"])


def feeding_flags(explicit: dict, config_path: Optional[str]
                 ) -> preprocessing_config.PreprocessingFlags:
  """The feeding flags given by hand (None where not given), merged with
  the author's preprocessing file if there is one: each value's origin is
  recorded, and a flag that contradicts the file is refused."""
  from_file = preprocessing_config.PreprocessingFlags()
  if config_path is not None:
    if not os.path.isfile(config_path):
      raise AdoptError(f"--preprocessing_config {config_path}: no such file")
    try:
      from_file = preprocessing_config.read_preprocessing_config(config_path)
    except ValueError as error:
      raise AdoptError(f"--preprocessing_config {error}") from None
  try:
    return preprocessing_config.merge_flags(from_file, explicit)
  except ValueError as error:
    raise AdoptError(str(error)) from None


def origin(flags: preprocessing_config.PreprocessingFlags, name: str) -> str:
  """Where a feeding value came from: its flag, or the author's file."""
  given = flags.provenance.get(name, "argument")
  return f"--{name}" if given == "argument" else given


def with_origin(message: str,
                flags: preprocessing_config.PreprocessingFlags) -> str:
  """A refusal that starts with a feeding value's name, spelt as its flag,
  or followed by the file that set it."""
  name = message.split(" ", 1)[0].lstrip("-")
  if name not in preprocessing_config.FLAG_NAMES:
    return message
  if flags.provenance.get(name, "argument") == "argument":
    return "--" + message.lstrip("-")
  return f"{message.lstrip('-')} ({name} from {origin(flags, name)})"


def choose_decoder(kind: str, decoder: Optional[str],
                   flags: preprocessing_config.PreprocessingFlags) -> str:
  """The decoder named, else torchvision for an ONNX source or a recipe
  with torchvision steps, else tensorflow (Keras' recipe)."""
  steps = [name for name in TORCHVISION_STEPS
           if getattr(flags, name) is not None]
  if decoder is None:
    return "torchvision" if kind == "onnx" or steps else "tensorflow"
  if decoder not in preprocessing.DECODERS:
    raise AdoptError(f"--decoder must be one of {preprocessing.DECODERS}")
  if decoder != "torchvision" and steps:
    where = origin(flags, steps[0])
    what = (where if where.startswith("--") else
            f"{where} sets {steps[0]}, which")
    raise AdoptError(f"{what} is a step of the torchvision decoder, not of "
                     f"--decoder {decoder}")
  return decoder


def feeding_recipe(decoder: str, height: int, width: int, color_mode: str,
                   input_scale: str,
                   flags: preprocessing_config.PreprocessingFlags) -> dict:
  """The card's preprocessing dict for an adopted model, checked: the scale
  fits the colour mode, and a torchvision recipe (`flags`' resize, crop and
  interpolation) ends at the model's input size."""
  mean, std = flags.input_mean, flags.input_std
  _check_given_mean_std(flags)
  try:
    card_lib.check_input_scale(input_scale, color_mode, mean, std)
  except ValueError as error:
    raise AdoptError(with_origin(str(error), flags)) from None
  recipe = {"decoder": decoder, "input_scale": input_scale}
  if input_scale == "custom":
    recipe.update(input_mean=mean, input_std=std)
  if decoder == "torchvision":
    resize, crop = flags.resize, flags.center_crop
    recipe.update(
        recipe="torchvision: PIL.Image.open(f).convert('RGB' or 'L') as "
        "ImageFolder loads, transforms.Resize, transforms.CenterCrop",
        exif_transpose=False,
        resize=list(resize) if isinstance(resize, (list, tuple)) else resize,
        center_crop=list(crop) if crop is not None else None,
        interpolation=(flags.interpolation or
                       torchvision_decoding.DEFAULT_INTERPOLATION),
        crop_rounding=flags.crop_rounding or "half_even",
        input_dtype="uint8 as float32")
    try:
      torchvision_decoding.TorchvisionDecoder.from_card(recipe, color_mode,
                                                        height, width)
    except ValueError as error:
      raise AdoptError(with_origin(str(error), flags)) from None
  elif decoder == "tensorflow":
    recipe.update(
        recipe="keras.utils.image_dataset_from_directory: "
        "tf.image.decode_image(expand_animations=False), tf.image.resize",
        exif_transpose=False,
        resize={"height": height, "width": width, "interpolation": "bilinear",
                "antialias": False, "when": "always"},
        input_dtype="float32 (not rounded)")
  else:
    recipe.update(
        exif_transpose=True,
        resize={"height": height, "width": width,
                "interpolation": preprocessing.RESIZE_INTERPOLATION,
                "when": "the decoded size differs"},
        input_dtype="uint8 as float32")
  return recipe


def _check_given_mean_std(
    flags: preprocessing_config.PreprocessingFlags) -> None:
  """Refuses --input_mean and --input_std given by hand that cannot mean
  what the card would serve: torchvision's `Normalize` numbers (for pixels
  divided by 255: every mean within [0, 1], every std below 1) where the
  card takes pixel units, or either without --input_scale custom. The fix
  is read as --preprocessing_config reads the same numbers
  (`scale_from_mean_std`): a named scale where they are one, else the
  custom mean and std in pixel units."""
  mean, std = flags.input_mean, flags.input_std
  by_hand = [name for name in ("input_mean", "input_std")
             if getattr(flags, name) is not None and
             flags.provenance.get(name, "argument") == "argument"]
  if not by_hand or flags.input_scale not in (None, "custom"):
    return
  given = " ".join(f"--{name} {_numbers(getattr(flags, name))}"
                   for name in by_hand)
  if (len(by_hand) == 2 and len(mean) == len(std) and
      all(isinstance(v, (int, float)) for v in mean + std) and
      all(0 <= m <= 1 for m in mean) and all(0 < s < 1 for s in std)):
    scale = preprocessing_config.scale_from_mean_std(mean, std, True, given)
    fix = (f"--input_scale {scale['input_scale']}"
           if scale["input_scale"] != "custom" else
           f"--input_scale custom --input_mean "
           f"{_numbers(scale['input_mean'])} --input_std "
           f"{_numbers(scale['input_std'])}")
    raise AdoptError(
        f"{given} look like torchvision's Normalize numbers, for pixels "
        "divided by 255, and --input_scale custom takes pixel units: pass "
        f"{fix}")
  if flags.input_scale is None:
    raise AdoptError(f"{given} {'go' if len(by_hand) == 2 else 'goes'} with "
                     "--input_scale custom (pixel units): pass --input_scale "
                     "custom")


def _numbers(values: list) -> str:
  """Numbers as a flag takes them, without a float's trailing digits."""
  return ",".join(f"{round(v, 6):.10g}" for v in values)


def input_scale(source: model_formats.Source,
                flags: preprocessing_config.PreprocessingFlags) -> tuple:
  """(input scale, where it came from): the flag or the author's file, the
  source's quantised input range, or raw for a Keras model that rescales
  inside. (raw, None) when the model does not say: then --eval_data
  measures it, or adopting is refused (`needs_scale`)."""
  if flags.input_scale is not None:
    return flags.input_scale, origin(flags, "input_scale")
  if source.implied_scale:
    return source.implied_scale, source.implied_scale_reason
  found = sorted(source.layer_classes & RESCALING_LAYERS)
  if found and source.kind != "onnx":
    return "raw", (f"the default: the model scales its own input (a "
                   f"{' and a '.join(found)} layer)")
  return "raw", None


def needs_scale(source: model_formats.Source) -> str:
  """Why adopting without --input_scale or --eval_data is refused, and
  what to pass, in one line."""
  if source.kind == "onnx":
    return ONNX_NEEDS_SCALE
  what = {"keras": "the model has no Rescaling or Normalization layer, so "
                   "it does not say",
          "savedmodel": "the SavedModel does not say",
          "tflite": "the TFLite model does not say"}[
              "keras" if source.kind == "h5" else source.kind]
  return (f"{what} how its author scaled pixels, and served on the wrong "
          f"scale its confidences are wrong: {_SCALE_CHOICES}; or pass "
          "--eval_data with labelled images to measure which fits")
