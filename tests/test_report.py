"""The HTML/PNG report over a real run's outputs."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

# Without the tools extra these tests skip.
pytest.importorskip("duckdb")
pytest.importorskip("matplotlib")
# pylint: disable=wrong-import-position

from tools import make_shards
from tools import report
from model import card as card_lib
from model import datasets
from tests.helpers import run_predict


@pytest.fixture(scope="module")
def run(tmp_path_factory, sample, tiny_model):
  """A prediction run over 30 PNGs, one of which is removed afterwards."""
  root = tmp_path_factory.mktemp("report")
  images = root / "images"
  split = datasets.Split(sample.test.images[:30], sample.test.labels[:30])
  datasets.write_png_folder(split, sample.class_names, str(images))
  run = run_predict(root / "out", input=str(images), model=tiny_model,
                    write_probabilities=True)
  return root, run


@pytest.mark.slow
def test_report_renders_every_plot(run):
  root, labelled = run
  written = report.write_report(labelled.output, str(root / "report"), samples=6)
  assert set(written) == {"samples", "mistakes", "confusion", "confidence",
                          "reliability", "index"}
  expected_sizes = {"samples": (1200, 540), "confusion": (800, 800),
                    "confidence": (700, 400), "reliability": (500, 500)}
  for name, size in expected_sizes.items():
    with Image.open(written[name]) as image:
      assert image.size == size, name
      pixels = np.asarray(image.convert("L"))
      assert pixels.std() > 10, f"{name} looks blank"
  page = open(written["index"]).read()
  for name in ("samples", "confusion", "confidence", "reliability"):
    assert os.path.basename(written[name]) in page
  assert "accuracy" in page and "predictions per class" in page


def test_images_are_read_back_by_id(run, sample, tiny_model, tmp_path):
  rows = run[1].predictions
  manifest = {"arguments": {"input_format": "images"}}
  row = rows[0]
  pixels = report._read_image(row, manifest)  # pylint: disable=protected-access
  original = np.asarray(Image.open(row["id"]))
  np.testing.assert_array_equal(pixels, original)

  # Raw-pixel Parquet inputs are read back from their shard.
  shards = tmp_path / "shards"
  card = card_lib.load_card(tiny_model)
  make_shards.make_shards(os.path.dirname(os.path.dirname(row["id"])),
                          str(shards), rows_per_shard=100, card=card)
  shard = sorted(shards.iterdir())[0]
  parquet_manifest = {"arguments": {"input_format": "parquet",
                                    "id_column": "id", "image_column": "image"},
                      "model": {"input_shape": card.input_shape}}
  back = report._read_image(  # pylint: disable=protected-access
      {"id": row["id"], "source": str(shard)}, parquet_manifest)
  np.testing.assert_array_equal(back[..., 0], original)


@pytest.mark.slow
def test_missing_source_leaves_a_blank_tile(run, tmp_path):
  root, labelled = run
  rows = labelled.predictions
  moved = tmp_path / "moved.png"
  shutil.move(rows[0]["id"], moved)
  try:
    assert report._read_image(  # pylint: disable=protected-access
        rows[0], {"arguments": {"input_format": "images"}}) is None
    written = report.write_report(labelled.output, str(root / "report2"),
                                  samples=30)
    assert os.path.getsize(written["samples"]) > 0
  finally:
    shutil.move(moved, rows[0]["id"])


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory, sample, tiny_model):
  """A run over 12 PNGs in one flat folder: no true labels."""
  from model import preprocessing  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("unlabelled")
  images = root / "images"
  images.mkdir()
  for i in range(12):
    (images / f"{i:03d}.png").write_bytes(
        preprocessing.encode_png(sample.test.images[i]))
  return root, run_predict(root / "out", input=str(images), model=tiny_model)


def _red_pixels(path) -> int:
  with Image.open(path) as image:
    pixels = np.asarray(image.convert("RGB")).astype(int)
  return int(((pixels[..., 0] > 180) & (pixels[..., 1] < 80) &
              (pixels[..., 2] < 80)).sum())


@pytest.mark.slow
def test_unlabelled_report_is_honest(unlabelled_run):
  root, unlabelled = unlabelled_run
  written = report.write_report(unlabelled.output, str(root / "report"),
                                samples=6)
  assert set(written) == {"samples", "confidence", "index"}
  assert set(written.skipped) == {"mistakes", "confusion", "reliability"}
  page = open(written["index"]).read()
  assert "not drawn" in page
  for title in ("most confident mistakes", "confusion matrix",
                "reliability diagram"):
    assert title in page
  assert "no prediction has a true_label" in page
  # Nothing is known to be wrong: no red bar, no red caption.
  assert _red_pixels(written["samples"]) == 0


def test_grid_title_says_what_the_colours_mean():
  labelled = {"label": "a", "true_label": "a"}
  unlabelled = {"label": "a", "true_label": None}
  assert "red: wrong" in report.grid_title([labelled, labelled])
  assert "red:" not in report.grid_title([unlabelled])
  assert "no true label" in report.grid_title([labelled, unlabelled])


def test_report_replaces_its_own_files_only(run, tmp_path):
  out = tmp_path / "report"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  (out / report.FILES["mistakes"]).write_bytes(b"stale plot")
  # An unlabelled run draws no mistakes: the stale plot must not remain.
  unlabelled = tmp_path / "unlabelled_out"
  labelled_rows = run[1].predictions
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from beam_jobs import outputs  # pylint: disable=import-outside-toplevel
  unlabelled.mkdir()
  table = pa.Table.from_pylist(
      [dict(r, true_label=None, source_label=None) for r in labelled_rows],
      schema=outputs.predictions_schema(write_probabilities=True))
  pq.write_table(table, unlabelled / "predictions-00000-of-00001.parquet")
  pq.write_table(outputs.ERRORS_SCHEMA.empty_table(),
                 unlabelled / "errors-00000-of-00001.parquet")
  written = report.write_report(str(unlabelled), str(out), samples=3)
  assert sorted(os.listdir(out)) == sorted(
      ["notes.txt", "index.html", os.path.basename(written["samples"]),
       os.path.basename(written["confidence"])])
  assert (out / "notes.txt").read_text() == "mine"
