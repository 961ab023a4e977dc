"""beam_jobs/sources/skip_existing.py: --skip_existing as a join against
the ids of this model's earlier rows, on folders, shards and overlaps."""

import os
import shutil

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to

from beam_jobs.contracts import id_bucket
from beam_jobs.sources import skip_existing
from model import datasets
from model import preprocessing
from tests.helpers import beam_match
from tests.helpers import ids
from tests.helpers import listed_rows
from tests.helpers import read_parquet_rows
from tests.helpers import run_predict


def test_earlier_ids_count_only_this_models_rows(tmp_path):
  path = str(tmp_path / "predictions-x.parquet")
  pq.write_table(pa.table({
      "id": ["a", "b", None, "c", "d"],
      "model_id": ["mine", "theirs", "mine", "mine", None],
  }), path, row_group_size=2)
  with TestPipeline() as pipeline:
    earlier = pipeline | skip_existing.ReadEarlierIds([path], "mine", 3)
    assert_that(earlier | beam.FlatMapTuple(
        lambda bucket, side: [(bucket, i) for i in side[1]]),
                equal_to([(id_bucket(i, 3), i) for i in "ac"]))


def test_bucket_count_grows_with_earlier_rows():
  assert skip_existing.bucket_count(0) == skip_existing.MIN_BUCKETS
  assert skip_existing.bucket_count(10_000_000) == 200
  assert skip_existing.bucket_count(10**12) == skip_existing.MAX_BUCKETS


@pytest.mark.slow
def test_nested_folder_then_skip_existing_with_overlap(tmp_path, nested,
                                                       tiny_model):
  everything = beam_match(os.path.join(nested, "**"))
  first_part = beam_match(os.path.join(nested, "[BCa]*", "**"))
  output = tmp_path / "out"
  run = run_predict(output, input=os.path.join(nested, "[BCa]*", "**"),
                    model=tiny_model, batch_size=16)
  assert sorted(ids(run.predictions)) == first_part and run.errors == []
  labels = {row["id"]: row["true_label"] for row in run.predictions}
  assert labels[os.path.join(nested, "Bag", "000.png")] == "Bag"
  assert labels[os.path.join(nested, "Coat", "deep", "x", "000.png")] is None

  run = run_predict(output, input=nested, model=tiny_model, batch_size=16,
                    skip_existing=True)
  counts = run.manifest["counts"]
  assert counts["skipped"] == len(first_part)
  assert counts["inputs"] == len(everything) - len(first_part)
  assert sorted(ids(run.predictions)) == sorted(set(everything) -
                                                set(first_part))
  listed = ids(listed_rows(output, "predictions"))
  assert sorted(listed) == everything  # No id twice, none missing.


@pytest.mark.slow
def test_skip_existing_on_shards_with_overlapping_ids(tmp_path, sample,
                                                      tiny_model):
  pngs = [preprocessing.encode_png(x) for x in sample.test.images[:90]]
  shards = tmp_path / "shards"
  shards.mkdir()
  pq.write_table(pa.table({"id": [f"i{i}" for i in range(60)],
                           "image": pngs[:60]}), shards / "a.parquet",
                 row_group_size=25)
  output = tmp_path / "out"
  run_predict(output, input=str(shards / "a.parquet"), model=tiny_model)
  # The second shard repeats ids i30..i59 and adds i60..i89 and a null id.
  pq.write_table(pa.table({
      "id": [f"i{i}" for i in range(30, 90)] + [None],
      "image": pngs[30:90] + pngs[:1]}), shards / "b.parquet",
                 row_group_size=20)
  run = run_predict(output, input=str(shards / "*.parquet"), model=tiny_model,
                    skip_existing=True, batch_size=8)
  counts = run.manifest["counts"]
  assert counts["skipped"] == 60 + 30
  assert sorted(ids(run.predictions)) == sorted(f"i{i}" for i in range(60, 90))
  assert ids(run.errors) == [f"{shards / 'b.parquet'}#60"]
  assert counts["inputs"] == 31
  listed = ids(listed_rows(output, "predictions"))
  assert sorted(listed) == sorted(f"i{i}" for i in range(90))


@pytest.mark.slow
def test_skip_existing_classifies_only_new_images(tmp_path, tiny_model,
                                                  sample):
  pile, output = tmp_path / "pile", tmp_path / "out"
  first = datasets.Split(sample.test.images[:60], sample.test.labels[:60])
  datasets.write_png_folder(first, sample.class_names, str(pile))
  config = dict(input=str(pile), model=tiny_model)
  before = run_predict(output, **config)
  assert before.manifest["counts"]["predictions"] == 60

  # The pile grows; its new files get names the first run never saw.
  more = datasets.Split(sample.test.images[60:100], sample.test.labels[60:100])
  datasets.write_png_folder(more, sample.class_names, str(tmp_path / "more"))
  for path in (tmp_path / "more").glob("*/*.png"):
    target = pile / path.parent.name / f"new_{path.name}"
    shutil.move(path, target)
  after = run_predict(output, **config, skip_existing=True)
  assert after.manifest["counts"]["skipped"] == 60
  assert after.manifest["counts"]["inputs"] == 40
  assert after.manifest["counts"]["predictions"] == 40
  assert all(os.path.basename(i).startswith("new_")
             for i in ids(after.predictions))
  every_id = ids(read_parquet_rows(str(output / "predictions" / "*.parquet")))
  assert len(every_id) == 100 and len(set(every_id)) == 100
  assert set(every_id) == {str(p) for p in pile.glob("*/*.png")}


@pytest.mark.slow
def test_skip_existing_on_parquet(tmp_path, tiny_model, png_dir):
  from tools import make_shards  # pylint: disable=import-outside-toplevel
  shards = tmp_path / "shards"
  make_shards.make_shards(png_dir, str(shards), rows_per_shard=80)
  paths = sorted(shards.glob("*.parquet"))
  output = str(tmp_path / "out")
  run_predict(output, input=str(paths[0]), model=tiny_model)
  after = run_predict(output, input=str(shards / "*.parquet"),
                      model=tiny_model, skip_existing=True)
  assert after.manifest["counts"]["skipped"] == 80
  assert after.manifest["counts"]["predictions"] == 120
  every_id = ids(read_parquet_rows(output + "/predictions/*.parquet"))
  assert len(every_id) == 200 and len(set(every_id)) == 200


@pytest.mark.slow
@pytest.mark.parametrize("first,then,fix", [
    ([], ["--write_embeddings"], "leave out --write_embeddings"),
    (["--write_embeddings"], [], "pass --write_embeddings as that run did"),
    ([], ["--write_probabilities"], "leave out --write_probabilities"),
])
def test_kept_shards_with_other_columns_are_refused_in_one_line(
    tmp_path, tiny_model, png_dir, capsys, first, then, fix):
  # Kept and new shards with different columns: pyarrow reading
  # predictions/ would keep the first shard's columns alone, and the
  # manifest would describe half the rows.
  from beam_jobs import predict  # pylint: disable=import-outside-toplevel
  output = tmp_path / "out"
  flags = {"--write_embeddings": "write_embeddings",
           "--write_probabilities": "write_probabilities"}
  run_predict(output, input=os.path.join(png_dir, "[A-C]*", "*.png"),
              model=tiny_model, **{flags[flag]: True for flag in first})
  before = sorted(p.name for p in output.rglob("*"))
  manifest = (output / "_run.json").read_text()
  capsys.readouterr()
  code = predict.main(["--input", png_dir, "--model", tiny_model, "--output",
                       str(output), "--skip_existing", "--runner",
                       "DirectRunner", *then])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith("beam_jobs.predict: error: --skip_existing: the "
                        "predictions kept in ") and fix in err, err
  assert sorted(p.name for p in output.rglob("*")) == before
  assert (output / "_run.json").read_text() == manifest
  # With the same flags as the kept shards, the run goes ahead.
  run = run_predict(output, input=png_dir, model=tiny_model,
                    skip_existing=True,
                    **{flags[flag]: True for flag in first})
  table = pq.read_table(output / "predictions")
  assert table.num_rows == run.manifest["totals"]["predictions"]
  assert ("embedding" in table.schema.names) == ("--write_embeddings" in first)
