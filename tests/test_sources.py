"""beam_jobs/sources/: image folders, Parquet shards (by row group) and
lists of image URIs read into batches, and every hostile entry, row, shard
or list line an error row of its own, with exact accounting."""

import os
import socket
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to

from beam_jobs.sources import images
from beam_jobs.sources import lists as list_source
from beam_jobs.sources import parquet
from beam_jobs.sources import row_groups
from model import card as card_lib
from model import datasets
from model import preprocessing
from tests.helpers import engine_probabilities
from tests.helpers import ids
from tests.helpers import listed_rows
from tests.helpers import png_ids
from tests.helpers import run_predict
from tests.helpers import skip_unless_offline


# Image folders ----------------------------------------------------------------


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


def test_hostile_directory_entries(tmp_path, tiny_model, sample):
  folder = tmp_path / "pile"
  good = datasets.Split(sample.test.images[:12], sample.test.labels[:12])
  datasets.write_png_folder(good, sample.class_names, str(folder))
  bag = folder / "Bag"
  a_good_png = sorted(bag.glob("*.png"))[0]
  hostile = {}
  os.mkfifo(bag / "fifo.png")
  hostile[str(bag / "fifo.png")] = "is a FIFO"
  server = socket.socket(socket.AF_UNIX)
  server.bind(str(bag / "socket.png"))
  hostile[str(bag / "socket.png")] = "is a socket"
  os.symlink("/dev/zero", bag / "device.png")
  hostile[str(bag / "device.png")] = "is a character device"
  os.symlink(bag / "missing.png", bag / "dangling.png")
  hostile[str(bag / "dangling.png")] = "FileNotFoundError"
  os.symlink(bag / "loop.png", bag / "loop.png")
  hostile[str(bag / "loop.png")] = "Too many levels of symbolic links"
  undecodable = os.path.join(os.fsencode(bag), b"name\xff\xfe.png")
  with open(undecodable, "wb") as handle:
    handle.write(a_good_png.read_bytes())
  hostile[str(bag) + "/name\\xff\\xfe.png"] = "not valid UTF-8"
  (bag / "zero.png").write_bytes(b"")
  hostile[str(bag / "zero.png")] = "zero bytes"
  (bag / "text.jpg").write_bytes(b"not a jpeg at all")
  hostile[str(bag / "text.jpg")] = "UnidentifiedImageError"
  # A link to a good image is a good image.
  os.symlink(a_good_png, bag / "link_to_good.png")
  try:
    run = run_predict(tmp_path / "out", input=str(folder), model=tiny_model,
                      batch_size=4)
  finally:
    server.close()
  manifest, predictions, errors = run.manifest, run.predictions, \
      run.errors_by_id
  assert set(errors) == set(hostile)
  for id_, fragment in hostile.items():
    assert fragment in errors[id_]["error"], errors[id_]
  assert len(predictions) == 12 + 1
  assert manifest["counts"]["inputs"] == 12 + 1 + len(hostile)
  # The FIFO was never opened for reading: no writer was ever needed.
  assert (bag / "fifo.png").is_fifo()


# Parquet ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("form", ["encoded", "raw"])
def test_read_parquet_both_image_forms(sample_shards, form, png_dir, sample,
                                       tiny_model):
  card = card_lib.load_card(tiny_model)
  expected_ids = png_ids(png_dir, sample)
  expected = list(zip(expected_ids,
                      [sample.class_names[i] for i in sample.test.labels]))
  # 70 + 70 + 60 rows.
  assert len(os.listdir(os.path.join(sample_shards, form))) == 3
  with TestPipeline() as pipeline:
    read = pipeline | parquet.ReadParquetImages(
        os.path.join(sample_shards, form, "*.parquet"), card.input_shape,
        "image",
        "id", "label", batch_size=50)
    assert_that(read.images | beam.FlatMap(_flatten_ids), equal_to(expected))
    assert_that(read.errors, equal_to([]), label="NoErrors")


def test_raw_pixel_shards_hold_the_decoded_pixels(sample_shards, png_dir,
                                                  sample):
  rows = {r["id"]: r["image"] for r in pq.read_table(
      os.path.join(sample_shards, "raw")).to_pylist()}
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


def _raw(images) -> list:
  return [image.ravel().tolist() for image in images]


@pytest.mark.slow
def test_hostile_parquet_rows_fail_alone(tmp_path, tiny_model, sample):
  shards = tmp_path / "shards"
  shards.mkdir()
  images = sample.test.images
  pngs = [preprocessing.encode_png(x) for x in images[:40]]
  raw = _raw(images[:10])
  raw[2][5] = None  # one null element
  raw[4][100] = 999  # one value out of range
  raw[6][0] = -3
  raw[8] = raw[8][:50]  # short
  raw[9] = None  # null cell
  pq.write_table(pa.table({
      "id": [f"raw{i}" for i in range(10)],
      "image": pa.array(raw, pa.list_(pa.int16())),
      "label": ["Bag"] * 10,
  }), shards / "a_raw.parquet")
  # Null and integer ids; duplicates within and across shards.
  pq.write_table(pa.table({
      "id": pa.array(["e0", None, "e2", "e2", "raw0", None]),
      "image": pngs[:6],
      "label": ["Coat"] * 6,
  }), shards / "b_ids.parquet")
  pq.write_table(pa.table({"id": pa.array([7, 8, 9], pa.int64()),
                           "image": pngs[6:9], "label": ["Bag"] * 3}),
                 shards / "c_int_ids.parquet")
  # No label column (optional): the rows are classified, labels unknown.
  pq.write_table(pa.table({"id": ["n0", "n1"], "image": pngs[9:11]}),
                 shards / "d_no_label.parquet")
  # An image column of the wrong type: every row fails, each counted once.
  pq.write_table(pa.table({"id": [f"s{i}" for i in range(10)],
                           "image": [f"{i}" for i in range(10)],
                           "label": ["Bag"] * 10}),
                 shards / "e_string_images.parquet")
  pq.write_table(pa.table({"id": ["f0", "f1"], "label": ["Bag"] * 2}),
                 shards / "f_no_image.parquet")
  pq.write_table(pa.table({"image": pngs[11:14]}), shards / "g_no_id.parquet")
  pq.write_table(pa.table({"id": ["h0", "h1"],
                           "image": pa.array(_raw(images[14:16]),
                                             pa.list_(pa.float32())),
                           "label": ["Bag"] * 2}),
                 shards / "h_float_pixels.parquet")
  (shards / "i_not_parquet.parquet").write_bytes(b"PAR1 but no more")
  os.mkfifo(shards / "j_fifo.parquet")
  os.symlink(shards / "gone.parquet", shards / "k_dangling.parquet")
  with open(os.path.join(os.fsencode(shards), b"l_\xff.parquet"), "wb") as f:
    pq.write_table(pa.table({"id": ["u0"], "image": pngs[20:21]}), f)

  run = run_predict(tmp_path / "out", input=str(shards / "*.parquet"),
                    model=tiny_model, label_column="label", batch_size=4)
  manifest, predictions, errors = run.manifest, run.predictions, \
      run.errors_by_id
  raw_errors = {"raw2": "null value", "raw4": "value 999",
                "raw6": "value -3", "raw8": "length 50", "raw9": "null image"}
  ids_shard = str(shards / "b_ids.parquet")
  expected_errors = dict(raw_errors)
  expected_errors[f"{ids_shard}#1"] = "null id"
  expected_errors[f"{ids_shard}#5"] = "null id"
  expected_errors.update({f"s{i}": "has type string" for i in range(10)})
  expected_errors.update({"f0": "no image column", "f1": "no image column"})
  no_id = str(shards / "g_no_id.parquet")
  expected_errors.update({f"{no_id}#{i}": "no id column" for i in range(3)})
  expected_errors.update({"h0": "has type list<element: float>",
                          "h1": "has type list<element: float>"})
  expected_errors[str(shards / "i_not_parquet.parquet")] = "Parquet"
  expected_errors[str(shards / "j_fifo.parquet")] = "is a FIFO"
  expected_errors[str(shards / "k_dangling.parquet")] = "FileNotFoundError"
  expected_errors[str(shards) + "/l_\\xff.parquet"] = "not valid UTF-8"
  assert set(errors) == set(expected_errors)
  for id_, fragment in expected_errors.items():
    assert fragment in errors[id_]["error"], errors[id_]
  predicted = sorted(row["id"] for row in predictions)
  assert predicted == sorted(["raw0", "raw1", "raw3", "raw5", "raw7",
                              "e0", "e2", "e2", "raw0", "7", "8", "9",
                              "n0", "n1"])
  labels = {row["id"]: row["true_label"] for row in predictions}
  assert labels["n0"] is None and labels["7"] == "Bag"
  counts = manifest["counts"]
  assert counts["inputs"] == len(predicted) + len(expected_errors)
  first_inputs = counts["inputs"]
  # e2 and raw0 twice each.
  assert manifest["duplicate_ids"] == 2
  pytest.importorskip("duckdb")  # The query tool needs the tools extra.
  from tools import answers  # pylint: disable=import-outside-toplevel
  from tools import sandbox  # pylint: disable=import-outside-toplevel
  connection = sandbox.connect(str(tmp_path / "out"))
  assert {row["id"]: row["rows"] for row in answers.duplicates(connection)} == {
      "e2": 2, "raw0": 2}

  # Again with --skip_existing: the predicted ids are skipped, every failed
  # row is tried again, and the null ids never count as seen.
  run = run_predict(tmp_path / "out", input=str(shards / "*.parquet"),
                    model=tiny_model, label_column="label", batch_size=4,
                    skip_existing=True)
  counts = run.manifest["counts"]
  assert counts["skipped"] == len(predicted) and run.predictions == []
  assert counts["inputs"] + counts["skipped"] == first_inputs
  assert set(run.errors_by_id) == set(expected_errors)
  # The folder still lists every prediction once: the kept shards.
  assert sorted(ids(listed_rows(tmp_path / "out", "predictions"))) == predicted


def test_raw_pixel_rows_are_checked_one_by_one():
  column = pa.array([[1, 2, 3, 4], [1, None, 3, 4], [1, 2, 3, 999], None,
                     [1, 2], [255, 0, 0, 255]], pa.list_(pa.int32()))
  pixels, good, bad = parquet.raw_pixel_array(column, 4)
  assert list(good) == [0, 5]
  assert list(pixels) == [1, 2, 3, 4, 255, 0, 0, 255]
  assert sorted(bad) == [1, 2, 3, 4]
  fixed = pa.array([[1, 2], [3, 4]], pa.list_(pa.uint8(), 2))
  pixels, good, bad = parquet.raw_pixel_array(fixed, 2)
  assert list(good) == [0, 1] and not bad


@pytest.mark.slow
def test_bad_parquet_rows_and_shards(tmp_path, tiny_model, sample):
  shards = tmp_path / "shards"
  shards.mkdir()
  pngs = [preprocessing.encode_png(x) for x in sample.test.images[:6]]
  pq.write_table(pa.table({
      "id": ["e0", "e1", "null", "empty", "e4", "e5"],
      "image": [pngs[0], pngs[1], None, b"", pngs[4], pngs[5]],
  }), shards / "encoded.parquet")
  (shards / "broken.parquet").write_bytes(b"PAR1 not really parquet")
  raw = [list(x.ravel()) for x in sample.test.images[:3]]
  raw[1] = raw[1][:100]
  pq.write_table(pa.table({
      "id": ["r0", "short", "r2"],
      "image": pa.array(raw, pa.list_(pa.uint8())),
  }), tmp_path / "raw.parquet")

  for pattern, expected_errors, expected_predictions in (
      (str(shards / "*.parquet"),
       {"null": "null image cell", "empty": "zero bytes",
        str(shards / "broken.parquet"): "Parquet"}, 4),
      (str(tmp_path / "raw.parquet"), {"short": "length 100"}, 2)):
    output = tmp_path / f"out_{len(expected_errors)}"
    run = run_predict(output, input=pattern, model=tiny_model)
    errors = run.errors_by_id
    assert len(run.predictions) == expected_predictions
    assert set(errors) == set(expected_errors)
    for error_id, fragment in expected_errors.items():
      assert fragment in errors[error_id]["error"], errors[error_id]


# Parquet by row group ---------------------------------------------------------


def test_plan_items_groups_row_groups():
  assert list(row_groups.plan_items("s", [40] * 5, item_rows=40)) == [
      ("s", i, i + 1, 40 * i, 40 * i + 40) for i in range(5)]
  assert list(row_groups.plan_items("s", [10, 10, 25, 5, 3], 20)) == [
      ("s", 0, 2, 0, 20), ("s", 2, 3, 20, 45), ("s", 3, 5, 45, 53)]
  assert list(row_groups.plan_items("s", [])) == []


def _corrupt_row_group(path, index, columns=None):
  """Overwrites the data pages of one row group's columns (all, or those at
  the indices `columns`) with garbage, leaving the footer and the other row
  groups intact."""
  metadata = pq.ParquetFile(path).metadata
  data = bytearray(open(path, "rb").read())
  group = metadata.row_group(index)
  for c in columns if columns is not None else range(group.num_columns):
    chunk = group.column(c)
    start = (chunk.dictionary_page_offset if chunk.has_dictionary_page
             else chunk.data_page_offset)
    for i in range(chunk.data_page_offset, start + chunk.total_compressed_size):
      data[i] = 0xFF if i % 2 else 0x07
  with open(path, "wb") as handle:
    handle.write(bytes(data))


@pytest.fixture()
def grouped_shard(tmp_path, sample):
  """200 encoded images in one shard of five row groups of 40; the third
  row group is corrupt."""
  path = str(tmp_path / "grouped.parquet")
  images = sample.test.images
  pq.write_table(pa.table({
      "id": [f"img{i}" for i in range(200)],
      "image": [preprocessing.encode_png(x) for x in images[:200]],
      "label": [sample.class_names[l] for l in sample.test.labels[:200]],
  }), path, row_group_size=40)
  _corrupt_row_group(path, 2)
  return path


@pytest.mark.slow
@pytest.mark.parametrize("id_column", ["id", None])
def test_corrupt_row_group_is_one_error_and_the_others_go_on(
    tmp_path, grouped_shard, tiny_model, id_column):
  run = run_predict(tmp_path / "out", input=grouped_shard, model=tiny_model,
                    id_column=id_column, label_column="label", batch_size=16)
  manifest, rows, errors = run.manifest, run.predictions, run.errors
  wanted = [i for i in range(200) if not 80 <= i < 120]
  names = ([f"img{i}" for i in wanted] if id_column else
           [f"{grouped_shard}#{i}" for i in wanted])
  assert sorted(ids(rows)) == sorted(names)
  assert [(e["id"], e["source"]) for e in errors] == [
      (f"{grouped_shard}#80-119", grouped_shard)]
  assert "rows 80 to 119 of the shard" in errors[0]["error"]
  assert manifest["counts"]["inputs"] == 161

  # Again with --skip_existing: the 160 are skipped, the corrupt row group
  # is tried again and is one error row again.
  run = run_predict(tmp_path / "out", input=grouped_shard, model=tiny_model,
                    id_column=id_column, label_column="label", batch_size=16,
                    skip_existing=True)
  manifest, rows, errors = run.manifest, run.predictions, run.errors
  assert manifest["counts"]["skipped"] == 160
  assert manifest["counts"]["inputs"] == 1 and len(errors) == 1
  assert rows == [] and manifest["totals"]["predictions"] == 160


def test_a_failing_row_group_reports_only_the_wanted_rows_it_took(
    tmp_path, sample):
  """With --skip_existing the rows to read are a subset: a failure reports
  the wanted rows it took, never rows skipped or not asked for."""
  path = str(tmp_path / "images_break.parquet")
  pq.write_table(pa.table({
      "id": [f"img{i}" for i in range(120)],
      "image": [preprocessing.encode_png(x) for x in sample.test.images[:120]],
  }), path, row_group_size=40)
  _corrupt_row_group(path, 2, columns=[1])  # ids intact, images broken
  item = row_groups.RowGroupItem(path, 0, 3, 0, 120)
  read = list(row_groups.read_item(item, ["id", "image"], 16,
                                   [0, 1, 85, 90]))
  assert [r.indices.tolist() for r in read
          if isinstance(r, row_groups.RowBatch)] == [[0, 1]]
  assert [(r.start, r.stop) for r in read
          if isinstance(r, row_groups.RowRangeError)] == [(85, 91)]
  # Nothing wanted in the broken row group: nothing to report.
  assert [type(r) for r in row_groups.read_item(item, ["id", "image"], 16,
                                                [0, 50])] == [
                                                    row_groups.RowBatch] * 2


@pytest.mark.slow
def test_row_group_items_spread_one_shard(grouped_shard, tiny_model, sample):
  from model import card as card_lib  # pylint: disable=import-outside-toplevel
  card = card_lib.load_card(tiny_model)
  with TestPipeline() as pipeline:
    items, _ = pipeline | parquet.PlanShards(grouped_shard, item_rows=40)
    assert_that(items, equal_to([(grouped_shard, i, i + 1, 40 * i, 40 * i + 40)
                                 for i in range(5)]))
    read = pipeline | "Read" >> parquet.ReadParquetImages(
        grouped_shard, card.input_shape, "image", None, "label",
        batch_size=16, item_rows=40)
    # SHARD#ROW is the row's index in the whole shard, whichever item.
    assert_that(read.images | beam.FlatMap(lambda b: b.ids),
                equal_to([f"{grouped_shard}#{i}" for i in range(200)
                          if not 80 <= i < 120]), label="Ids")
    assert_that(read.errors | beam.Map(lambda e: e["id"]),
                equal_to([f"{grouped_shard}#80-119"]), label="Errors")


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
