"""The Beam pipeline: sources, inference, sinks and the manifest."""

import os
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to

from beam_jobs import config as config_lib
from beam_jobs import preflight
from beam_jobs import predict
from beam_jobs.sources import images
from beam_jobs.sources import parquet
from beam_jobs.contracts import ImageBatch
from model import card as card_lib
from model import datasets
from imagebatch import paths
from model import preprocessing
from tools import make_shards
from tests.conftest import REPO
from tests.conftest import expected_labels
from tests.conftest import png_ids
from tests.conftest import read_parquet_rows


def _flatten_ids(batch):
  return list(zip(batch.ids, batch.true_labels))


@pytest.mark.slow
def test_read_image_files_in_batches_with_folder_labels(png_dir, sample):
  expected = [(path, sample.class_names[label]) for path, label in zip(
      png_ids(png_dir, sample), sample.test.labels)]
  with TestPipeline() as pipeline:
    read = pipeline | images.ReadImageFiles(png_dir, sample.class_names,
                                             batch_size=64)
    assert_that(read.images | beam.FlatMap(_flatten_ids), equal_to(expected))
    assert_that(read.images | "Sizes" >> beam.Map(len),
                equal_to([64, 64, 64, 8]), label="BatchSizes")
    assert_that(read.errors, equal_to([]), label="NoErrors")


@pytest.mark.parametrize("threads", [1, 4])
def test_file_group_reads_in_order_with_or_without_threads(png_dir, sample,
                                                          threads):
  """Remote groups are read by a thread pool; order and errors must hold."""
  paths = png_ids(png_dir, sample)[:10]
  paths.insert(3, os.path.join(png_dir, "missing.png"))
  reader = images._ReadFileGroup(threads)  # pylint: disable=protected-access
  reader.setup()
  refs = images.folder_refs(paths, png_dir, frozenset(sample.class_names))
  outputs = list(reader.process(refs))
  reader.teardown()
  errors = [o.value for o in outputs if isinstance(o, beam.pvalue.TaggedOutput)]
  (batch,) = [o for o in outputs if not isinstance(o, beam.pvalue.TaggedOutput)]
  assert batch.ids == paths[:3] + paths[4:]
  for path, data in zip(batch.ids, batch.encoded):
    with open(path, "rb") as handle:
      assert data == handle.read()
  assert [(e["id"], e["stage"]) for e in errors] == [(paths[3], "read")]


def test_folder_label_only_for_known_classes():
  names = frozenset(["cat", "dog"])
  assert paths.folder_label("/d/cat/1.png", "/d/", names) == "cat"
  assert paths.folder_label("/d/x/dog/1.png", "/d/", names) == "dog"
  assert paths.folder_label("/d/incoming/1.png", "/d/", names) is None
  assert paths.folder_label("/d/1.png", "/d/", names) is None
  assert paths.folder_label("gs://b/d/cat/1.png", "gs://b/d/", names) == "cat"
  assert paths.pattern_base("gs://b/d/*/*.png") == "gs://b/d/"
  assert paths.expand_pattern("/d/") == "/d/**"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, png_dir, tiny_model):
  """The PNG folder as encoded-bytes shards and as raw-pixel shards."""
  root = tmp_path_factory.mktemp("shards")
  make_shards.make_shards(png_dir, str(root / "encoded"), rows_per_shard=70)
  make_shards.make_shards(png_dir, str(root / "raw"), rows_per_shard=70,
                          card=card_lib.load_card(tiny_model))
  return str(root)


@pytest.mark.parametrize("form", ["encoded", "raw"])
def test_read_parquet_both_image_forms(shards, form, png_dir, sample, tiny_model):
  card = card_lib.load_card(tiny_model)
  expected_ids = png_ids(png_dir, sample)
  expected = list(zip(expected_ids,
                      [sample.class_names[i] for i in sample.test.labels]))
  assert len(os.listdir(os.path.join(shards, form))) == 3  # 70 + 70 + 60 rows.
  with TestPipeline() as pipeline:
    read = pipeline | parquet.ReadParquetImages(
        os.path.join(shards, form, "*.parquet"), card.input_shape, "image",
        "id", "label", batch_size=50)
    assert_that(read.images | beam.FlatMap(_flatten_ids), equal_to(expected))
    assert_that(read.errors, equal_to([]), label="NoErrors")


def test_raw_pixel_shards_hold_the_decoded_pixels(shards, png_dir, sample):
  rows = {r["id"]: r["image"] for r in pq.read_table(
      os.path.join(shards, "raw")).to_pylist()}
  for index, path in enumerate(png_ids(png_dir, sample)):
    pixels = np.array(rows[path], dtype=np.uint8).reshape(28, 28, 1)
    np.testing.assert_array_equal(pixels, sample.test.images[index])


def test_raw_pixels_of_wrong_length_or_null_are_per_row_errors():
  column = pa.array([[1, 2, 3, 4], [1, 2], None, [5, 6, 7, 8]],
                    pa.list_(pa.uint8()))
  pixels, good, bad = parquet.raw_pixel_array(column, 4)
  np.testing.assert_array_equal(good, [0, 3])
  np.testing.assert_array_equal(pixels, [1, 2, 3, 4, 5, 6, 7, 8])
  assert "length 2, expected 4" in bad[1] and "null" in bad[2]


def _run(tmp_path, name, **overrides):
  fields = dict(input="", model="", output=str(tmp_path / name))
  fields.update(overrides)
  config = config_lib.PredictConfig(**fields)
  manifest = predict.run(config, ["--runner", "DirectRunner"])
  rows = read_parquet_rows(os.path.join(config.output, "predictions-*.parquet"))
  errors = read_parquet_rows(os.path.join(config.output, "errors-*.parquet"))
  return manifest, rows, errors


@pytest.mark.parametrize("engine", ["keras", "tflite"])
def test_predict_image_folder(tmp_path, png_dir, tiny_model, sample, engine):
  manifest, rows, errors = _run(tmp_path, engine, input=png_dir,
                                model=tiny_model, engine=engine, batch_size=64)
  card = card_lib.load_card(tiny_model)
  ids = png_ids(png_dir, sample)
  expected = dict(zip(ids, expected_labels(tiny_model, sample, engine)))
  assert {r["id"]: r["label"] for r in rows} == expected
  assert errors == []
  row = rows[0]
  assert row["model_id"] == card.model_id and row["engine"] == engine
  assert row["source"] == row["id"]
  assert row["label"] == card.class_names[row["label_index"]]
  assert len(row["top_k"]) == 3 and row["top_k"][0]["label"] == row["label"]
  assert row["top_k"][0]["confidence"] == pytest.approx(row["confidence"])
  assert all(r["true_label"] == sample.class_names[l]
             for r, l in zip(sorted(rows, key=lambda r: r["id"]),
                             [sample.test.labels[ids.index(i)]
                              for i in sorted(r["id"] for r in rows)]))
  assert manifest["counts"] == {"inputs": 200, "predictions": 200,
                                "errors": 0, "skipped": 0, "model_loads": 1}
  assert manifest["accounted"] and manifest["model_id"] == card.model_id
  # Accuracy over the folder is the accuracy training reported.
  accuracy = np.mean([r["label"] == r["true_label"] for r in rows])
  assert accuracy == pytest.approx(card.metrics["test_accuracy"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["encoded", "raw"])
def test_predict_parquet_matches_image_folder(tmp_path, shards, png_dir,
                                              tiny_model, sample, form):
  _, folder_rows, _ = _run(tmp_path, "folder", input=png_dir, model=tiny_model)
  manifest, rows, errors = _run(
      tmp_path, form, input=os.path.join(shards, form, "*.parquet"),
      model=tiny_model, label_column="label", write_probabilities=True)
  assert errors == [] and manifest["counts"]["predictions"] == 200
  by_id = {r["id"]: r for r in folder_rows}
  for row in rows:
    assert row["label"] == by_id[row["id"]]["label"]
    assert row["true_label"] == by_id[row["id"]]["true_label"]
    assert row["confidence"] == pytest.approx(by_id[row["id"]]["confidence"],
                                              abs=1e-6)
    assert len(row["probabilities"]) == 10
    assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert max(row["probabilities"]) == pytest.approx(row["confidence"])


def test_bad_files_become_error_rows_and_batch_mates_survive(
    tmp_path, png_dir, tiny_model, sample):
  folder = tmp_path / "mixed"
  good = datasets.Split(sample.test.images[:10], sample.test.labels[:10])
  datasets.write_png_folder(good, sample.class_names, str(folder))
  bad = {
      folder / "Bag" / "empty.png": b"",
      folder / "Bag" / "text.jpg": b"this is not a jpeg",
      folder / "Bag" / ".DS_Store": b"\x00\x00\x00\x01Bud1\x00\x00",
      folder / "Coat" / "truncated.png":
          preprocessing.encode_png(sample.test.images[0])[:60],
  }
  for path, data in bad.items():
    path.write_bytes(data)
  manifest, rows, errors = _run(tmp_path, "out", input=str(folder),
                                model=tiny_model)
  assert len(rows) == 10
  assert sorted(e["id"] for e in errors) == sorted(str(p) for p in bad)
  assert {e["stage"] for e in errors} == {"decode"}
  assert all(e["error"] for e in errors)
  assert manifest["counts"]["inputs"] == 14 and manifest["accounted"]


def test_inference_failure_is_isolated_to_the_bad_row(tiny_model):
  from beam_jobs import inference  # pylint: disable=import-outside-toplevel
  from model import engines  # pylint: disable=import-outside-toplevel

  class FailsOnNegative(engines.Engine):
    def _raw_outputs(self, images):
      if (images < 0).any():
        raise ValueError("negative pixel")
      return np.zeros((len(images), 10), dtype=np.float32)

  pixels = np.zeros((5, 28, 28, 1), dtype=np.float32)
  pixels[3] = -1
  batch = ImageBatch(ids=list("abcde"), sources=["s"] * 5,
                     true_labels=[None] * 5, pixels=pixels)
  card = card_lib.load_card(tiny_model)
  handler = inference.ImageClassifierHandler(tiny_model)
  [result] = handler.run_inference(batch, FailsOnNegative(card))
  assert [e["id"] for e in result.errors] == ["d"]
  assert result.errors[0]["stage"] == "inference"
  # The rows that ran, and only they, come back with their probabilities.
  assert result.batch.ids == ["a", "b", "c", "e"]
  assert result.probabilities.shape == (4, 10)
  assert not np.isnan(result.probabilities).any()


def test_config_errors_fail_before_any_work(tmp_path, tiny_model, png_dir,
                                            shards):
  with pytest.raises(config_lib.ConfigError, match="not a model folder"):
    preflight.check(config_lib.PredictConfig(png_dir, str(tmp_path), str(tmp_path / "o")
                            ))
  with pytest.raises(config_lib.ConfigError, match="matches no files"):
    preflight.check(config_lib.PredictConfig(str(tmp_path / "none"), tiny_model,
                             str(tmp_path / "o")))
  with pytest.raises(config_lib.ConfigError, match="--label_column 'nope'"):
    preflight.check(config_lib.PredictConfig(os.path.join(shards, "encoded", "*.parquet"),
                             tiny_model, str(tmp_path / "o"),
                             label_column="nope"))


@pytest.mark.slow
def test_predict_cli_missing_model_is_one_line(tmp_path, png_dir):
  result = subprocess.run(
      [sys.executable, "-m", "beam_jobs.predict", "--input", png_dir,
       "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0, result.stderr
  assert "is not a model folder" in result.stderr


@pytest.mark.slow
def test_multi_processing_gives_identical_outputs(tmp_path, png_dir,
                                                  tiny_model):
  single = config_lib.PredictConfig(png_dir, tiny_model, str(tmp_path / "one"),
                                    batch_size=32)
  multi = config_lib.PredictConfig(png_dir, tiny_model, str(tmp_path / "two"),
                                   batch_size=32)
  predict.run(single, ["--runner", "DirectRunner"])
  manifest = predict.run(multi, [
      "--runner", "DirectRunner", "--direct_num_workers", "2",
      "--direct_running_mode", "multi_processing"])
  one = read_parquet_rows(os.path.join(single.output, "predictions-*.parquet"))
  two = read_parquet_rows(os.path.join(multi.output, "predictions-*.parquet"))
  key = lambda row: row["id"]  # pylint: disable=unnecessary-lambda-assignment
  assert sorted(one, key=key) == sorted(two, key=key)
  # Exactly one model load per worker process.
  assert manifest["counts"]["model_loads"] == 2
  assert manifest["counts"]["inputs"] == 200 and manifest["accounted"]


def test_ids_match_between_relative_folder_and_shards(tmp_path, png_dir,
                                                      monkeypatch):
  monkeypatch.chdir(os.path.dirname(png_dir))
  relative = os.path.basename(png_dir)
  make_shards.make_shards(relative, str(tmp_path / "shards"), 1000)
  ids = pq.read_table(str(tmp_path / "shards")).column("id").to_pylist()
  assert all(os.path.isabs(i) and os.path.exists(i) for i in ids)
  config = config_lib.PredictConfig(relative, "unused", "out")
  assert paths.absolute(config.input) == png_dir
  assert sorted(ids) == sorted(
      paths.match_paths(paths.expand_pattern(png_dir)))
