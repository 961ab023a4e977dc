"""Pretrained keras.applications backbones for transfer learning.

A backbone model is a headless keras.applications network, called in
inference mode, under a new head (global pooling, dropout, logits). It trains
in two phases, as the Keras transfer-learning guide does: the head alone on
the frozen backbone, then the top blocks with a small learning rate. Each
family here carries its own input scaling as its first layers, so its input
is the decoded image as float32 in [0, 255], like every other model of this
project, and serving needs nothing more than the card.

The three families are the small keras.applications networks built for
mobile CPUs whose preprocessing is inside the model: MobileNetV3Small and
MobileNetV3Large (depthwise convolutions, as in photo_xception, which TFLite's
XNNPACK serves cheaply) and EfficientNetV2B0 (the smallest EfficientNetV2,
more accurate on ImageNet and dearer to run; benchmarks/README.md has the
costs measured here).
"""

import dataclasses
import hashlib
import os
import re
from typing import Callable, Optional

import keras

# The ImageNet weights come from where keras.applications downloads them.
_MOBILENET_V3_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/")
_EFFICIENTNET_V2_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/"
    "efficientnet_v2/")
WEIGHTS_EXTENSIONS = (".weights.h5", ".keras", ".h5")
HEAD_DROPOUT = 0.2  # the Keras transfer-learning guide's head


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A keras.applications family and what transfer learning needs of it."""
  constructor: Callable[..., keras.Model]
  # The headless ImageNet file keras.applications downloads, and its MD5.
  weights_file: str
  weights_url: str
  weights_md5: str
  # Layer names start with their block's name followed by "_".
  block_pattern: str
  # The blocks of the last stage, at the coarsest grid: the default to
  # fine-tune.
  fine_tune_blocks: int
  rescaling: str  # what the family's own first layers do to the pixels


def _mobilenet_v3(constructor, size: str, md5: str) -> Backbone:
  """MobileNetV3 at width 1.0, named as keras.applications names its file."""
  return Backbone(
      constructor,
      weights_file=f"weights_mobilenet_v3_{size}_224_1.0_float_no_top_v2.h5",
      weights_url=_MOBILENET_V3_URL,
      weights_md5=md5,
      block_pattern=r"expanded_conv(?:_\d+)?",
      fine_tune_blocks=3,
      rescaling="inside the model: x / 127.5 - 1 (MobileNetV3's Rescaling)")


BACKBONES = {
    "MobileNetV3Small": _mobilenet_v3(keras.applications.MobileNetV3Small,
                                      "small",
                                      "d3e8ec802a04aa4fc771ee12a9a9b836"),
    "MobileNetV3Large": _mobilenet_v3(keras.applications.MobileNetV3Large,
                                      "large",
                                      "07fb09a5933dd0c8eaafa16978110389"),
    "EfficientNetV2B0": Backbone(
        keras.applications.EfficientNetV2B0,
        weights_file="efficientnetv2-b0_notop.h5",
        weights_url=_EFFICIENTNET_V2_URL,
        weights_md5="893217f2bb855e2983157299931e43ff",
        block_pattern=r"block\d+[a-z]",
        fine_tune_blocks=8,
        rescaling="inside the model: x / 255, then ImageNet mean and standard "
        "deviation (EfficientNetV2's Rescaling and Normalization)"),
}


@dataclasses.dataclass(frozen=True)
class Weights:
  """Where a backbone's starting weights come from."""
  source: str  # "imagenet", "file" or "none"
  path: Optional[str] = None  # the local file loaded, if any
  sha256: Optional[str] = None

  def describe(self) -> dict:
    """The card's record: the source, the file's name and its SHA-256."""
    return {"source": self.source,
            "file": os.path.basename(self.path) if self.path else None,
            "sha256": self.sha256}


def get_backbone(name: str) -> Backbone:
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}: expected one of "
                     f"{', '.join(BACKBONES)}")
  return BACKBONES[name]


def keras_models_dir() -> str:
  """Where keras.applications keeps downloaded weights: $KERAS_HOME/models."""
  home = os.environ.get("KERAS_HOME") or os.path.join(
      os.path.expanduser("~"), ".keras")
  return os.path.join(home, "models")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as handle:
    for chunk in iter(lambda: handle.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def resolve_weights(name: str, weights: str) -> Weights:
  """Turns --weights (imagenet, none or a local file) into a local file.

  "imagenet" is fetched as keras.applications fetches it: from the cache in
  $KERAS_HOME/models (~/.keras/models by default) when the file there has the
  expected MD5, else downloaded. Raises RuntimeError in one line, naming the
  file to bring, when it cannot be had.
  """
  backbone = get_backbone(name)
  if weights == "none":
    return Weights("none")
  if weights == "imagenet":
    models_dir = keras_models_dir()
    # Keras falls back to /tmp/.keras when its home does not exist yet.
    os.makedirs(models_dir, exist_ok=True)
    url = backbone.weights_url + backbone.weights_file
    try:
      path = keras.utils.get_file(
          backbone.weights_file, url,
          cache_dir=os.path.dirname(models_dir),
          cache_subdir=os.path.basename(models_dir),
          file_hash=backbone.weights_md5)
    except Exception as error:  # pylint: disable=broad-except
      # Keras raises a bare Exception for a failed fetch ("URL fetch failure
      # on URL: CODE -- REASON") and ValueError for a corrupt download.
      reason = " ".join(str(error).split(" -- ")[-1].split())
      raise RuntimeError(
          f"cannot download the ImageNet weights of {name} from {url} "
          f"({reason}); copy that file into {models_dir}/ or pass its path "
          "with --weights PATH") from None
    return Weights("imagenet", path, _sha256(path))
  if not weights.endswith(WEIGHTS_EXTENSIONS):
    raise ValueError(
        f"--weights must be imagenet, none or a local .weights.h5, .keras or "
        f".h5 file of a headless {name}, got {weights!r}")
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"no weights file at {weights}")
  return Weights("file", os.path.abspath(weights), _sha256(weights))


def build_backbone(name: str, input_shape: tuple,
                   weights: Weights) -> keras.Model:
  """The headless network with its own input scaling, weights loaded."""
  backbone = get_backbone(name).constructor(
      input_shape=tuple(input_shape), include_top=False, weights=None)
  if weights.path:
    try:
      backbone.load_weights(weights.path)
    except (ValueError, OSError, KeyError) as error:
      # Keras refuses a file whose layers or shapes differ; its message runs
      # over many lines.
      detail = " ".join(str(error).split())[:300]
      raise ValueError(f"{weights.path} does not hold the weights of a "
                       f"headless {name}: {detail}") from None
  return backbone


def build_classifier(name: str, input_shape: tuple, num_classes: int,
                     weights: Weights) -> keras.Model:
  """The backbone, frozen and in inference mode, under a new head.

  `training=False` keeps the backbone's BatchNormalization layers on their
  ImageNet statistics even once its top blocks are unfrozen (the Keras
  transfer-learning guide explains why).
  """
  backbone = build_backbone(name, input_shape, weights)
  backbone.trainable = False
  inputs = keras.Input(shape=tuple(input_shape), name="image")
  x = backbone(inputs, training=False)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  x = keras.layers.Dropout(HEAD_DROPOUT, name="head_dropout")(x)
  outputs = keras.layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, outputs, name=f"{name}_classifier")


def backbone_of(model: keras.Model) -> keras.Model:
  """The nested backbone of a model made by build_classifier."""
  return next(layer for layer in model.layers
              if isinstance(layer, keras.Model))


def block_names(name: str, backbone: keras.Model) -> list:
  """The backbone's blocks, bottom to top."""
  pattern = re.compile(rf"({get_backbone(name).block_pattern})_")
  blocks = []
  for layer in backbone.layers:
    match = pattern.match(layer.name)
    if match and match.group(1) not in blocks:
      blocks.append(match.group(1))
  return blocks


def check_block_count(name: str, model: keras.Model, count: int) -> list:
  """The backbone's blocks, after checking that `count` of them exist."""
  blocks = block_names(name, backbone_of(model))
  if not 1 <= count <= len(blocks):
    raise ValueError(f"--fine_tune_blocks must be between 1 and {len(blocks)} "
                     f"(the blocks of {name}), got {count}")
  return blocks


def unfreeze_top_blocks(name: str, model: keras.Model, count: int) -> dict:
  """Makes the top `count` blocks and the layers above them trainable.

  BatchNormalization layers stay frozen: in Keras 3 a frozen one also runs in
  inference mode, and its gamma and beta keep their ImageNet values, as in
  keras-io's EfficientNet fine-tuning example. Returns what was unfrozen.
  Recompile the model afterwards: compile() fixes what trains.
  """
  blocks = check_block_count(name, model, count)
  backbone = backbone_of(model)
  start = next(index for index, layer in enumerate(backbone.layers)
               if layer.name.startswith(blocks[-count] + "_"))
  backbone.trainable = True
  for index, layer in enumerate(backbone.layers):
    layer.trainable = (index >= start and not isinstance(
        layer, keras.layers.BatchNormalization))
  above = [layer.name for layer in backbone.layers[start:]
           if layer.trainable and layer.weights and
           not any(layer.name.startswith(block + "_") for block in blocks)]
  return {"unfrozen_blocks": blocks[-count:], "unfrozen_layers_above": above,
          "batch_normalization": "frozen, inference mode"}
