"""Shared fixtures: the embedded sample, a tiny trained model, PNG folders."""

import os

import numpy as np
import pytest

from model import datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(REPO, "sample_data", "fashion-mnist")


@pytest.fixture(scope="session")
def sample():
  return datasets.load_fashion_mnist(SAMPLE_DIR)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sample):
  """The tutorial MLP trained briefly on the sample; exported for serving."""
  from model import train  # pylint: disable=import-outside-toplevel
  out = str(tmp_path_factory.mktemp("model"))
  train.train(sample, "tutorial_mlp", out, epochs=3, seed=1, verbose=0)
  return out


@pytest.fixture(scope="session")
def png_dir(tmp_path_factory, sample):
  """The sample's 200 test images as PNG files in class folders."""
  out = str(tmp_path_factory.mktemp("png"))
  datasets.write_png_folder(sample.test, sample.class_names, out)
  return out


def photo_folder(root, per_class=6, size=(24, 20)):
  """Red and green JPEG photos of noise in two class folders under root."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  for name, colour in (("red", 0), ("green", 1)):
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      pixels = rng.integers(0, 60, size + (3,), dtype=np.uint8)
      pixels[..., colour] += 180
      Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)


def read_parquet_rows(pattern: str) -> list:
  import glob  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  rows = []
  for path in sorted(glob.glob(pattern)):
    rows.extend(pq.read_table(path).to_pylist())
  return rows


def engine_probabilities(model_dir: str, images: np.ndarray,
                         engine: str = "keras") -> np.ndarray:
  from model import engines  # pylint: disable=import-outside-toplevel
  return engines.load_engine(model_dir, engine).probabilities(
      images.astype(np.float32))


def expected_labels(model_dir, sample, engine="keras") -> list:
  """The label each engine gives the sample's test images, in order."""
  probabilities = engine_probabilities(model_dir, sample.test.images, engine)
  return [sample.class_names[i] for i in probabilities.argmax(1)]


def png_ids(png_dir, sample) -> list:
  """The ids write_png_folder gives each test image, in order."""
  return [os.path.join(png_dir, sample.class_names[label], f"{i:06d}.png")
          for i, label in enumerate(sample.test.labels)]
