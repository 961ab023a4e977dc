"""The model card: everything the pipeline needs to serve an exported model.

An exported model is one folder holding `model.keras`, `model.tflite` and
`model_card.json`. The card is the only contract between training and serving:
colour mode, input size, resize rule, value range and output kind all come
from it, so serving cannot drift from training.
"""

import dataclasses
import hashlib
import json
import re
from typing import Any, Optional

from model.paths import join
from model.paths import read_bytes

MODEL_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
CARD_FILE = "model_card.json"
CURVES_FILE = "training_curves.png"
# What serving reads from a model folder.
MODEL_FILES = (CARD_FILE, MODEL_FILE, TFLITE_FILE)

COLOR_MODES = {"grayscale": 1, "rgb": 3}
OUTPUT_KINDS = ("logits", "probabilities")
# 2: model_id covers the card's serving fields as well as the model files.
CARD_FORMAT_VERSION = 2
# Every card field that changes what serving outputs for an image.
SERVING_FIELDS = ("class_names", "input_shape", "color_mode", "output",
                  "preprocessing")


@dataclasses.dataclass
class ModelCard:
  """Describes an exported classifier. See the README for each field."""

  model_id: str
  architecture: str
  class_names: list
  input_shape: list  # [height, width, channels]
  color_mode: str
  output: str  # "logits" or "probabilities"
  # How raw pixels become the model input. Rescaling happens inside the model,
  # so the input is the decoded uint8 image as float32 in [0, 255].
  preprocessing: dict = dataclasses.field(default_factory=dict)
  dataset: dict = dataclasses.field(default_factory=dict)
  metrics: dict = dataclasses.field(default_factory=dict)
  training: dict = dataclasses.field(default_factory=dict)
  tflite: dict = dataclasses.field(default_factory=dict)
  format_version: int = CARD_FORMAT_VERSION

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

  def validate(self) -> "ModelCard":
    """Raises ValueError naming the first field that is not as expected."""
    if self.color_mode not in COLOR_MODES:
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
    if self.output not in OUTPUT_KINDS:
      raise ValueError(
          f"model card output must be one of {OUTPUT_KINDS}, got {self.output!r}")
    if len(self.class_names) < 2:
      raise ValueError("model card needs at least two class_names")
    return self

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

  @classmethod
  def from_json(cls, text: str) -> "ModelCard":
    try:
      fields = json.loads(text)
    except json.JSONDecodeError as error:
      raise ValueError(f"model card is not valid JSON: {error}") from None
    known = {field.name for field in dataclasses.fields(cls)}
    missing = [
        field.name for field in dataclasses.fields(cls)
        if field.default is dataclasses.MISSING and
        field.default_factory is dataclasses.MISSING and field.name not in fields
    ]
    if missing:
      raise ValueError(f"model card is missing fields: {', '.join(missing)}")
    return cls(**{k: v for k, v in fields.items() if k in known}).validate()


def content_hash(*payloads: bytes) -> str:
  """A short SHA-256 over several payloads, each hashed on its own first."""
  digest = hashlib.sha256()
  for payload in payloads:
    digest.update(hashlib.sha256(payload).digest())
  return digest.hexdigest()[:16]


def compute_model_id(card: ModelCard, *model_files: bytes) -> str:
  """The model id: a hash of the served model files and of every card field
  that changes the output (SERVING_FIELDS), so reordered class names or
  another feeding recipe make another id."""
  serving = json.dumps({name: getattr(card, name) for name in SERVING_FIELDS},
                       sort_keys=True).encode()
  return content_hash(serving, *model_files)


def load_card(model_dir: str, card_bytes: Optional[bytes] = None) -> ModelCard:
  """Reads and validates `model_card.json` from a model folder."""
  path = join(model_dir, CARD_FILE)
  if card_bytes is None:
    try:
      card_bytes = read_bytes(path)
    except Exception:  # pylint: disable=broad-except
      raise FileNotFoundError(
          f"no model card at {path}: expected a folder made by "
          "`python -m model.train` holding model.keras, model.tflite and "
          "model_card.json") from None
  return ModelCard.from_json(card_bytes.decode("utf-8"))


def card_summary(card: ModelCard) -> dict[str, Any]:
  """The few card fields worth echoing in logs and manifests."""
  return {
      "model_id": card.model_id,
      "architecture": card.architecture,
      "input_shape": card.input_shape,
      "color_mode": card.color_mode,
      "classes": len(card.class_names),
  }


def check_model_files(model_dir: str, card: ModelCard) -> list:
  """Refuses a folder whose model files are not the ones the card describes,
  or whose Keras model carries a Lambda layer (arbitrary Python code).

  Both checks read bytes only, so they run in the launcher before any work.
  Returns the bytes of model.keras and model.tflite.
  """
  import io  # pylint: disable=import-outside-toplevel
  import zipfile  # pylint: disable=import-outside-toplevel
  if card.format_version != CARD_FORMAT_VERSION:
    raise ValueError(
        f"model card format {card.format_version}, expected "
        f"{CARD_FORMAT_VERSION}; export the model again with this version")
  payloads = [read_bytes(join(model_dir, name))
              for name in (MODEL_FILE, TFLITE_FILE)]
  actual = compute_model_id(card, *payloads)
  if actual != card.model_id:
    raise ValueError(
        f"{model_dir}: the model files and the card's serving fields hash to "
        f"{actual} but the card says {card.model_id}; the card does not "
        "describe these files (was one of them changed after export?)")
  try:
    with zipfile.ZipFile(io.BytesIO(payloads[0])) as archive:
      config = archive.read("config.json").decode("utf-8")
  except (zipfile.BadZipFile, KeyError):
    raise ValueError(f"{join(model_dir, MODEL_FILE)} is not a Keras 3 "
                     ".keras file") from None
  unsafe = unsafe_objects(json.loads(config))
  if unsafe:
    raise ValueError(
        f"{join(model_dir, MODEL_FILE)} has {unsafe[0]}, which runs arbitrary "
        "Python code when loaded or comes from outside Keras; it is refused "
        "(Keras safe_mode)")
  return payloads


# Keras serialises Python lambdas under this class name; Lambda layers hold
# them.
_CODE_CLASSES = ("Lambda", "__lambda__")
# Packages a served model's objects may come from (`module` in the config).
_SAFE_PACKAGES = ("keras", "builtins")


def unsafe_objects(config) -> list:
  """Every object in a Keras model config that can carry code: a Lambda
  layer or serialised lambda, however its class is spelled (`Lambda`,
  `layers.Lambda`, `keras.layers.Lambda`, `package>Lambda`), and any object
  whose module lies outside Keras."""
  found, stack = [], [config]
  while stack:
    node = stack.pop()
    if isinstance(node, dict):
      for key in ("class_name", "registered_name"):
        name = node.get(key)
        if isinstance(name, str) and (
            re.split(r"[.>]", name)[-1] in _CODE_CLASSES):
          found.append(f"a Lambda layer or lambda ({key} {name!r})")
      module = node.get("module")
      if isinstance(module, str) and (
          module.split(".", 1)[0] not in _SAFE_PACKAGES):
        found.append(f"an object from module {module!r}")
      stack.extend(node.values())
    elif isinstance(node, list):
      stack.extend(node)
  return found
