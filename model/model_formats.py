"""Reading a classifier trained elsewhere, by its format, without running it.

Each source kind (a `.keras` or legacy `.h5` file, a TensorFlow SavedModel
folder, a `.tflite` file, an ONNX file) is recognised from its bytes,
checked (model/model_checks.py; model/onnx_checks.py for ONNX) and loaded
into a `Source`: what the model declares about its input and output.
`model.adopt` decides the rest from there. An ONNX graph is read by
model/onnx_graph.py, which also proves its batch axis and picks its output.
"""

import contextlib
import dataclasses
import hashlib
import io
import os
import zipfile
from typing import Optional

import numpy as np

from model import engines
from model import model_checks


SOURCE_KINDS = ("keras", "h5", "savedmodel", "tflite", "onnx")


# The engine that serves each kind of source as it is.
SOURCE_ENGINE = {"keras": "keras", "h5": "keras", "savedmodel": "savedmodel",
                 "tflite": "tflite", "onnx": "onnx"}


# How much of a file's head tells an ONNX model from other bytes.
_ONNX_HEAD_BYTES = 64 * 1024


_EXPECTED = ("expected a .keras, .h5, .tflite or .onnx file or a SavedModel "
             "folder")


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


_FLOAT_DTYPES = ("float16", "float32", "float64")


_INTEGER_DTYPES = ("uint8", "int8")


# Files are hashed a block at a time, never read whole.
_HASH_BLOCK_BYTES = 1 << 20


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
  # The loaded Keras model or SavedModel, or the onnx_graph.OnnxClassifier.
  model: object = None


def first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


def detect_kind(path: str) -> str:
  """The kind of model at `path`, from its bytes rather than its name."""
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
      return "savedmodel"
    raise AdoptError(f"{path} is a folder without saved_model.pb: "
                     f"{_EXPECTED}")
  if not os.path.isfile(path):
    raise AdoptError(f"no such file or folder: {path}")
  with open(path, "rb") as handle:
    head = handle.read(_ONNX_HEAD_BYTES)
  if head[:4] == b"PK\x03\x04" and _zip_has(path, "config.json"):
    return "keras"
  if head[:8] == _HDF5_SIGNATURE:
    return "h5"
  if head[4:8] == b"TFL3":
    return "tflite"
  try:
    from model import onnx_checks  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise AdoptError(f"{path} is not a .keras, .h5 or .tflite model, and "
                     "telling an ONNX model needs the onnx package: pip "
                     "install '.[onnx]'") from None
  if onnx_checks.looks_like_onnx(head, complete=False):
    return "onnx"
  raise AdoptError(f"{path} is not a model this can read: {_EXPECTED}")


def _zip_has(path: str, name: str) -> bool:
  try:
    with zipfile.ZipFile(path) as archive:
      return name in archive.namelist()
  except zipfile.BadZipFile:
    return False


def keras_config(path: str, kind: str) -> dict:
  """The model config of a .keras or .h5 file, read without loading it,
  after its sizes are checked as the file declares them (model_checks)."""
  check_size(path)
  try:
    if kind == "keras":
      return model_checks.keras_archive_config(path, path, weights=True)
    import h5py  # pylint: disable=import-outside-toplevel
    with h5py.File(path, "r") as handle:
      model_checks.check_hdf5(handle, path, os.path.getsize(path))
      config = handle.attrs.get("model_config")
  except ValueError as error:
    # model_checks' refusals name the file already.
    raise AdoptError(first_line(error)) from None
  except (OSError, KeyError, TypeError, zipfile.BadZipFile) as error:
    raise AdoptError(f"cannot read {path}: {first_line(error)}") from None
  if config is None:
    raise AdoptError(f"{path} holds weights only, not a model: save the "
                     "whole model (model.save) and adopt that")
  if not isinstance(config, (bytes, str)):
    raise AdoptError(f"{path}: its model_config attribute is not text")
  try:
    config = model_checks.load_config_json(
        config if isinstance(config, bytes) else config.encode(),
        f"{path} model_config")
  except ValueError as error:
    raise AdoptError(str(error)) from None
  if not isinstance(config, dict):
    raise AdoptError(f"{path}: its model_config is not a model config")
  return config


def check_size(path: str) -> None:
  """Refuses a model file above model_checks.MAX_MODEL_BYTES before any of
  it is read."""
  try:
    model_checks.check_file_size(path, model_checks.MAX_MODEL_BYTES,
                                 "the model file")
  except ValueError as error:
    raise AdoptError(str(error)) from None


def final_softmax(config: dict) -> Optional[bool]:
  """Whether the layer producing a Keras model's output applies softmax;
  None when the config does not say (several outputs, unknown layout, or
  fields of unexpected types)."""
  try:
    return _final_softmax(config)
  except (AttributeError, TypeError, IndexError, KeyError):
    return None


def _final_softmax(config: dict) -> Optional[bool]:
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
    model_checks.check_keras_config(config, path)
  except ValueError as error:
    raise AdoptError(str(error)) from None
  import keras  # pylint: disable=import-outside-toplevel
  try:
    # safe_mode refuses Lambda layers; no custom objects are offered.
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
  except Exception as error:  # pylint: disable=broad-except
    raise AdoptError(f"cannot load {path} as a Keras model: "
                     f"{first_line(error)}") from None
  if len(model.inputs) != 1 or len(model.outputs) != 1:
    raise AdoptError(f"{path} has {len(model.inputs)} inputs and "
                     f"{len(model.outputs)} outputs; a classifier needs one "
                     "image input and one output")
  return Source(kind, path, tuple(model.inputs[0].shape)[1:],
                _dtype_name(model.inputs[0].dtype),
                tuple(model.outputs[0].shape)[1:], final_softmax(config),
                layer_classes=frozenset(model_checks.layer_classes(config)),
                model=model)


def _load_saved_model(path: str) -> Source:
  pb_path = os.path.join(path, "saved_model.pb")
  try:
    model_checks.check_file_size(pb_path,
                                 model_checks.MAX_SAVED_MODEL_PB_BYTES,
                                 "the SavedModel's graph")
  except ValueError as error:
    raise AdoptError(str(error)) from None
  with open(pb_path, "rb") as handle:
    pb = handle.read()
  try:
    model_checks.check_saved_model(pb, path)
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
                     f"{first_line(error)}") from None
  function = loaded.signatures["serving_default"]
  output_spec = function.structured_outputs[output]
  return Source("savedmodel", path, tuple(spec.shape)[1:], spec.dtype.name,
                tuple(output_spec.shape)[1:], model=loaded)


def _load_tflite(path: str) -> Source:
  from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
  check_size(path)
  try:
    interpreter = litert.Interpreter(model_path=path)
    inputs = interpreter.get_input_details()
    outputs = interpreter.get_output_details()
  except Exception as error:  # pylint: disable=broad-except
    raise AdoptError(f"cannot load {path} as a TFLite model: "
                     f"{first_line(error)}") from None
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


def _load_onnx(path: str, layout: Optional[str],
               image_size: Optional[tuple], color_mode: Optional[str],
               output_name: Optional[str]) -> Source:
  """The graph read and checked by model/onnx_graph.py: its input resolved
  (layout, size, channels), its batch axis proven, its output chosen."""
  from model import onnx_graph  # pylint: disable=import-outside-toplevel
  try:
    classifier = onnx_graph.read_classifier(
        path, layout=layout, image_size=image_size, color_mode=color_mode,
        output_name=output_name)
  except ValueError as error:
    raise AdoptError(str(error)) from None
  return Source("onnx", path, tuple(classifier.input_shape),
                classifier.record["input"]["dtype"],
                (classifier.num_classes,), model=classifier)


def load_source(path: str, layout: Optional[str] = None,
                image_size: Optional[tuple] = None,
                color_mode: Optional[str] = None,
                output_name: Optional[str] = None) -> Source:
  """The source at `path`. `layout` and `output_name` are for ONNX graphs
  only; an ONNX graph also takes `image_size` and `color_mode` where it
  cannot say (the other kinds are resolved by model.adopt)."""
  kind = detect_kind(path)
  if kind != "onnx":
    for flag, value in (("layout", layout), ("output_name", output_name)):
      if value is not None:
        raise AdoptError(f"--{flag} is for ONNX sources, and {path} is a "
                         f"{kind} model")
  if kind in ("keras", "h5"):
    source = _load_keras(path, kind)
  elif kind == "savedmodel":
    source = _load_saved_model(path)
  elif kind == "onnx":
    source = _load_onnx(path, layout, image_size, color_mode, output_name)
  else:
    source = _load_tflite(path)
  if source.input_dtype not in _FLOAT_DTYPES + _INTEGER_DTYPES:
    raise AdoptError(f"{path}: input dtype {source.input_dtype} is not "
                     f"supported: expected one of "
                     f"{_FLOAT_DTYPES + _INTEGER_DTYPES}")
  if len(source.output_shape) != 1:
    raise AdoptError(
        f"{path}: output of shape {shape_text(source.output_shape)} is not "
        "(batch, classes); a classifier needs one score per class")
  return source


def shape_text(dims: tuple) -> str:
  return "(" + ", ".join(["batch"] + [str(d) for d in dims]) + ")"


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


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  files = ([path] if os.path.isfile(path) else sorted(
      os.path.join(root, name) for root, _, names in os.walk(path)
      for name in names))
  for name in files:
    if not os.path.isfile(path):
      digest.update(os.path.relpath(name, path).encode() + b"\0")
    with open(name, "rb") as handle:
      for block in iter(lambda: handle.read(_HASH_BLOCK_BYTES), b""):
        digest.update(block)
  return digest.hexdigest()
