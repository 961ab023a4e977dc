"""Adopts a classifier trained elsewhere as a model folder `predict` serves.

  python -m model.adopt SOURCE --output DIR --class_names NAMES
      [--input_scale raw|unit|symmetric|caffe|torch|custom]
      [--input_mean M,M,M --input_std S,S,S] [--image_size H,W | N]
      [--color_mode grayscale|rgb] [--output_kind auto|logits|probabilities]
      [--decoder tensorflow|pillow] [--eval_data FOLDER]

SOURCE is a `.keras` file, a legacy Keras `.h5` file, a TensorFlow SavedModel
folder (its `serving_default` signature) or a `.tflite` file, float or
full-integer quantised. The folder gets the card (marked adopted, with every
field read from the model or declared here), the model in the formats the
source allows, and for Keras and SavedModel sources a TFLite conversion that
serves only if its top-1 agrees with the source on at least 99.9% of the
check images. Nothing runs code from the model: Keras loads in safe_mode
(no Lambda layers), a SavedModel's ops are listed from its saved_model.pb and
checked before it is loaded, and nothing is unpickled.
"""

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import zipfile
from typing import Optional

import numpy as np

from model import card as card_lib
from imagebatch import cli
from model import engines
from model import export
from imagebatch import paths
from model import preprocessing

SOURCE_KINDS = ("keras", "h5", "savedmodel", "tflite")
# The engine that serves each kind of source as it is.
SOURCE_ENGINE = {"keras": "keras", "h5": "keras", "savedmodel": "savedmodel",
                 "tflite": "tflite"}
OUTPUT_KINDS = ("auto",) + card_lib.OUTPUT_KINDS
# Images beyond these serve neither the output-kind probe nor the TFLite
# check any better; accuracy on --eval_data uses every image.
CHECK_IMAGES = 512
PROBE_IMAGES = 64
EVAL_BATCH = 256
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_FLOAT_DTYPES = ("float16", "float32", "float64")
_INTEGER_DTYPES = ("uint8", "int8")


class AdoptError(ValueError):
  """A source, flag or class list that is not as expected: one line, exit 2."""


@dataclasses.dataclass
class Source:
  """What the source model declares about itself."""
  kind: str
  path: str
  input_shape: tuple  # without the batch axis; None where dynamic
  input_dtype: str
  output_shape: tuple  # without the batch axis
  # From the Keras config: True for a final softmax, None when unknown.
  softmax: Optional[bool] = None
  # Input scaling the source implies (a quantised input's range), if any.
  implied_scale: Optional[str] = None
  implied_scale_reason: str = ""
  layer_classes: frozenset = frozenset()
  # A quantised output's step (its scale); 0 for a float output.
  output_step: float = 0.0
  model: object = None  # the loaded Keras model or SavedModel, if any


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


def detect_kind(path: str) -> str:
  """The kind of model at `path`, from its bytes rather than its name."""
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
      return "savedmodel"
    raise AdoptError(f"{path} is a folder without saved_model.pb: expected a "
                     ".keras, .h5 or .tflite file or a SavedModel folder")
  if not os.path.isfile(path):
    raise AdoptError(f"no such file or folder: {path}")
  with open(path, "rb") as handle:
    head = handle.read(8)
  if head[:4] == b"PK\x03\x04" and _zip_has(path, "config.json"):
    return "keras"
  if head == _HDF5_SIGNATURE:
    return "h5"
  if head[4:8] == b"TFL3":
    return "tflite"
  raise AdoptError(f"{path} is not a model this can read: expected a .keras, "
                   ".h5 or .tflite file or a SavedModel folder")


def _zip_has(path: str, name: str) -> bool:
  try:
    with zipfile.ZipFile(path) as archive:
      return name in archive.namelist()
  except zipfile.BadZipFile:
    return False


def keras_config(path: str, kind: str) -> dict:
  """The model config of a .keras or .h5 file, read without loading it."""
  try:
    if kind == "keras":
      with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))
    import h5py  # pylint: disable=import-outside-toplevel
    with h5py.File(path, "r") as handle:
      config = handle.attrs.get("model_config")
  except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
    raise AdoptError(f"cannot read {path}: {_first_line(error)}") from None
  if config is None:
    raise AdoptError(f"{path} holds weights only, not a model: save the "
                     "whole model (model.save) and adopt that")
  return json.loads(config.decode() if isinstance(config, bytes) else config)


def final_softmax(config: dict) -> Optional[bool]:
  """Whether the layer producing a Keras model's output applies softmax;
  None when the config does not say (several outputs, unknown layout)."""
  node = config
  for _ in range(64):  # Nested models, outermost first.
    inner = node.get("config", {})
    layers = inner.get("layers") or []
    if node.get("class_name") == "Sequential":
      layers = [l for l in layers if l.get("class_name") != "InputLayer"]
      if not layers:
        return None
      node = layers[-1]
    elif node.get("class_name") in ("Functional", "Model"):
      outputs = inner.get("output_layers") or []
      if outputs and isinstance(outputs[0], str):
        outputs = [outputs]
      if len(outputs) != 1:
        return None
      named = [l for l in layers if (l.get("name") or l.get(
          "config", {}).get("name")) == outputs[0][0]]
      if not named:
        return None
      node = named[0]
    else:
      activation = node.get("config", {}).get("activation")
      return node.get("class_name") == "Softmax" or activation == "softmax"
  return None


def _load_keras(path: str, kind: str) -> Source:
  config = keras_config(path, kind)
  try:
    card_lib.check_keras_config(config, path)
  except ValueError as error:
    raise AdoptError(str(error)) from None
  import keras  # pylint: disable=import-outside-toplevel
  try:
    # safe_mode refuses Lambda layers; no custom objects are offered.
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
  except Exception as error:  # pylint: disable=broad-except
    raise AdoptError(f"cannot load {path} as a Keras model: "
                     f"{_first_line(error)}") from None
  if len(model.inputs) != 1 or len(model.outputs) != 1:
    raise AdoptError(f"{path} has {len(model.inputs)} inputs and "
                     f"{len(model.outputs)} outputs; a classifier needs one "
                     "image input and one output")
  return Source(kind, path, tuple(model.inputs[0].shape)[1:],
                _dtype_name(model.inputs[0].dtype),
                tuple(model.outputs[0].shape)[1:], final_softmax(config),
                layer_classes=frozenset(card_lib.layer_classes(config)),
                model=model)


def _load_saved_model(path: str) -> Source:
  with open(os.path.join(path, "saved_model.pb"), "rb") as handle:
    pb = handle.read()
  try:
    card_lib.check_saved_model(pb, path)
  except ValueError as error:
    raise AdoptError(str(error)) from None
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    loaded = tf.saved_model.load(path)
    _, _, spec, output = engines.saved_model_signature(loaded, path)
  except ValueError as error:
    raise AdoptError(str(error)) from None
  except Exception as error:  # pylint: disable=broad-except
    raise AdoptError(f"cannot load the SavedModel {path}: "
                     f"{_first_line(error)}") from None
  function = loaded.signatures["serving_default"]
  output_spec = function.structured_outputs[output]
  return Source("savedmodel", path, tuple(spec.shape)[1:], spec.dtype.name,
                tuple(output_spec.shape)[1:], model=loaded)


def _load_tflite(path: str) -> Source:
  from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
  try:
    interpreter = litert.Interpreter(model_path=path)
    inputs = interpreter.get_input_details()
    outputs = interpreter.get_output_details()
  except Exception as error:  # pylint: disable=broad-except
    raise AdoptError(f"cannot load {path} as a TFLite model: "
                     f"{_first_line(error)}") from None
  if len(inputs) != 1 or len(outputs) != 1:
    raise AdoptError(f"{path} has {len(inputs)} inputs and {len(outputs)} "
                     "outputs; a classifier needs one image input and one "
                     "output")
  shape = tuple(None if d < 0 else int(d)
                for d in inputs[0]["shape_signature"][1:])
  output_shape = tuple(None if d < 0 else int(d)
                       for d in outputs[0]["shape_signature"][1:])
  source = Source("tflite", path, shape, np.dtype(inputs[0]["dtype"]).name,
                  output_shape)
  if np.issubdtype(outputs[0]["dtype"], np.integer):
    source.output_step = float(outputs[0]["quantization"][0])
  scale, zero_point = inputs[0]["quantization"]
  if source.input_dtype in _INTEGER_DTYPES and scale:
    limits = np.iinfo(inputs[0]["dtype"])
    low, high = ((limits.min - zero_point) * scale,
                 (limits.max - zero_point) * scale)
    for name, (lo, hi) in (("unit", (0.0, 1.0)), ("symmetric", (-1.0, 1.0)),
                           ("raw", (0.0, 255.0))):
      if abs(low - lo) <= 0.05 * (hi - lo) and abs(high - hi) <= 0.05 * (
          hi - lo):
        source.implied_scale = name
        source.implied_scale_reason = (
            f"the {source.input_dtype} input's quantisation covers "
            f"{low:.3g}..{high:.3g}")
  return source


def _dtype_name(dtype) -> str:
  return str(getattr(dtype, "name", dtype)).replace("tf.", "")


def load_source(path: str) -> Source:
  kind = detect_kind(path)
  if kind in ("keras", "h5"):
    source = _load_keras(path, kind)
  elif kind == "savedmodel":
    source = _load_saved_model(path)
  else:
    source = _load_tflite(path)
  if source.input_dtype not in _FLOAT_DTYPES + _INTEGER_DTYPES:
    raise AdoptError(f"{path}: input dtype {source.input_dtype} is not "
                     f"supported: expected one of "
                     f"{_FLOAT_DTYPES + _INTEGER_DTYPES}")
  if len(source.output_shape) != 1:
    raise AdoptError(
        f"{path}: output of shape {_shape(source.output_shape)} is not "
        "(batch, classes); a classifier needs one score per class")
  return source


def _shape(dims: tuple) -> str:
  return "(" + ", ".join(["batch"] + [str(d) for d in dims]) + ")"


def resolve_input(source: Source, image_size: Optional[tuple],
                  color_mode: Optional[str]) -> tuple:
  """(height, width, color_mode) from the model's input, with the flags
  filling only its dynamic dimensions."""
  dims = source.input_shape
  if len(dims) not in (2, 3):
    raise AdoptError(
        f"{source.path}: input of shape {_shape(dims)} is not an image: "
        "expected (batch, height, width) or (batch, height, width, channels)")
  channels = 1 if len(dims) == 2 else dims[2]
  modes = {count: mode for mode, count in card_lib.COLOR_MODES.items()}
  if channels is None:
    if color_mode is None:
      raise AdoptError(f"{source.path}: the input's channels are dynamic; "
                       "pass --color_mode grayscale or rgb")
  elif channels not in modes:
    raise AdoptError(f"{source.path}: input has {channels} channels; "
                     "expected 1 (grayscale) or 3 (rgb)")
  elif color_mode is not None and color_mode != modes[channels]:
    raise AdoptError(f"--color_mode {color_mode}: the model's input has "
                     f"{channels} channel(s), so it is {modes[channels]}")
  else:
    color_mode = modes[channels]
  size = []
  for axis, (name, dim) in enumerate((("height", dims[0]),
                                      ("width", dims[1]))):
    if dim is None:
      if image_size is None:
        raise AdoptError(f"{source.path}: the input's {name} is dynamic; "
                         "pass --image_size HEIGHT,WIDTH")
      dim = image_size[axis]
    elif image_size is not None and image_size[axis] != dim:
      raise AdoptError(f"--image_size {image_size[0]},{image_size[1]}: the "
                       f"model's input is {dims[0]}x{dims[1]} "
                       "(height x width)")
    size.append(int(dim))
  return size[0], size[1], color_mode


def parse_class_names(value: str) -> list:
  """A comma-separated list, or a file: one name per line, or a JSON list."""
  if os.path.isfile(value):
    with open(value, encoding="utf-8") as handle:
      text = handle.read()
    if text.lstrip().startswith("["):
      try:
        names = json.loads(text)
      except json.JSONDecodeError as error:
        raise AdoptError(f"--class_names {value}: not a JSON list: "
                         f"{error}") from None
      if not isinstance(names, list):
        raise AdoptError(f"--class_names {value}: expected a JSON list")
      names = [str(name) for name in names]
    else:
      names = [line.strip() for line in text.splitlines() if line.strip()]
  else:
    names = [name.strip() for name in value.split(",")]
  if any(not name for name in names):
    raise AdoptError("--class_names has an empty name")
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise AdoptError(f"--class_names repeats {', '.join(duplicates)}")
  return names


def _numbers(flag: str, value: Optional[str]) -> Optional[list]:
  if value is None:
    return None
  try:
    return [float(v) for v in value.split(",")]
  except ValueError:
    raise AdoptError(f"--{flag} {value!r}: expected comma-separated "
                     "numbers") from None


def parse_image_size(value: Optional[str]) -> Optional[tuple]:
  if value is None:
    return None
  parts = value.replace("x", ",").split(",")
  try:
    size = tuple(int(p) for p in parts)
  except ValueError:
    size = ()
  if len(size) == 1:
    size = size * 2
  if len(size) != 2 or min(size) < 1:
    raise AdoptError(f"--image_size {value!r}: expected HEIGHT,WIDTH or N")
  return size


def feeding_recipe(decoder: str, height: int, width: int, input_scale: str,
                   mean: Optional[list], std: Optional[list]) -> dict:
  """The card's preprocessing dict for an adopted model."""
  recipe = {"decoder": decoder, "input_scale": input_scale}
  if input_scale == "custom":
    recipe.update(input_mean=mean, input_std=std)
  if decoder == "tensorflow":
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


def eval_files(folder: str, class_names: list) -> tuple:
  """(path, class index) of every file in a sub-folder named for a class,
  and the other sub-folders' names with their file counts."""
  pattern = paths.expand_pattern(paths.absolute(folder))
  base = paths.pattern_base(pattern)
  names = frozenset(class_names)
  labelled, others = [], {}
  for path in paths.match_paths(pattern):
    label = paths.folder_label(path, base, names)
    if label is not None:
      labelled.append((path, class_names.index(label)))
    else:
      other = paths.folder_label(path, base) or "."
      others[other] = others.get(other, 0) + 1
  if not labelled:
    raise AdoptError(f"--eval_data {folder} has no images in sub-folders "
                     f"named for a class ({', '.join(class_names[:5])}...)")
  return labelled, others


def decode_files(card: card_lib.ModelCard, files: list):
  """Decodes (path, label) pairs through the card's serving decoder, a batch
  at a time; yields (pixels, labels, failed count)."""
  decoder = preprocessing.BatchDecoder(card.decoder, card.height, card.width,
                                       card.color_mode)
  for start in range(0, len(files), EVAL_BATCH):
    chunk = files[start:start + EVAL_BATCH]
    pixels, good, errors = decoder.decode(
        [paths.read_bytes(path) for path, _ in chunk])
    yield pixels, np.array([chunk[i][1] for i in good], np.int64), len(errors)


def probe_images(card: card_lib.ModelCard, count: int) -> np.ndarray:
  """Seeded pixels for the output probe and TFLite check when there is no
  --eval_data: noise, smooth gradients and flat images."""
  rng = np.random.default_rng(0)
  shape = (card.height, card.width, card.channels)
  third = count // 3
  noise = rng.integers(0, 256, (third,) + shape).astype(np.float32)
  ys = np.linspace(0, 1, card.height)[:, None, None]
  xs = np.linspace(0, 1, card.width)[None, :, None]
  gradients = np.stack([
      np.broadcast_to(255 * (a * ys + (1 - a) * xs) * np.ones(card.channels),
                      shape) for a in rng.uniform(0, 1, third)])
  flat = rng.uniform(0, 255, (count - 2 * third, 1, 1, card.channels)) * (
      np.ones(shape))
  return np.concatenate([noise, gradients, flat]).astype(np.float32)


def decide_output(source: Source, declared: str, outputs: np.ndarray,
                  num_classes: int) -> tuple:
  """(output kind, why): declared, a final softmax in the Keras config, or
  what the probe batch's rows look like."""
  if declared != "auto":
    return declared, "declared with --output_kind"
  if source.softmax:
    return "probabilities", "the Keras config ends in a softmax"
  # A quantised output is only near 1: allow a step of its scale per class.
  tolerance = max(1e-3, source.output_step * num_classes)
  sums = outputs.sum(axis=1)
  if (np.isfinite(outputs).all() and outputs.min() >= -tolerance and
      np.abs(sums - 1).max() <= tolerance):
    return "probabilities", (f"the probe batch's {len(outputs)} rows are "
                             "non-negative and sum to 1")
  return "logits", (f"the probe batch's {len(outputs)} rows are not "
                    "probabilities (negative, or not summing to 1)")


def convert_saved_model(path: str) -> bytes:
  """TFLite from a SavedModel's serving signature.

  Through the concrete function rather than `from_saved_model`: the latter
  converts a `tf.saved_model.save(keras_model)` folder without its weights,
  silently, into a model that outputs NaN.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  loaded = tf.saved_model.load(path)
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [loaded.signatures["serving_default"]], loaded)
  with contextlib.redirect_stdout(io.StringIO()):
    return converter.convert()


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  files = ([path] if os.path.isfile(path) else sorted(
      os.path.join(root, name) for root, _, names in os.walk(path)
      for name in names))
  for name in files:
    if not os.path.isfile(path):
      digest.update(os.path.relpath(name, path).encode() + b"\0")
    with open(name, "rb") as handle:
      digest.update(handle.read())
  return digest.hexdigest()


def _stage_source(source: Source, out_dir: str) -> None:
  """Writes the source model into the folder in the format it serves as."""
  if source.kind == "keras":
    shutil.copyfile(source.path, os.path.join(out_dir, card_lib.MODEL_FILE))
  elif source.kind == "h5":
    # A legacy .h5 becomes a Keras 3 .keras file: the same weights, served
    # and checked (Lambda layers) like a trained model.
    source.model.save(os.path.join(out_dir, card_lib.MODEL_FILE))
  elif source.kind == "savedmodel":
    shutil.copytree(source.path, os.path.join(out_dir,
                                              card_lib.SAVED_MODEL_DIR))
  else:
    shutil.copyfile(source.path, os.path.join(out_dir, card_lib.TFLITE_FILE))


def _clear(out_dir: str) -> None:
  """Until the new card is written, the folder must not pass for a model."""
  for name in (card_lib.CARD_FILE, card_lib.MODEL_FILE, card_lib.TFLITE_FILE):
    if os.path.exists(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))
  shutil.rmtree(os.path.join(out_dir, card_lib.SAVED_MODEL_DIR),
                ignore_errors=True)


def adopt(source_path: str, out_dir: str, class_names: list, *,
          input_scale: Optional[str] = None, input_mean: Optional[list] = None,
          input_std: Optional[list] = None,
          image_size: Optional[tuple] = None,
          color_mode: Optional[str] = None, output_kind: str = "auto",
          decoder: str = "tensorflow", eval_data: Optional[str] = None,
          say=print, warn=None) -> card_lib.ModelCard:
  """Writes the model folder; returns its card. Raises AdoptError."""
  warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
  source_path = os.path.abspath(source_path)
  out_dir = os.path.abspath(out_dir)
  if out_dir == source_path or out_dir.startswith(source_path + os.sep):
    raise AdoptError("--output must not be the source or inside it")
  if output_kind not in OUTPUT_KINDS:
    raise AdoptError(f"--output_kind must be one of {OUTPUT_KINDS}")
  if decoder not in preprocessing.DECODERS:
    raise AdoptError(f"--decoder must be one of {preprocessing.DECODERS}")
  source = load_source(source_path)
  kind_name = {"keras": "Keras .keras", "h5": "Keras .h5",
               "savedmodel": "TensorFlow SavedModel",
               "tflite": "TFLite"}[source.kind]
  say(f"source: {kind_name} model, input {_shape(source.input_shape)} "
      f"{source.input_dtype}, output {_shape(source.output_shape)}")
  height, width, color_mode = resolve_input(source, image_size, color_mode)
  classes = source.output_shape[0]
  if classes is not None and classes != len(class_names):
    raise AdoptError(f"--class_names has {len(class_names)} names but the "
                     f"model outputs {classes} classes")

  scale_from = "--input_scale"
  if input_scale is None:
    input_scale, scale_from = "raw", "the default"
    if source.implied_scale:
      input_scale, scale_from = source.implied_scale, (
          source.implied_scale_reason)
    elif source.layer_classes and not source.layer_classes & {
        "Rescaling", "Normalization"}:
      warn("the model has no Rescaling or Normalization layer, so it may "
           "expect pixels scaled outside it; if its author divided by 255, "
           "pass --input_scale unit (see the table in the README)")
  try:
    card_lib.check_input_scale(input_scale, color_mode, input_mean, input_std)
  except ValueError as error:
    raise AdoptError(f"--{error}") from None

  card = card_lib.ModelCard(
      model_id="",
      architecture="adopted",
      class_names=list(class_names),
      input_shape=[height, width, card_lib.COLOR_MODES[color_mode]],
      color_mode=color_mode,
      output="logits",
      preprocessing=feeding_recipe(decoder, height, width, input_scale,
                                   input_mean, input_std),
      engines=[SOURCE_ENGINE[source.kind]],
      adopted={
          "source": os.path.basename(source_path.rstrip(os.sep)),
          "sha256": _sha256(source_path),
          "format": source.kind,
          "input_scale": scale_from,
          "input_shape": "the model's input signature" + (
              " and --image_size" if None in source.input_shape[:2] else ""),
      }).validate()

  eval_set = []
  if eval_data:
    eval_set, others = eval_files(eval_data, class_names)
    if others:
      warn(f"--eval_data: {sum(others.values())} files in folders not named "
           f"for a class were left out ({', '.join(sorted(others)[:10])}); "
           "name the folders as --class_names names the classes")
  check_pixels = _check_images(card, eval_set)

  os.makedirs(out_dir, exist_ok=True)
  _clear(out_dir)
  _stage_source(source, out_dir)
  engine = engines.load_engine(out_dir, card.engines[0], card=card)
  try:
    outputs = engine.outputs(check_pixels[:PROBE_IMAGES])
  except Exception as error:  # pylint: disable=broad-except
    raise AdoptError(f"{source_path} failed on a batch of "
                     f"{min(len(check_pixels), PROBE_IMAGES)} images of "
                     f"{height}x{width}x{card.channels}: "
                     f"{_first_line(error)}") from None
  card.output, why = decide_output(source, output_kind, outputs,
                                   len(class_names))
  card.adopted["output"] = why
  say(f"output: {card.output} ({why})")

  if source.kind in ("keras", "h5", "savedmodel"):
    card.tflite = _convert(source, out_dir, card, engine, check_pixels,
                           "--eval_data images" if eval_set else
                           "generated check images")
    if card.tflite.get("converted"):
      card.engines.append("tflite")
      say(f"tflite: converted; top-1 agrees with {source.kind} on "
          f"{card.tflite['top1_agreement']:.2%} of "
          f"{card.tflite['images']} {card.tflite['checked_on']}")
    else:
      say(f"tflite: not served, the folder serves with {card.engines[0]} "
          f"only: {card.tflite['reason']}")
  else:
    card.tflite = {"source": "adopted as it is",
                   "input_dtype": source.input_dtype}

  if eval_set:
    card.metrics = _evaluate(card, out_dir, eval_set, eval_data, say, warn)
  card.model_id = card_lib.compute_model_id(
      card, *card_lib.model_payloads(out_dir, card))
  card.validate()
  with open(os.path.join(out_dir, card_lib.CARD_FILE), "w") as handle:
    handle.write(card.to_json())
  say(f"adopted {source_path} as model {card.model_id} in {out_dir}: "
      f"{height}x{width} {color_mode}, {len(class_names)} classes, decoder "
      f"{decoder}, input_scale {input_scale} ({scale_from}), engines "
      f"{', '.join(card.engines)} (default {card.default_engine})")
  return card


def _check_images(card: card_lib.ModelCard, eval_set: list) -> np.ndarray:
  """Pixels for the output probe and the TFLite check: up to CHECK_IMAGES
  of --eval_data, spread over its classes, or generated ones without it."""
  if not eval_set:
    return probe_images(card, CHECK_IMAGES)
  step = max(1, len(eval_set) // CHECK_IMAGES)
  sample = eval_set[::step][:CHECK_IMAGES]
  pixels = np.concatenate([p.astype(np.float32)
                           for p, _, _ in decode_files(card, sample)])
  if not len(pixels):
    raise AdoptError("--eval_data: none of its images could be decoded")
  return pixels


def _convert(source: Source, out_dir: str, card: card_lib.ModelCard,
             engine: engines.Engine, images: np.ndarray,
             checked_on: str) -> dict:
  """Converts to TFLite and keeps it only if it agrees with the source."""
  try:
    if source.kind == "savedmodel":
      tflite_bytes = convert_saved_model(
          os.path.join(out_dir, card_lib.SAVED_MODEL_DIR))
    else:
      tflite_bytes = export.convert_to_tflite(source.model)
  except Exception as error:  # pylint: disable=broad-except
    return {"converted": False,
            "reason": f"conversion failed: {_first_line(error)}"}
  reference = np.concatenate([
      engine.probabilities(images[start:start + EVAL_BATCH])
      for start in range(0, len(images), EVAL_BATCH)])
  try:
    agreement = export.tflite_agreement(reference, tflite_bytes, card, images)
  except Exception as error:  # pylint: disable=broad-except
    return {"converted": False,
            "reason": f"the converted model does not run: "
                      f"{_first_line(error)}"}
  agreement.update(checked_on=checked_on, converted_from=source.kind)
  if agreement["top1_agreement"] < export.MIN_TFLITE_AGREEMENT:
    agreement.update(converted=False, reason=(
        f"its top-1 agrees with {source.kind} on only "
        f"{agreement['top1_agreement']:.2%} of {agreement['images']} "
        f"{checked_on} (need {export.MIN_TFLITE_AGREEMENT:.1%})"))
    return agreement
  with open(os.path.join(out_dir, card_lib.TFLITE_FILE), "wb") as handle:
    handle.write(tflite_bytes)
  agreement["converted"] = True
  return agreement


def _evaluate(card, out_dir, eval_set, eval_data, say, warn) -> dict:
  """Accuracy on --eval_data through the serving decoder and engine."""
  engine = engines.load_engine(out_dir, card.default_engine, card=card)
  correct = total = failed = 0
  for pixels, labels, errors in decode_files(card, eval_set):
    failed += errors
    if len(labels):
      predicted = engine.probabilities(pixels).argmax(1)
      correct += int((predicted == labels).sum())
      total += len(labels)
  if not total:
    raise AdoptError(f"--eval_data {eval_data}: none of its images could be "
                     "decoded")
  accuracy = correct / total
  chance = 1.0 / card.num_classes
  say(f"eval: accuracy {accuracy:.4f} on {total} images of {eval_data} "
      f"({card.default_engine} engine, {card.decoder} decoder"
      + (f"; {failed} could not be decoded" if failed else "") + ")")
  if accuracy < chance + 0.15 * (1 - chance):
    warn(f"accuracy {accuracy:.3f} on --eval_data is near chance "
         f"({chance:.3f} for {card.num_classes} classes): check --input_scale "
         "(how the author scaled pixels), the order of --class_names (the "
         "model's output order, often the sorted folder names), and "
         "--color_mode")
  return {"eval_accuracy": accuracy, "eval_images": total,
          "eval_decode_failures": failed,
          "eval_data": paths.absolute(eval_data),
          "eval_engine": card.default_engine}


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="python -m model.adopt",
      description="Make a model folder that beam_jobs.predict serves from a "
      "classifier trained elsewhere.")
  parser.add_argument("source", help="a .keras, .h5 or .tflite file, or a "
                      "SavedModel folder")
  parser.add_argument("--output", required=True, help="the model folder")
  parser.add_argument("--class_names", required=True,
                      help="comma-separated, in the model's output order, or "
                      "a file: one name per line or a JSON list")
  parser.add_argument("--input_scale", default=None,
                      choices=preprocessing.INPUT_SCALES,
                      help="how [0, 255] pixels become the model input; "
                      "default raw (rescaling inside the model)")
  parser.add_argument("--input_mean", default=None,
                      help="custom: per-channel mean, in pixel units")
  parser.add_argument("--input_std", default=None,
                      help="custom: per-channel std, in pixel units")
  parser.add_argument("--image_size", default=None,
                      help="HEIGHT,WIDTH or N, only for a dynamic input size")
  parser.add_argument("--color_mode", default=None,
                      choices=tuple(card_lib.COLOR_MODES),
                      help="only for an input with dynamic channels")
  parser.add_argument("--output_kind", default="auto", choices=OUTPUT_KINDS,
                      help="what the model outputs; auto: read from its last "
                      "layer")
  parser.add_argument("--decoder", default="tensorflow",
                      choices=preprocessing.DECODERS,
                      help="tensorflow: as keras.utils."
                      "image_dataset_from_directory; pillow: this project's")
  parser.add_argument("--eval_data", default=None,
                      help="a folder of class sub-folders to score the model "
                      "on through the serving decoder")
  parser.add_argument("--verbose", action="store_true",
                      help="also TensorFlow's and Keras' own log lines")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  cli.quiet_libraries(args.verbose)
  try:
    adopt(args.source, args.output, parse_class_names(args.class_names),
          input_scale=args.input_scale,
          input_mean=_numbers("input_mean", args.input_mean),
          input_std=_numbers("input_std", args.input_std),
          image_size=parse_image_size(args.image_size),
          color_mode=args.color_mode, output_kind=args.output_kind,
          decoder=args.decoder, eval_data=args.eval_data)
  except (AdoptError, OSError) as error:
    print(f"model.adopt: error: {error}", file=sys.stderr)
    return 2
  cli.print_next(
      f"{args.output} (model_card.json and the model files)",
      [cli.predict_command(model=args.output)])
  return 0


if __name__ == "__main__":
  sys.exit(main())
