"""beam_jobs/sources/lists.py and Hugging Face image columns: lists of image
URIs in each format (relative, remote, repeated, broken), the duplicate-id
count over them, and struct<bytes, path> image columns in Parquet."""

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_jobs import config as config_lib
from beam_jobs import outputs
from beam_jobs import pipeline
from beam_jobs import preflight
from beam_jobs.sources import lists as list_source
from model import preprocessing
from tests.helpers import engine_probabilities
from tests.helpers import ids
from tests.helpers import listed_rows
from tests.helpers import run_predict
from tests.helpers import skip_unless_offline


# Lists of image URIs ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [4, 256])
def test_input_lists_in_each_format(tmp_path, lists, tiny_model, batch_size):
  folder, bag, coat, missing, comma = lists
  run = run_predict(tmp_path / "out", input=None,
                    input_list=str(folder / "*"), model=tiny_model,
                    label_column="label", batch_size=batch_size)
  manifest, rows = run.manifest, run.predictions
  expected = (bag[:10] + [coat[0]] + [f"c{i}" for i in range(10)] +
              ["comma"] + [f"p{i}" for i in range(24)])
  assert sorted(ids(rows)) == sorted(expected)
  by_id = {row["id"]: row for row in rows}
  assert by_id["c3"]["source"] == bag[13] and by_id["c3"]["true_label"] == "Bag"
  assert by_id["comma"]["source"] == comma
  assert by_id["p0"]["true_label"] == "Coat" and by_id[coat[0]]["true_label"] \
      is None
  errors = run.errors_by_id
  assert set(errors) == {missing, "/tmp/\\xff.png", "no_uri",
                         f"{folder / 'b.csv'}#12", "p24"}
  assert "FileNotFoundError" in errors[missing]["error"]
  assert "not valid UTF-8" in errors["/tmp/\\xff.png"]["error"]
  assert "no URI" in errors["no_uri"]["error"] and "no URI" in errors[
      "p24"]["error"]
  assert "null id" in errors[f"{folder / 'b.csv'}#12"]["error"]
  assert manifest["counts"]["inputs"] == len(expected) + 5
  assert manifest["duplicate_ids"] == 0


@pytest.mark.slow
def test_input_list_with_skip_existing_and_repeated_uris(tmp_path, lists,
                                                         tiny_model):
  folder, bag, _, _, _ = lists
  output = tmp_path / "out"
  first = tmp_path / "first.txt"
  # Saved by Windows' Notepad: a byte order mark before the first URI.
  first.write_bytes(b"\xef\xbb\xbf" + ("\n".join(bag[:20]) + "\n").encode())
  run = run_predict(output, input=None, input_list=str(first),
                    model=tiny_model)
  assert run.manifest["counts"]["predictions"] == 20 and run.errors == []
  again = tmp_path / "again.txt"
  # Overlapping, and one URI listed twice.
  again.write_text("\n".join(bag[10:30] + bag[25:26]) + "\n")
  run = run_predict(output, input=None, input_list=str(again),
                    model=tiny_model, skip_existing=True, batch_size=4)
  assert run.manifest["counts"]["skipped"] == 10 and run.errors == []
  assert sorted(ids(run.predictions)) == sorted(bag[20:30] + bag[25:26])
  assert run.manifest["duplicate_ids"] == 1


def test_no_duplicate_count_leaves_the_ids_uncounted(tmp_path, lists,
                                                      tiny_model):
  folder, bag, _, _, _ = lists
  listed = tmp_path / "twice.txt"
  listed.write_text("\n".join(bag[:6] + bag[:2]) + "\n")
  config = config_lib.PredictConfig(None, tiny_model, str(tmp_path / "o"),
                                    input_list=str(listed),
                                    count_duplicate_ids=False)
  assert not pipeline.counts_duplicate_ids(preflight.check(config).config)
  run = run_predict(tmp_path / "out", input=None, input_list=str(listed),
                    model=tiny_model, count_duplicate_ids=False)
  assert len(run.predictions) == 8 and run.errors == []
  assert run.manifest["duplicate_ids"] is None
  # The strict manifest reader takes the null, and a second run that reads
  # the folder's manifest (--skip_existing) goes through.
  assert outputs.read_manifest(run.output)["duplicate_ids"] is None
  run = run_predict(tmp_path / "out", input=None, input_list=str(listed),
                    model=tiny_model, count_duplicate_ids=False,
                    skip_existing=True)
  assert run.manifest["counts"]["skipped"] == 8
  assert config_lib.parse_args([
      "--input", str(folder), "--model", tiny_model, "--output", "o",
      "--no_duplicate_count"])[0].count_duplicate_ids is False


def test_relative_uris_resolve_from_the_list_folder():
  assert list_source.resolve_uri("x/../y.png", "/data/lists/a.txt") == (
      "/data/lists/y.png")
  assert list_source.resolve_uri("../img/y.png", "gs://b/lists/a.csv") == (
      "gs://b/img/y.png")
  assert list_source.resolve_uri("gs://b/y.png", "/l.txt") == "gs://b/y.png"
  assert list_source.resolve_uri("/abs//y.png", "gs://b/l.txt") == "/abs/y.png"


@pytest.mark.parametrize("broken, line", [
    ('"c.png,3\nd.png,4\n', 5),          # a quote never closed
    ('"c.png"x,3\nd.png,4\n', 5),        # text after a closing quote
])
def test_a_broken_csv_record_ends_the_list_in_one_error_naming_it(
    tmp_path, broken, line):
  """Fails on the code before the fix: a quote never closed merged every
  later record into one, read as a URI, silently."""
  listing = tmp_path / "list.csv"
  listing.write_text('uri,id\na.png,1\n"b\nb.png",2\n' + broken)
  reader = list_source._ReadListItem("uri", "id", None, 256)  # pylint: disable=protected-access
  rows = list(reader._csv_rows(str(listing)))  # pylint: disable=protected-access
  assert [row[:2] for row in rows[:2]] == [(0, "a.png"), (1, "b\nb.png")]
  assert len(rows) == 3 and isinstance(rows[2], dict), rows
  error = rows[2]
  assert error["id"] == str(listing) and error["stage"] == "read"
  assert f"line {line}" in error["error"], error
  assert "rows from 2 on; rows before it were read" in error["error"], error


@pytest.mark.slow
def test_gcs_entries_of_a_list_fail_fast_without_a_network(tmp_path,
                                                           tiny_model,
                                                           sample):
  """Fails on the code before the fix: each gs:// entry waited two minutes
  on Google's client retrying, with no network to retry on."""
  skip_unless_offline()
  local = tmp_path / "a.png"
  local.write_bytes(preprocessing.encode_png(sample.test.images[0]))
  listing = tmp_path / "list.txt"
  listing.write_text(f"gs://bucket/a.png\ngs://bucket/b.png\n{local}\n")
  started = time.monotonic()
  run = run_predict(tmp_path / "out", input=None, input_list=str(listing),
                    model=tiny_model)
  assert time.monotonic() - started < 60
  assert ids(run.predictions) == [str(local)]
  errors = run.errors_by_id
  assert set(errors) == {"gs://bucket/a.png", "gs://bucket/b.png"}
  assert all("cannot reach Cloud Storage" in row["error"]
             for row in errors.values())


# Hugging Face image columns ----------------------------------------------------


@pytest.mark.slow
def test_hugging_face_image_structs_are_read(tmp_path, tiny_model, sample,
                                             capsys):
  """Fails on the code before the fix: a struct<bytes, path> image column
  was refused ("expected binary"). Bytes are read where set, else the file
  the path names (a relative path from the shard's folder); `label` is
  read as the true labels with no flag."""
  from beam_jobs import predict  # pylint: disable=import-outside-toplevel
  images = [preprocessing.encode_png(image) for image in sample.test.images[:4]]
  data = tmp_path / "data"
  (data / "pictures").mkdir(parents=True)
  (data / "pictures" / "two.png").write_bytes(images[2])
  absolute = tmp_path / "three.png"
  absolute.write_bytes(images[3])
  cells = [
      {"bytes": images[0], "path": None},
      {"bytes": images[1], "path": "somewhere/else.png"},  # bytes first
      {"bytes": None, "path": "pictures/two.png"},
      {"bytes": None, "path": str(absolute)},
      {"bytes": None, "path": "pictures/missing.png"},
      {"bytes": None, "path": None},
      None,
  ]
  image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  labels = [int(label) for label in sample.test.labels[:4]] + [0, 0, 0]
  pq.write_table(pa.table({"image": pa.array(cells, image_type),
                           "label": labels}), data / "train.parquet")
  output = tmp_path / "out"
  assert predict.main(["--input", str(data / "*.parquet"), "--model",
                       tiny_model, "--output", str(output), "--id_column",
                       "", "--runner", "DirectRunner"]) == 0
  out = capsys.readouterr().out
  assert "from the 'label' column, as --label_column was not given" in out
  shard = str(data / "train.parquet")
  predictions = {row["id"]: row for row in listed_rows(output, "predictions")}
  assert sorted(predictions) == [f"{shard}#{i}" for i in range(4)]
  expected = [sample.class_names[i] for i in labels[:4]]
  assert [predictions[f"{shard}#{i}"]["true_label"] for i in range(4)] == (
      expected)
  errors = {row["id"]: row["error"] for row in listed_rows(output, "errors")}
  assert sorted(errors) == [f"{shard}#{i}" for i in (4, 5, 6)]
  assert "FileNotFoundError" in errors[f"{shard}#4"]
  assert "null image cell" in errors[f"{shard}#5"]
  assert "null image cell" in errors[f"{shard}#6"]
  # The same predictions as the engine gives the images themselves.
  probabilities = engine_probabilities(tiny_model, sample.test.images[:4],
                                       "tflite")
  assert [predictions[f"{shard}#{i}"]["label"] for i in range(4)] == [
      sample.class_names[i] for i in probabilities.argmax(1)]
