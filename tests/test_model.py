"""Training data, the model card and export."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from model import card as card_lib
from model import datasets
from model import engines
from model import preprocessing
from tests.helpers import REPO
from tests.helpers import SAMPLE_DIR
from tests.helpers import photo_folder


def test_idx_round_trip(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  path = str(tmp_path / "x-idx3-ubyte.gz")
  datasets.write_idx(path, array)
  np.testing.assert_array_equal(datasets.read_idx(path), array)


def test_sample_is_real_fashion_mnist(sample):
  assert sample.train.images.shape == (600, 28, 28, 1)
  assert sample.test.images.shape == (200, 28, 28, 1)
  assert set(np.unique(sample.train.labels)) == set(range(10))
  # Real photographs of clothes, not noise: mostly dark background.
  assert 50 < sample.train.images.mean() < 110


def test_keras_loader_works_offline_from_its_cache(tmp_path, monkeypatch):
  cache = tmp_path / "datasets" / "fashion-mnist"
  cache.mkdir(parents=True)
  for names in datasets.FASHION_MNIST_FILES.values():
    for name in names:
      shutil.copy(os.path.join(SAMPLE_DIR, name), cache / name)
  monkeypatch.setenv("KERAS_HOME", str(tmp_path))
  import keras  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(keras.config, "keras_home", lambda: str(tmp_path),
                      raising=False)
  # KERAS_HOME is read when Keras is first imported, which an earlier test
  # module may have done; get_file asks this accessor.
  from keras.src.backend import config as keras_config  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(keras_config, "keras_home", lambda: str(tmp_path))
  loaded = datasets.load_fashion_mnist()
  direct = datasets.load_fashion_mnist(SAMPLE_DIR)
  np.testing.assert_array_equal(loaded.test.images, direct.test.images)
  np.testing.assert_array_equal(loaded.train.labels, direct.train.labels)


def test_missing_idx_files_name_what_was_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz|"
                     "train-images-idx3-ubyte.gz"):
    datasets.load_fashion_mnist(str(tmp_path))


def test_image_folder_split_is_seeded_and_decoded_like_serving(tmp_path):
  photo_folder(tmp_path / "photos")
  first = datasets.load_image_folder(str(tmp_path / "photos"), (16, 16), "rgb",
                                     0.25, seed=7)
  again = datasets.load_image_folder(str(tmp_path / "photos"), (16, 16), "rgb",
                                     0.25, seed=7)
  assert first.class_names == ["green", "red"]
  assert len(first.train) == 9 and len(first.test) == 3
  np.testing.assert_array_equal(first.test.images, again.test.images)
  assert first.split_seed == 7
  other = datasets.load_image_folder(str(tmp_path / "photos"), (16, 16), "rgb",
                                     0.25, seed=8)
  assert not np.array_equal(first.test.images, other.test.images)
  # Every training array is exactly what the pipeline's decoder makes.
  decoded = sorted(
      preprocessing.decode_image(open(p, "rb").read(), 16, 16, "rgb").tobytes()
      for p in sorted((tmp_path / "photos").glob("*/*.jpg")))
  loaded = sorted(
      image.tobytes()
      for image in np.concatenate([first.train.images, first.test.images]))
  assert loaded == decoded


@pytest.mark.slow
def test_photo_folder_trains_the_default_photo_model_and_exports_it(tmp_path):
  """The CLI path a user takes for a folder of photos, end to end."""
  photo_folder(tmp_path / "photos", per_class=14, size=(40, 36))
  result = subprocess.run(
      [sys.executable, "-m", "model.train", "--data", str(tmp_path / "photos"),
       "--output", str(tmp_path / "model"), "--epochs", "2",
       "--image_size", "32", "--seed", "3", "--split_seed", "7", "--quiet"],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  card = card_lib.load_card(str(tmp_path / "model"))
  assert card.architecture == "photo_xception"
  assert card.input_shape == [32, 32, 3] and card.color_mode == "rgb"
  assert card.class_names == ["green", "red"]
  assert card.training["seed"] == 3 and card.dataset["split_seed"] == 7
  # Separable convolutions convert to TFLite without changing a top-1.
  assert card.tflite["top1_agreement"] == 1.0
  assert card.tflite["images"] == card.dataset["validation_images"] > 0


def test_too_small_or_empty_folders_fail_clearly(tmp_path):
  from model import train  # pylint: disable=import-outside-toplevel
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError):
    datasets.load_image_folder(str(tmp_path / "empty"), (8, 8), "rgb", 0.2, 0)
  photo_folder(tmp_path / "tiny", per_class=3)
  tiny = datasets.load_image_folder(str(tmp_path / "tiny"), (8, 8), "rgb", 0.2,
                                    0)
  with pytest.raises(ValueError, match="at least 20"):
    train.check_dataset(tiny)


def test_export_writes_a_self_describing_folder(tiny_model, sample):
  names = set(os.listdir(tiny_model))
  assert {card_lib.MODEL_FILE, card_lib.TFLITE_FILE, card_lib.CARD_FILE,
          card_lib.CURVES_FILE} <= names
  card = card_lib.load_card(tiny_model)
  assert card.class_names == datasets.FASHION_MNIST_CLASSES
  assert card.input_shape == [28, 28, 1] and card.color_mode == "grayscale"
  assert card.output == "logits"
  assert card.dataset["train_images"] == 600
  assert card.dataset["test_images"] == 200
  with open(os.path.join(tiny_model, card_lib.MODEL_FILE), "rb") as k, open(
      os.path.join(tiny_model, card_lib.TFLITE_FILE), "rb") as t:
    assert card.model_id == card_lib.compute_model_id(card, k.read(),
                                                      t.read())
  assert card.tflite["top1_agreement"] >= 0.999
  assert card.tflite["images"] == 200
  # The recorded accuracy is what the served model really scores.
  probabilities = engines.load_engine(tiny_model, "keras").probabilities(
      sample.test.images)
  accuracy = (probabilities.argmax(1) == sample.test.labels).mean()
  assert accuracy == pytest.approx(card.metrics["test_accuracy"], abs=1e-6)
  np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
  curves = Image.open(os.path.join(tiny_model, card_lib.CURVES_FILE))
  assert curves.size == (1000, 400)


def test_engines_agree(tiny_model, sample):
  keras_p = engines.load_engine(tiny_model, "keras").probabilities(
      sample.test.images)
  tflite_p = engines.load_engine(tiny_model, "tflite", 1).probabilities(
      sample.test.images)
  np.testing.assert_allclose(keras_p, tflite_p, atol=1e-4)


def test_tflite_runs_large_batches_in_slices_with_the_same_outputs(
    tiny_model, sample, monkeypatch):
  whole = engines.load_engine(tiny_model, "tflite", 1).probabilities(
      sample.test.images)
  # 28x28 values per image: slices of 16 rows, the last one shorter.
  assert preprocessing.rows_per_slice(28 * 28) == 1 << 12
  monkeypatch.setattr(preprocessing, "MAX_SLICE_VALUES", 16 * 28 * 28 + 5)
  assert preprocessing.rows_per_slice(28 * 28) == 16
  engine = engines.load_engine(tiny_model, "tflite", 1)
  sliced = engine.probabilities(sample.test.images)
  assert len(sample.test.images) % 16 == engine._batch_size == 8  # pylint: disable=protected-access
  np.testing.assert_array_equal(sliced, whole)
  assert preprocessing.rows_per_slice(10**9) == 1


def test_random_affine_is_exact_at_identity_and_mirrors_exactly():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from model import architectures  # pylint: disable=import-outside-toplevel
  images = np.random.default_rng(0).uniform(0, 255, (16, 9, 7, 3)).astype(
      np.float32)
  seed = tf.constant([1, 2], tf.int64)
  same = architectures.random_affine(images, seed, flip=False).numpy()
  np.testing.assert_array_equal(same, images)
  flipped = architectures.random_affine(images, seed).numpy()
  mirrored = [np.array_equal(f, x[:, ::-1]) for f, x in zip(flipped, images)]
  kept = [np.array_equal(f, x) for f, x in zip(flipped, images)]
  assert all(m or k for m, k in zip(mirrored, kept))
  assert 0 < sum(mirrored) < len(images)
  # The seed decides: the same pair gives the same batch, another does not.
  jittered = [architectures.photo_augmentation(0)(images, s).numpy()
              for s in (seed, seed, seed + 1)]
  np.testing.assert_array_equal(jittered[0], jittered[1])
  assert not np.array_equal(jittered[0], jittered[2])
  assert jittered[0].min() >= 0 and jittered[0].max() <= 255


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["tutorial_mlp", "fashion_cnn"])
def test_training_is_reproducible_with_a_seed(tmp_path, sample, architecture):
  """fashion_cnn covers augmentation; the MLP the plain path."""
  from model import train  # pylint: disable=import-outside-toplevel
  small = datasets.Dataset(
      "fashion_mnist", sample.class_names, "grayscale",
      datasets.Split(sample.train.images[:200], sample.train.labels[:200]),
      datasets.Split(sample.test.images[:50], sample.test.labels[:50]),
      "test", "sample")
  cards = [train.train(small, architecture, str(tmp_path / name), epochs=1,
                       seed=5, verbose=0) for name in ("a", "b")]
  assert cards[0].metrics == cards[1].metrics
  outputs = [engines.load_engine(str(tmp_path / name), "keras").probabilities(
      small.test.images) for name in ("a", "b")]
  np.testing.assert_array_equal(outputs[0], outputs[1])


def test_card_validation_names_the_field():
  fields = json.loads(card_lib.ModelCard(
      "id", "arch", ["a", "b"], [4, 4, 1], "grayscale", "logits").to_json())
  fields["color_mode"] = "cmyk"
  with pytest.raises(ValueError, match="color_mode"):
    card_lib.ModelCard.from_json(json.dumps(fields))
  del fields["class_names"]
  with pytest.raises(ValueError, match="class_names"):
    card_lib.ModelCard.from_json(json.dumps(fields))


@pytest.mark.slow
def test_train_cli_bad_path_is_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "model.train", "--data", str(tmp_path / "nope"),
       "--output", str(tmp_path / "m")],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0
  assert "no data folder" in result.stderr
