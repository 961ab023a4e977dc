"""The model card: everything the pipeline needs to serve a model folder.

A model folder holds `model_card.json` and the model in one or more formats:
`model.keras`, `model.tflite`, a `saved_model/` folder or `model.onnx`.
`model.train` writes the first two; `model.adopt` writes whichever a model
trained elsewhere allows. The card is the only contract between training and
serving: colour mode, input size, decoder, value range and output kind all
come from it, so serving cannot drift from training.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

from model import model_checks
from model import preprocessing
from model import torchvision_decoding
from imagebatch.paths import join
from imagebatch.paths import match_paths
from imagebatch.paths import open_file

MODEL_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
SAVED_MODEL_DIR = "saved_model"
# One self-contained file: model.adopt inlines an ONNX source's external
# data (model/onnx_checks.py).
ONNX_FILE = "model.onnx"
CARD_FILE = "model_card.json"
CURVES_FILE = "training_curves.png"
# The engines a folder can serve with, fastest first, and what each reads.
ENGINE_FILES = {"tflite": TFLITE_FILE, "onnx": ONNX_FILE,
                "keras": MODEL_FILE, "savedmodel": SAVED_MODEL_DIR}
# The order model files enter the model id.
_HASH_ORDER = ("keras", "tflite", "savedmodel", "onnx")
# Where an ONNX graph's image input keeps its channels (the card's
# `preprocessing.layout`, read by the onnx engine): PyTorch's (batch, C, H,
# W), (batch, H, W, C), or (batch, H, W) for grayscale with no channel axis.
ONNX_LAYOUTS = ("NCHW", "NHWC", "NHW")
# The card's name for this project's own decoder before it had a short one.
_LEGACY_PILLOW_DECODER = "model.preprocessing.decode_image"

COLOR_MODES = {"grayscale": 1, "rgb": 3}
OUTPUT_KINDS = ("logits", "probabilities")
# 2: model_id covers the card's serving fields as well as the model files.
CARD_FORMAT_VERSION = 2
# Every card field that changes what serving outputs for an image.
SERVING_FIELDS = ("class_names", "input_shape", "color_mode", "output",
                  "preprocessing")
# Serves too when a card has it (model/embeddings.py); a card without one
# keeps the model id it had before embeddings existed.
EMBEDDING_FIELD = "embedding"


# The card's fields that hold a list or a JSON object, checked as such
# before anything reads them.
_FIELD_TYPES = {"class_names": list, "input_shape": list, "engines": list,
                "preprocessing": dict, "dataset": dict, "metrics": dict,
                "training": dict, "tflite": dict, "adopted": dict}


@dataclasses.dataclass
class ModelCard:
  """Describes an exported classifier. See the README for each field."""

  model_id: str
  architecture: str
  class_names: list
  input_shape: list  # [height, width, channels]
  color_mode: str
  output: str  # "logits" or "probabilities"
  # How encoded images become the model input: `decoder` (pillow,
  # tensorflow or torchvision, with torchvision_decoding.CARD_FIELDS),
  # `input_scale` (and for custom, `input_mean`/`input_std`), and for the
  # onnx engine `layout` (ONNX_LAYOUTS).
  preprocessing: dict = dataclasses.field(default_factory=dict)
  dataset: dict = dataclasses.field(default_factory=dict)
  metrics: dict = dataclasses.field(default_factory=dict)
  training: dict = dataclasses.field(default_factory=dict)
  tflite: dict = dataclasses.field(default_factory=dict)
  format_version: int = CARD_FORMAT_VERSION
  # The engines the folder serves with (keys of ENGINE_FILES).
  engines: list = dataclasses.field(
      default_factory=lambda: ["keras", "tflite"])
  # For a model trained elsewhere (model.adopt): its source file, SHA-256,
  # format, and which card fields were read from it or declared.
  adopted: dict = dataclasses.field(default_factory=dict)
  # The vector that feeds the classifier, as a second output of the served
  # model: `layer` (a Keras layer or ONNX tensor name), `dimension`,
  # `chosen` (why that one), and per engine that serves it the output names
  # and the check against the source (model/embeddings.py). Empty: none.
  embedding: dict = dataclasses.field(default_factory=dict)

  @property
  def height(self) -> int:
    return int(self.input_shape[0])

  @property
  def width(self) -> int:
    return int(self.input_shape[1])

  @property
  def channels(self) -> int:
    return int(self.input_shape[2])

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def decoder(self) -> str:
    name = self.preprocessing.get("decoder", "pillow")
    return "pillow" if name == _LEGACY_PILLOW_DECODER else name

  @property
  def input_scale(self) -> str:
    return self.preprocessing.get("input_scale", "raw")

  @property
  def input_mean(self) -> Optional[list]:
    return self.preprocessing.get("input_mean")

  @property
  def input_std(self) -> Optional[list]:
    return self.preprocessing.get("input_std")

  @property
  def embedding_dimension(self) -> Optional[int]:
    return self.embedding.get("dimension") if self.embedding else None

  @property
  def embedding_engines(self) -> list:
    """The engines that serve the embedding, fastest first."""
    served = (self.embedding or {}).get("engines", {})
    return [name for name in ENGINE_FILES if name in served]

  @property
  def default_engine(self) -> str:
    """The fastest engine the folder holds."""
    return next(name for name in ENGINE_FILES if name in self.engines)

  def validate(self) -> "ModelCard":
    """Raises ValueError naming the first field that is not as expected."""
    for name, kind in _FIELD_TYPES.items():
      if not isinstance(getattr(self, name), kind):
        raise ValueError(f"model card {name} must be a "
                         f"{'list' if kind is list else 'JSON object'}, got "
                         f"{type(getattr(self, name)).__name__}")
    if not all(isinstance(name, str) for name in self.class_names):
      raise ValueError("model card class_names must be strings")
    if not isinstance(self.color_mode, str) or (
        self.color_mode not in COLOR_MODES):
      raise ValueError(
          f"model card color_mode must be one of {sorted(COLOR_MODES)}, "
          f"got {self.color_mode!r}")
    if len(self.input_shape) != 3 or any(int(d) <= 0 for d in self.input_shape):
      raise ValueError(
          "model card input_shape must be [height, width, channels], "
          f"got {self.input_shape!r}")
    if self.channels != COLOR_MODES[self.color_mode]:
      raise ValueError(
          f"model card input_shape has {self.channels} channels but "
          f"color_mode {self.color_mode!r} needs {COLOR_MODES[self.color_mode]}")
    if not isinstance(self.output, str) or self.output not in OUTPUT_KINDS:
      raise ValueError(
          f"model card output must be one of {OUTPUT_KINDS}, got {self.output!r}")
    if len(self.class_names) < 2:
      raise ValueError("model card needs at least two class_names")
    if not self.engines or any(e not in ENGINE_FILES for e in self.engines):
      raise ValueError(f"model card engines must be some of "
                       f"{list(ENGINE_FILES)}, got {self.engines!r}")
    self._validate_feeding()
    self._validate_embedding()
    return self

  def _validate_embedding(self) -> None:
    if not self.embedding:
      return
    layer = self.embedding.get("layer")
    dimension = self.embedding.get("dimension")
    served = self.embedding.get("engines")
    if not isinstance(layer, str) or not layer:
      raise ValueError("model card embedding.layer must name a layer or "
                       f"tensor, got {layer!r}")
    if (not isinstance(dimension, int) or isinstance(dimension, bool) or
        dimension < 1):
      raise ValueError("model card embedding.dimension must be a positive "
                       f"integer, got {dimension!r}")
    if (not isinstance(served, dict) or not served or
        any(name not in self.engines for name in served)):
      raise ValueError(f"model card embedding.engines must be some of the "
                       f"card's engines {self.engines}, got {served!r}")

  def _validate_feeding(self) -> None:
    if self.decoder not in preprocessing.DECODERS:
      raise ValueError(f"model card decoder must be one of "
                       f"{preprocessing.DECODERS}, got {self.decoder!r}")
    check_input_scale(self.input_scale, self.color_mode, self.input_mean,
                      self.input_std)
    if self.decoder == "torchvision":
      try:
        torchvision_decoding.TorchvisionDecoder.from_card(
            self.preprocessing, self.color_mode, self.height, self.width)
      except ValueError as error:
        raise ValueError(f"model card preprocessing: {error}") from None
    if "onnx" in self.engines:
      layout = self.preprocessing.get("layout")
      if layout not in ONNX_LAYOUTS or (layout == "NHW" and
                                        self.color_mode != "grayscale"):
        raise ValueError(f"model card preprocessing.layout must be one of "
                         f"{ONNX_LAYOUTS} (NHW for grayscale only) for the "
                         f"onnx engine, got {layout!r}")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

  @classmethod
  def from_json(cls, text: str) -> "ModelCard":
    try:
      fields = model_checks.load_config_json(text, "model card")
    except ValueError as error:
      raise ValueError(str(error)) from None
    if not isinstance(fields, dict):
      raise ValueError("model card is not a JSON object")
    known = {field.name for field in dataclasses.fields(cls)}
    missing = [
        field.name for field in dataclasses.fields(cls)
        if field.default is dataclasses.MISSING and
        field.default_factory is dataclasses.MISSING and field.name not in fields
    ]
    if missing:
      raise ValueError(f"model card is missing fields: {', '.join(missing)}")
    card = cls(**{k: v for k, v in fields.items() if k in known})
    try:
      return card.validate()
    except (TypeError, AttributeError, KeyError, IndexError):
      # A field of the wrong type (a number for a list, say).
      raise ValueError("model card has a field of the wrong type: "
                       + ", ".join(f"{name} is {type(fields[name]).__name__}"
                                   for name in sorted(fields)
                                   if name in known)[:300]) from None


def check_input_scale(input_scale: str, color_mode: str,
                      mean: Optional[list] = None,
                      std: Optional[list] = None) -> None:
  """Raises ValueError unless the scaling fits the colour mode."""
  if input_scale not in preprocessing.INPUT_SCALES:
    raise ValueError(f"input_scale must be one of "
                     f"{preprocessing.INPUT_SCALES}, got {input_scale!r}")
  channels = COLOR_MODES[color_mode]
  if input_scale in ("caffe", "torch") and color_mode != "rgb":
    raise ValueError(f"input_scale {input_scale} needs an rgb model, not "
                     f"{color_mode}")
  if input_scale != "custom":
    if mean is not None or std is not None:
      raise ValueError("input_mean and input_std go with input_scale custom "
                       "only")
    return
  for name, values in (("input_mean", mean), ("input_std", std)):
    if (not isinstance(values, list) or len(values) != channels or
        not all(isinstance(v, (int, float)) for v in values)):
      raise ValueError(f"input_scale custom needs {name} with {channels} "
                       f"number(s), one per channel; got {values!r}")
  if any(v <= 0 for v in std):
    raise ValueError(f"input_std must be positive, got {std}")


def content_hash(*payloads: bytes) -> str:
  """A short SHA-256 over several payloads, each hashed on its own first."""
  digest = hashlib.sha256()
  for payload in payloads:
    digest.update(hashlib.sha256(payload).digest())
  return digest.hexdigest()[:16]


def compute_model_id(card: ModelCard, *model_files: bytes) -> str:
  """The model id: a hash of the served model files and of every card field
  that changes the output (SERVING_FIELDS, and the embedding when there is
  one), so reordered class names or another feeding recipe make another
  id."""
  fields = SERVING_FIELDS + ((EMBEDDING_FIELD,) if card.embedding else ())
  serving = json.dumps({name: getattr(card, name) for name in fields},
                       sort_keys=True).encode()
  return content_hash(serving, *model_files)


def load_card(model_dir: str, card_bytes: Optional[bytes] = None) -> ModelCard:
  """Reads and validates `model_card.json` from a model folder."""
  path = join(model_dir, CARD_FILE)
  if card_bytes is None:
    try:
      card_bytes = read_bounded(path, model_checks.MAX_CONFIG_BYTES)
    except ValueError:
      raise
    except Exception:  # pylint: disable=broad-except
      raise FileNotFoundError(
          f"no model card at {path}: expected a folder made by "
          "`python -m model.train` or `python -m model.adopt`") from None
  try:
    text = card_bytes.decode("utf-8")
  except UnicodeDecodeError:
    raise ValueError(f"{path} is not UTF-8 JSON") from None
  return ModelCard.from_json(text)


def read_bounded(path: str, limit: int) -> bytes:
  """A local or remote file's bytes; ValueError if it holds more than
  `limit` (a local file's size is known before any is read)."""
  with open_file(path) as handle:
    try:
      size = os.fstat(handle.fileno()).st_size
    except (AttributeError, OSError, ValueError):
      size = None  # A remote file: its size shows as it is read.
    if size is not None and size > limit:
      raise ValueError(f"{path} is {size:,} bytes, above the limit of "
                       f"{limit:,}")
    data = handle.read(limit + 1)
  if len(data) > limit:
    raise ValueError(f"{path} is over {limit:,} bytes, the limit")
  return data


def model_files(model_dir: str, card: ModelCard,
                engines: Optional[list] = None) -> list:
  """The files (relative to the folder) that the named engines read, in
  model-id order; a SavedModel contributes every file below its folder."""
  names = []
  for engine in _HASH_ORDER:
    if engine not in (card.engines if engines is None else engines):
      continue
    if engine != "savedmodel":
      names.append(ENGINE_FILES[engine])
      continue
    base = join(model_dir, SAVED_MODEL_DIR)
    names.extend(SAVED_MODEL_DIR + "/" + path[len(base) + 1:]
                 for path in match_paths(base + "/**"))
  return names


def model_payloads(model_dir: str, card: ModelCard) -> list:
  """The bytes `compute_model_id` hashes for a folder: each model file, and
  for a SavedModel each file's relative name before its bytes."""
  payloads = []
  for name in model_files(model_dir, card):
    if name.startswith(SAVED_MODEL_DIR + "/"):
      payloads.append(name.encode())
    # Each file is bounded before it is read (model/model_checks.py).
    limit = (model_checks.MAX_SAVED_MODEL_PB_BYTES
             if name == SAVED_MODEL_DIR + "/saved_model.pb" else
             model_checks.MAX_MODEL_BYTES)
    payloads.append(read_bounded(join(model_dir, name), limit))
  return payloads


def card_summary(card: ModelCard) -> dict[str, Any]:
  """The few card fields worth echoing in logs and manifests; for an
  adopted model that warned, its warnings, which predict repeats."""
  summary = {
      "model_id": card.model_id,
      "architecture": card.architecture,
      "input_shape": card.input_shape,
      "color_mode": card.color_mode,
      "classes": len(card.class_names),
  }
  warnings = adoption_warnings(card)
  if warnings:
    summary["adoption_warnings"] = warnings
  return summary


def adoption_warnings(card: ModelCard) -> list:
  """What model.adopt warned about this model (`adopted.warnings`), as a
  list of strings whatever the card holds."""
  warnings = card.adopted.get("warnings")
  if not isinstance(warnings, list):
    return []
  return [str(text)[:1000] for text in warnings[:20]]


def check_model_files(model_dir: str, card: ModelCard,
                      engine: Optional[str] = None) -> None:
  """Refuses a folder whose model files are not the ones the card describes,
  whose Keras model carries a Lambda layer (arbitrary Python code), or whose
  SavedModel holds ops that reach files or Python.

  Every check reads bytes only, so they run in the launcher before any work.
  With `engine`, the SavedModel's ops are checked only when it serves: that
  check parses with TensorFlow, which a slim install lacks.
  """
  if card.format_version != CARD_FORMAT_VERSION:
    raise ValueError(
        f"model card format {card.format_version}, expected "
        f"{CARD_FORMAT_VERSION}; export the model again with this version")
  for listed in card.engines:
    if not model_files(model_dir, card, [listed]):
      raise ValueError(f"the card lists the {listed} engine but "
                       f"{join(model_dir, ENGINE_FILES[listed])} is missing")
  payloads = model_payloads(model_dir, card)
  actual = compute_model_id(card, *payloads)
  if actual != card.model_id:
    raise ValueError(
        f"{model_dir}: the model files and the card's serving fields hash to "
        f"{actual} but the card says {card.model_id}; the card does not "
        "describe these files (was one of them changed after export?)")
  if "keras" in card.engines:
    path = join(model_dir, MODEL_FILE)
    # Its sizes as the zip declares them, and its config's size and
    # nesting, before any of it is parsed; its weights too when it serves
    # (h5py comes with the Keras engine's TensorFlow).
    config = model_checks.keras_archive_config(
        payloads[0], path, weights=engine in (None, "keras") and
        _has_module("h5py"))
    model_checks.check_keras_config(config, path)
  if "savedmodel" in card.engines and engine in (None, "savedmodel"):
    path = join(model_dir, SAVED_MODEL_DIR)
    model_checks.check_saved_model(read_bounded(
        join(path, "saved_model.pb"), model_checks.MAX_SAVED_MODEL_PB_BYTES),
                                   path)


def _has_module(name: str) -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec(name) is not None
