"""Transfer learning on keras.applications backbones, offline.

No ImageNet weights can be had here, so the tests stand in for them with
random backbones whose BatchNormalization statistics are set from their own
activations: like pretrained ones, their features do not vanish in inference
mode, which a freshly initialised backbone's do.
"""

import dataclasses
import hashlib
import os

import numpy as np
import pytest

# Without the tensorflow extra these tests skip.
keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")
# pylint: disable=wrong-import-position

from model import backbones
from model import card as card_lib
from model import datasets
from model import engines
from model import export
from model import preprocessing
from model import train
from tests.helpers import photo_folder
from tests.helpers import run_predict

FAMILIES = list(backbones.BACKBONES)
SIZE = 32  # the smallest input keras.applications accepts


def _sha256(path) -> str:
  with open(path, "rb") as handle:
    return hashlib.sha256(handle.read()).hexdigest()


def _calibrated_backbone(name: str, images: np.ndarray, seed: int = 0):
  """A random backbone whose moving statistics are those of `images`."""
  keras.utils.set_random_seed(seed)
  backbone = backbones.build_backbone(name, images.shape[1:],
                                      backbones.Weights("none"))
  for layer in backbone.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.momentum = 0.0  # the moving statistics become this batch's
  backbone(images.astype(np.float32), training=True)
  return backbone


def _save(backbone, path: str) -> str:
  """Saves a backbone's weights in the format the file name asks for."""
  if path.endswith(".weights.h5"):
    backbone.save_weights(path)
  elif path.endswith(".keras"):
    backbone.save(path)
  else:
    # The legacy H5 layout of the files keras.applications downloads.
    from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=import-outside-toplevel
    with h5py.File(path, "w") as handle:
      legacy_h5_format.save_weights_to_hdf5_group(handle, backbone)
  return path


def _noise(count: int = 8, size: int = SIZE, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(
      0, 255, (count, size, size, 3)).astype(np.float32)


def test_weight_files_are_the_ones_keras_applications_downloads():
  """Our table names the files and hashes Keras itself fetches."""
  from keras.src.applications import efficientnet_v2  # pylint: disable=import-outside-toplevel
  from keras.src.applications import mobilenet_v3  # pylint: disable=import-outside-toplevel
  keras_files = {
      "MobileNetV3Small": (mobilenet_v3.BASE_WEIGHT_PATH,
                           mobilenet_v3.WEIGHTS_HASHES["small_224_1.0_float"][1]),
      "MobileNetV3Large": (mobilenet_v3.BASE_WEIGHT_PATH,
                           mobilenet_v3.WEIGHTS_HASHES["large_224_1.0_float"][1]),
      "EfficientNetV2B0": (efficientnet_v2.BASE_WEIGHTS_PATH,
                           efficientnet_v2.WEIGHTS_HASHES["b0"][1]),
  }
  for name, (url, md5) in keras_files.items():
    spec = backbones.BACKBONES[name]
    assert (spec.weights_url, spec.weights_md5) == (url, md5)
  assert backbones.BACKBONES["MobileNetV3Small"].weights_file == (
      "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5")
  assert backbones.BACKBONES["EfficientNetV2B0"].weights_file == (
      "efficientnetv2-b0_notop.h5")


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".weights.h5", ".keras", "_legacy.h5"])
def test_weights_path_loads_exactly_the_saved_weights(tmp_path, suffix):
  saved = _calibrated_backbone("MobileNetV3Small", _noise())
  # Perturb every variable so that no value could come from initialisation.
  rng = np.random.default_rng(1)
  for variable in saved.weights:
    variable.assign(variable.numpy() + rng.normal(
        0, 0.01, variable.shape).astype(np.float32))
  path = _save(saved, str(tmp_path / f"backbone{suffix}"))

  weights = backbones.resolve_weights("MobileNetV3Small", path)
  assert weights.source == "file" and weights.sha256 == _sha256(path)
  model = backbones.build_classifier("MobileNetV3Small", (SIZE, SIZE, 3), 3,
                                     weights)
  loaded = backbones.backbone_of(model).weights
  assert len(loaded) == len(saved.weights) > 100
  for before, after in zip(saved.weights, loaded):
    assert before.path == after.path
    np.testing.assert_array_equal(before.numpy(), after.numpy())


@pytest.mark.slow
def test_wrong_weights_files_fail_in_one_line(tmp_path):
  path = _save(_calibrated_backbone("MobileNetV3Small", _noise()),
               str(tmp_path / "small.weights.h5"))
  weights = backbones.resolve_weights("MobileNetV3Large", path)
  with pytest.raises(ValueError, match="does not hold the weights of a "
                     "headless MobileNetV3Large") as error:
    backbones.build_backbone("MobileNetV3Large", (SIZE, SIZE, 3), weights)
  assert "\n" not in str(error.value)
  with pytest.raises(FileNotFoundError, match="no weights file"):
    backbones.resolve_weights("MobileNetV3Small", str(tmp_path / "x.keras"))
  with pytest.raises(ValueError, match="imagenet, none or a local"):
    backbones.resolve_weights("MobileNetV3Small", str(tmp_path / "x.pt"))
  with pytest.raises(ValueError, match="unknown backbone"):
    backbones.resolve_weights("ResNet50", "none")


def _unreachable(monkeypatch, name):
  """Points a backbone's download at a port where nothing listens."""
  spec = backbones.BACKBONES[name]
  monkeypatch.setitem(backbones.BACKBONES, name, dataclasses.replace(
      spec, weights_url="http://127.0.0.1:9/"))


def test_imagenet_weights_come_from_the_keras_cache_without_network(
    tmp_path, monkeypatch):
  """The offline route: the downloaded file dropped in $KERAS_HOME/models."""
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
  spec = backbones.BACKBONES["MobileNetV3Small"]
  os.makedirs(tmp_path / "keras" / "models")
  path = _save(_calibrated_backbone("MobileNetV3Small", _noise()),
               str(tmp_path / "keras" / "models" / spec.weights_file))
  with open(path, "rb") as handle:
    md5 = hashlib.md5(handle.read()).hexdigest()
  _unreachable(monkeypatch, "MobileNetV3Small")
  monkeypatch.setitem(backbones.BACKBONES, "MobileNetV3Small",
                      dataclasses.replace(backbones.BACKBONES[
                          "MobileNetV3Small"], weights_md5=md5))
  weights = backbones.resolve_weights("MobileNetV3Small", "imagenet")
  assert weights.source == "imagenet" and weights.path == path
  assert weights.describe() == {"source": "imagenet",
                                "file": spec.weights_file,
                                "sha256": _sha256(path)}


def test_imagenet_without_network_is_one_line_naming_the_file(
    tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
  _unreachable(monkeypatch, "EfficientNetV2B0")
  photo_folder(tmp_path / "photos")
  status = train.main(["--data", str(tmp_path / "photos"), "--output",
                       str(tmp_path / "model"), "--backbone",
                       "EfficientNetV2B0"])
  error = capsys.readouterr().err
  assert status == 2
  assert error.count("\n") == 1 and error.startswith("model.train: error: ")
  assert "efficientnetv2-b0_notop.h5" in error
  assert os.path.join(str(tmp_path / "keras"), "models") in error
  assert "--weights PATH" in error
  assert not os.path.exists(tmp_path / "model")
  assert os.listdir(tmp_path / "keras" / "models") == []  # no partial file


def test_transfer_flags_need_a_backbone(tmp_path, capsys):
  status = train.main(["--output", str(tmp_path / "m"), "--weights", "none"])
  assert status == 2 and "--weights need --backbone" in capsys.readouterr().err
  status = train.main(["--output", str(tmp_path / "m"), "--backbone",
                       "MobileNetV3Small", "--architecture", "photo_cnn"])
  assert status == 2 and "not both" in capsys.readouterr().err


def _trainable_paths(model) -> set:
  return {variable.path for variable in model.trainable_weights}


@pytest.mark.parametrize("name,blocks", [
    ("MobileNetV3Small", 11), ("MobileNetV3Large", 15),
    pytest.param("EfficientNetV2B0", 21, marks=pytest.mark.slow)])
def test_fine_tuning_unfreezes_exactly_the_top_blocks(name, blocks):
  model = backbones.build_classifier(name, (SIZE, SIZE, 3), 3,
                                     backbones.Weights("none"))
  backbone = backbones.backbone_of(model)
  names = backbones.block_names(name, backbone)
  assert len(names) == blocks
  head = {"logits/kernel", "logits/bias"}
  assert _trainable_paths(model) == head

  unfrozen = backbones.unfreeze_top_blocks(name, model, 2)
  assert unfrozen["unfrozen_blocks"] == names[-2:]
  last_block_layer = max(index for index, layer in enumerate(backbone.layers)
                         if layer.name.startswith(names[-1] + "_"))
  above = [layer for layer in backbone.layers[last_block_layer + 1:]
           if layer.weights and
           not isinstance(layer, keras.layers.BatchNormalization)]
  # MobileNetV3's 1x1 conv_1 and EfficientNetV2's top_conv sit above the
  # blocks; they are the top of the network, so they train too.
  assert unfrozen["unfrozen_layers_above"] == [layer.name for layer in above]
  expected = set(head)
  for layer in backbone.layers:
    in_top_blocks = any(layer.name.startswith(block + "_")
                        for block in names[-2:])
    if isinstance(layer, keras.layers.BatchNormalization):
      assert not layer.trainable, layer.name
    elif in_top_blocks or layer in above:
      expected.update(variable.path for variable in layer.trainable_weights)
    else:
      assert not layer.trainable_weights, layer.name
  assert _trainable_paths(model) == expected
  assert len(expected) > len(head)

  with pytest.raises(ValueError, match=f"between 1 and {blocks}"):
    backbones.unfreeze_top_blocks(name, model, blocks + 1)


@pytest.mark.slow
def test_a_fine_tuning_step_moves_only_the_unfrozen_weights(tmp_path):
  """BatchNorm statistics and the frozen blocks survive a training step."""
  images = _noise(16)
  path = _save(_calibrated_backbone("MobileNetV3Small", images),
               str(tmp_path / "backbone.weights.h5"))
  model = backbones.build_classifier(
      "MobileNetV3Small", (SIZE, SIZE, 3), 2,
      backbones.resolve_weights("MobileNetV3Small", path))
  backbones.unfreeze_top_blocks("MobileNetV3Small", model, 1)
  trainable = _trainable_paths(model)
  before = {v.path: v.numpy().copy() for v in model.weights}
  model.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
  model.fit(images, np.arange(16) % 2, batch_size=8, epochs=1, verbose=0)
  moved = {v.path for v in model.weights
           if not np.array_equal(before[v.path], v.numpy())}
  assert moved <= trainable
  assert "logits/kernel" in moved
  assert any(path.startswith("expanded_conv_10_") for path in moved)
  assert not any("moving_" in path for path in moved)


def _labels_served(tmp_path, model_dir, images_dir, engine):
  run = run_predict(tmp_path / f"out_{engine}", input=str(images_dir),
                    model=model_dir, engine=engine)
  assert run.manifest["counts"]["errors"] == 0
  return {row["id"]: row["label"] for row in run.predictions}


def _assert_tflite_agrees_on_noise(model_dir: str) -> None:
  """The export checked TFLite on the held-out images; noise images spread
  the logits wider. The logits of these random backbones reach the hundreds,
  where float32 rounding alone moves a near-tie's probabilities by 1e-3."""
  noise = _noise(64, seed=2)
  tflite = engines.load_engine(model_dir, "tflite").probabilities(noise)
  reference = engines.load_engine(model_dir, "keras").probabilities(noise)
  np.testing.assert_array_equal(tflite.argmax(1), reference.argmax(1))
  np.testing.assert_allclose(tflite, reference, atol=1e-2)


@pytest.mark.slow
def test_backbone_trains_both_phases_exports_and_serves(tmp_path):
  """Both phases for a step or two, then TFLite and the pipeline agree."""
  name = "MobileNetV3Small"
  photo_folder(tmp_path / "photos", per_class=14, size=(40, 36))
  dataset = datasets.load_image_folder(str(tmp_path / "photos"), (SIZE, SIZE),
                                       "rgb", 0.25, seed=0)
  path = _save(_calibrated_backbone(name, dataset.train.images),
               str(tmp_path / "backbone.weights.h5"))
  out = str(tmp_path / "model")
  card = train.train_backbone(dataset, name, out, weights=path, epochs=1,
                              batch_size=8, learning_rate=1e-2,
                              fine_tune_epochs=1, fine_tune_blocks=2,
                              verbose=0)

  assert card.architecture == name and card.input_shape == [SIZE, SIZE, 3]
  assert card.preprocessing["input_scale"] == "raw"
  assert card.preprocessing["input_value_range"] == [0, 255]
  section = card.training["backbone"]
  assert section["weights"] == {"source": "file", "file": "backbone.weights.h5",
                                "sha256": _sha256(path)}
  head, fine_tune = section["phases"]
  assert (head["name"], head["epochs"], head["learning_rate"]) == (
      "head", 1, 1e-2)
  assert (fine_tune["name"], fine_tune["epochs"]) == ("fine_tune", 1)
  assert fine_tune["learning_rate"] == train.BACKBONE_FINE_TUNE_LEARNING_RATE
  assert fine_tune["unfrozen_blocks"] == ["expanded_conv_9", "expanded_conv_10"]
  assert fine_tune["unfrozen_layers_above"] == ["conv_1"]
  assert card.training["epochs"] == 2
  assert card.tflite["top1_agreement"] >= 0.999
  assert os.path.isfile(os.path.join(out, card_lib.CURVES_FILE))

  # The served model is the trained one: its logits vary with the image.
  logits = keras.saving.load_model(os.path.join(out, card_lib.MODEL_FILE))(
      dataset.test.images.astype(np.float32)).numpy()
  assert np.ptp(logits[:, 0] - logits[:, 1]) > 1e-3, logits
  files = sorted((tmp_path / "photos").glob("*/*.jpg"))
  pixels = np.stack([preprocessing.decode_image(path.read_bytes(), SIZE, SIZE,
                                                "rgb") for path in files])
  indices = engines.load_engine(out, "keras").probabilities(pixels).argmax(1)
  expected = {str(path): card.class_names[index]
              for path, index in zip(files, indices)}
  assert card.engines == ["keras", "tflite"]
  for engine in card.engines:
    assert _labels_served(tmp_path, out, tmp_path / "photos",
                          engine) == expected
  _assert_tflite_agrees_on_noise(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_exports_a_model_tflite_and_serving_agree_on(tmp_path,
                                                                 name):
  """Conversion alone, at the smallest input: training is the test above."""
  images = _noise(16, seed=3)
  path = _save(_calibrated_backbone(name, images),
               str(tmp_path / "backbone.weights.h5"))
  keras.utils.set_random_seed(0)
  model = backbones.build_classifier(
      name, (SIZE, SIZE, 3), 3, backbones.resolve_weights(name, path))
  out = str(tmp_path / "model")
  card = export.export_model(
      model, out, architecture=name, class_names=["a", "b", "c"],
      color_mode="rgb", test_images=images, dataset={}, metrics={},
      training={}, rescaling=backbones.get_backbone(name).rescaling)
  assert card.tflite["top1_agreement"] == 1.0
  # Serving's checks pass: the card describes the files, and no Lambda.
  card_lib.check_model_files(out, card_lib.load_card(out))
  _assert_tflite_agrees_on_noise(out)


def test_bad_settings_fail_before_any_training(tmp_path):
  photo_folder(tmp_path / "photos", per_class=14)
  small = datasets.load_image_folder(str(tmp_path / "photos"), (16, 16), "rgb",
                                     0.25, seed=0)
  with pytest.raises(ValueError, match="RGB images of at least 32x32"):
    train.train_backbone(small, "MobileNetV3Small", str(tmp_path / "a"),
                         weights="none")
  grey = datasets.load_image_folder(str(tmp_path / "photos"), (SIZE, SIZE),
                                    "grayscale", 0.25, seed=0)
  with pytest.raises(ValueError, match="RGB images"):
    train.train_backbone(grey, "MobileNetV3Small", str(tmp_path / "b"),
                         weights="none")
  photos = datasets.load_image_folder(str(tmp_path / "photos"), (SIZE, SIZE),
                                      "rgb", 0.25, seed=0)
  with pytest.raises(ValueError, match="between 1 and 11"):
    train.train_backbone(photos, "MobileNetV3Small", str(tmp_path / "c"),
                         weights="none", fine_tune_blocks=12)
  assert not any(os.path.exists(tmp_path / name) for name in "abc")
