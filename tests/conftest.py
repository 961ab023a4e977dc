"""Shared fixtures: the embedded sample, a tiny trained model, PNG folders,
nested folders, shards and lists of image URIs. Plain helpers are in
tests/helpers.py."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model import datasets
from model import preprocessing
from tests.helpers import SAMPLE_DIR


@pytest.fixture(scope="session")
def sample():
  return datasets.load_fashion_mnist(SAMPLE_DIR)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sample):
  """The tutorial MLP trained briefly on the sample; exported for serving."""
  # Training needs the tensorflow extra; without it, the tests that need a
  # model skip.
  pytest.importorskip("keras")
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


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory, png_dir, tiny_model):
  """The PNG folder as encoded-bytes shards and as raw-pixel shards, in the
  folders `encoded` and `raw` of the returned one."""
  from model import card as card_lib  # pylint: disable=import-outside-toplevel
  from tools import make_shards  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("shards")
  make_shards.make_shards(png_dir, str(root / "encoded"), rows_per_shard=70)
  make_shards.make_shards(png_dir, str(root / "raw"), rows_per_shard=70,
                          card=card_lib.load_card(tiny_model))
  return str(root)


# Folders below the base and the files each holds: a class-folder layout, a
# flat folder, files in the base itself, folders deeper than the levels
# listed one at a time, and an empty folder.
LAYOUT = {
    "": 3,
    "Bag": 30,
    "Coat": 25,
    "Coat/deep/x": 5,
    "flat": 150,
    "a/b/c/d": 12,
    "a/b2": 4,
    "Sandal/2024/01": 6,
    "Sandal/2024/02": 7,
    "empty": 0,
}


@pytest.fixture(scope="module")
def nested(tmp_path_factory, sample):
  """A few hundred PNG files in nested folders; returns the base folder."""
  root = tmp_path_factory.mktemp("nested")
  pngs = [preprocessing.encode_png(image) for image in sample.test.images]
  index = 0
  for folder, count in LAYOUT.items():
    (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
      (root / folder / f"{i:03d}.png").write_bytes(pngs[index % len(pngs)])
      index += 1
  return str(root)


@pytest.fixture()
def lists(tmp_path, nested):
  """The same kinds of rows in a text, a CSV and a Parquet list."""
  folder = tmp_path / "lists"
  folder.mkdir()
  bag = [os.path.join(nested, "Bag", f"{i:03d}.png") for i in range(30)]
  coat = [os.path.join(nested, "Coat", f"{i:03d}.png") for i in range(25)]
  missing = os.path.join(nested, "Bag", "missing.png")
  # Text: absolute paths, blank lines, a path relative to the list's
  # folder, a missing file and a line that is not UTF-8.
  relative = os.path.relpath(coat[0], folder)
  text = ("\n".join(bag[:10]) + "\n\n   \n" + relative + "\n" + missing +
          "\n").encode() + b"/tmp/\xff.png\n"
  (folder / "a.txt").write_bytes(text)
  # CSV: a header, quoted URIs holding a comma, ids and labels, an empty
  # URI and an empty id.
  comma = os.path.join(nested, "flat", "with,comma.png")
  with open(comma, "wb") as handle:
    handle.write(open(bag[0], "rb").read())
  rows = ["uri,id,label"] + [f"{path},c{i},Bag" for i, path in
                             enumerate(bag[10:20])]
  rows += [f'"{comma}",comma,Bag', ",no_uri,Bag", f"{bag[20]},,Bag", ""]
  (folder / "b.csv").write_text("\n".join(rows) + "\n")
  # Parquet: ids, labels, a null URI.
  pq.write_table(pa.table({
      "uri": coat[1:25] + [None],
      "id": [f"p{i}" for i in range(25)],
      "label": ["Coat"] * 25,
  }), folder / "c.parquet", row_group_size=10)
  return folder, bag, coat, missing, comma
