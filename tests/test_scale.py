"""Scale-out: listing in parallel, Parquet by row group, --skip_existing as a
join, and lists of image URIs; small versions of benchmarks/scale.py's
workloads, each with exact accounting and no duplicate ids."""

import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to

from beam_jobs import config as config_lib
from beam_jobs import preflight
from beam_jobs import outputs
from beam_jobs import pipeline
from beam_jobs import predict
from beam_jobs.sources import listing
from beam_jobs.sources import lists as list_source
from beam_jobs.sources import parquet
from beam_jobs.sources import row_groups
from beam_jobs.sources import skip_existing
from beam_jobs.contracts import id_bucket
from model import preprocessing

RUNNER = ["--runner", "DirectRunner"]


# Fixtures ---------------------------------------------------------------------

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


def _beam_match(pattern: str) -> list:
  """Beam's own FileSystems.match: the reference for what a pattern means."""
  return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _flatten(group):
  return list(group)


# Listing ----------------------------------------------------------------------


@pytest.mark.parametrize("relative", [
    "**", "*/*.png", "**/00*.png", "[BC]*/*", "a/?/c/**", "Bag/01?.png",
    "Sandal/*/0[12]/*.png", "*.png", "a/b*/**", "a/b2/", "Sandal/2024/*/"])
def test_listing_matches_what_beam_matches(nested, relative):
  pattern = os.path.join(nested, relative)
  expected = _beam_match(pattern)
  assert expected, pattern
  group_size = 16
  with TestPipeline() as pipeline:
    groups, errors = pipeline | listing.ListFiles(pattern, group_size)
    assert_that(groups | beam.FlatMap(_flatten), equal_to(expected))
    # Every group is full but one at most: the short last groups of the
    # work items are merged.
    assert_that(
        groups | beam.Map(len) | beam.combiners.ToList(),
        lambda sizes: _check_sizes(sizes[0], len(expected), group_size),
        label="Sizes")
    assert_that(errors, equal_to([]), label="NoErrors")


def _check_sizes(sizes, total, group_size):
  assert sum(sizes) == total
  assert all(0 < size <= group_size for size in sizes), sizes
  assert sum(size < group_size for size in sizes) <= 1, sizes


def test_listing_keyed_by_bucket_for_the_join(nested):
  pattern = os.path.join(nested, "**")
  expected = _beam_match(pattern)
  with TestPipeline() as pipeline:
    keyed, _ = pipeline | listing.ListFiles(pattern, 8, buckets=5)
    assert_that(keyed | beam.FlatMapTuple(lambda _, refs: refs),
                equal_to(expected))
    assert_that(keyed | beam.MapTuple(
        lambda bucket, refs: len(refs) <= 8 and all(
            id_bucket(ref, 5) == bucket for ref in refs)),
                _all_true, label="Buckets")


def _all_true(flags):
  assert flags and all(flags), flags


def test_pattern_pruning_never_skips_a_folder_that_may_match(nested):
  spec = listing.PatternSpec(os.path.join(nested, "Sandal/*/0[12]/*.png"))
  assert spec.max_depth is None  # [..] may match a slash: no depth limit.
  spec = listing.PatternSpec(os.path.join(nested, "B*/0*.png"))
  assert spec.max_depth == 1
  assert spec.may_hold_matches(os.path.join(nested, "Bag"))
  assert not spec.may_hold_matches(os.path.join(nested, "Coat"))
  assert not spec.may_hold_matches(os.path.join(nested, "Bag", "sub"))
  spec = listing.PatternSpec(os.path.join(nested, "**"))
  assert spec.may_hold_matches(os.path.join(nested, "a", "b", "c", "d"))


class _Blob:

  def __init__(self, name):
    self.name = name


class _Page(list):
  prefixes = ()


class _Blobs:

  def __init__(self, pages):
    self.pages = pages


class FakeStorageClient:
  """google.cloud.storage's list_blobs over a fixed set of object names, a
  few per page, as GCS answers: with a delimiter, the names below a
  sub-folder come back once, as its prefix."""

  PAGE = 7

  def __init__(self, names):
    self.names = sorted(names)
    self.calls = []

  def list_blobs(self, bucket, prefix="", delimiter=None, fields=None):
    del fields
    self.calls.append((bucket, prefix, delimiter))
    entries, seen = [], set()
    for name in self.names:
      if not name.startswith(prefix):
        continue
      rest = name[len(prefix):]
      if delimiter and delimiter in rest:
        sub = prefix + rest.split(delimiter, 1)[0] + delimiter
        if sub not in seen:
          seen.add(sub)
          entries.append(("prefix", sub))
      else:
        entries.append(("blob", name))
    pages = []
    for start in range(0, max(len(entries), 1), self.PAGE):
      chunk = entries[start:start + self.PAGE]
      page = _Page(_Blob(name) for kind, name in chunk if kind == "blob")
      page.prefixes = tuple(name for kind, name in chunk if kind == "prefix")
      pages.append(page)
    return _Blobs(pages)


def test_gcs_listing_by_pages_and_prefixes():
  names = [f"images/{c}/{i}.png" for c in ("Bag", "Coat") for i in range(9)]
  names += ["images/top.png", "images/Coat/", "images/a/b/c/deep.png",
            "other/x.png"]
  client = FakeStorageClient(names)
  pattern = "gs://bucket/images/**"
  expected = sorted(f"gs://bucket/{n}" for n in names
                    if n.startswith("images/") and not n.endswith("/"))
  with TestPipeline() as pipeline:
    groups, errors = pipeline | listing.ListFiles(pattern, 4,
                                                  storage_client=client)
    assert_that(groups | beam.FlatMap(_flatten), equal_to(expected))
    assert_that(errors, equal_to([]), label="NoErrors")

  lister = listing.GcsLister(client)
  level = sorted(lister.scan("gs://bucket/images/"))
  assert level == [("gs://bucket/images/Bag/", listing.FOLDER),
                   ("gs://bucket/images/Coat/", listing.FOLDER),
                   ("gs://bucket/images/a/", listing.FOLDER),
                   ("gs://bucket/images/top.png", listing.FILE)]
  # The console's folder marker "images/Coat/" is no image.
  assert sorted(path for path, _ in lister.walk("gs://bucket/images/Coat/",
                                                None)) == [
      f"gs://bucket/images/Coat/{i}.png" for i in range(9)]


def test_groups_fill_and_key_by_bucket():
  groups = listing.Groups(3)
  out = [groups.add(str(i)) for i in range(7)]
  assert [g for g in out if g] == [["0", "1", "2"], ["3", "4", "5"]]
  assert list(groups.rest()) == [["6"]]
  keyed = listing.Groups(2, buckets=4, id_of=list_source.row_id)
  full = [keyed.add((name, "u", None)) for name in "abcde"]
  rest = list(keyed.rest())
  refs = [r for g in full if g for r in g[1]] + [r for _, g in rest for r in g]
  assert sorted(list_source.row_id(r) for r in refs) == list("abcde")
  for bucket, group in [g for g in full if g] + rest:
    assert all(id_bucket(list_source.row_id(r), 4) == bucket
               for r in group)


def _run(output, **fields):
  """Runs predict; returns the manifest and this run's predictions and
  errors (the manifest lists kept shards of earlier runs too)."""
  config = config_lib.PredictConfig(output=str(output), **fields)
  manifest = predict.run(config, RUNNER)
  rows = {}
  for kind in (outputs.PREDICTIONS_PREFIX, outputs.ERRORS_PREFIX):
    rows[kind] = []
    for entry in manifest["files"][kind]:
      if manifest["run_id"] in entry["name"]:
        rows[kind].extend(pq.read_table(
            os.path.join(str(output), entry["name"])).to_pylist())
  counts = manifest["counts"]
  assert counts["inputs"] == counts["predictions"] + counts["errors"]
  assert manifest["accounted"]
  return manifest, rows[outputs.PREDICTIONS_PREFIX], rows[
      outputs.ERRORS_PREFIX]


def _ids(rows) -> list:
  return [row["id"] for row in rows]


def test_nested_folder_then_skip_existing_with_overlap(tmp_path, nested,
                                                       tiny_model):
  everything = _beam_match(os.path.join(nested, "**"))
  first_part = _beam_match(os.path.join(nested, "[BCa]*", "**"))
  output = tmp_path / "out"
  manifest, rows, errors = _run(output,
                                input=os.path.join(nested, "[BCa]*", "**"),
                                model=tiny_model, batch_size=16)
  assert sorted(_ids(rows)) == first_part and errors == []
  labels = {row["id"]: row["true_label"] for row in rows}
  assert labels[os.path.join(nested, "Bag", "000.png")] == "Bag"
  assert labels[os.path.join(nested, "Coat", "deep", "x", "000.png")] is None

  manifest, rows, errors = _run(output, input=nested, model=tiny_model,
                                batch_size=16, skip_existing=True)
  counts = manifest["counts"]
  assert counts["skipped"] == len(first_part)
  assert counts["inputs"] == len(everything) - len(first_part)
  assert sorted(_ids(rows)) == sorted(set(everything) - set(first_part))
  listed = [row["id"] for entry in manifest["files"]["predictions"]
            for row in pq.read_table(os.path.join(
                str(output), entry["name"])).to_pylist()]
  assert sorted(listed) == everything  # No id twice, none missing.


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


@pytest.mark.parametrize("id_column", ["id", None])
def test_corrupt_row_group_is_one_error_and_the_others_go_on(
    tmp_path, grouped_shard, tiny_model, id_column):
  manifest, rows, errors = _run(tmp_path / "out", input=grouped_shard,
                                model=tiny_model, id_column=id_column,
                                label_column="label", batch_size=16)
  wanted = [i for i in range(200) if not 80 <= i < 120]
  names = ([f"img{i}" for i in wanted] if id_column else
           [f"{grouped_shard}#{i}" for i in wanted])
  assert sorted(_ids(rows)) == sorted(names)
  assert [(e["id"], e["source"]) for e in errors] == [
      (f"{grouped_shard}#80-119", grouped_shard)]
  assert "rows 80 to 119 of the shard" in errors[0]["error"]
  assert manifest["counts"]["inputs"] == 161

  # Again with --skip_existing: the 160 are skipped, the corrupt row group
  # is tried again and is one error row again.
  manifest, rows, errors = _run(tmp_path / "out", input=grouped_shard,
                                model=tiny_model, id_column=id_column,
                                label_column="label", batch_size=16,
                                skip_existing=True)
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


def test_skip_existing_on_shards_with_overlapping_ids(tmp_path, sample,
                                                      tiny_model):
  pngs = [preprocessing.encode_png(x) for x in sample.test.images[:90]]
  shards = tmp_path / "shards"
  shards.mkdir()
  pq.write_table(pa.table({"id": [f"i{i}" for i in range(60)],
                           "image": pngs[:60]}), shards / "a.parquet",
                 row_group_size=25)
  output = tmp_path / "out"
  _run(output, input=str(shards / "a.parquet"), model=tiny_model)
  # The second shard repeats ids i30..i59 and adds i60..i89 and a null id.
  pq.write_table(pa.table({
      "id": [f"i{i}" for i in range(30, 90)] + [None],
      "image": pngs[30:90] + pngs[:1]}), shards / "b.parquet",
                 row_group_size=20)
  manifest, rows, errors = _run(output, input=str(shards / "*.parquet"),
                                model=tiny_model, skip_existing=True,
                                batch_size=8)
  counts = manifest["counts"]
  assert counts["skipped"] == 60 + 30
  assert sorted(_ids(rows)) == sorted(f"i{i}" for i in range(60, 90))
  assert [e["id"] for e in errors] == [f"{shards / 'b.parquet'}#60"]
  assert counts["inputs"] == 31
  listed = [row["id"] for entry in manifest["files"]["predictions"]
            for row in pq.read_table(os.path.join(
                str(output), entry["name"])).to_pylist()]
  assert sorted(listed) == sorted(f"i{i}" for i in range(90))


# Lists of image URIs ----------------------------------------------------------


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


@pytest.mark.parametrize("batch_size", [4, 256])
def test_input_lists_in_each_format(tmp_path, lists, tiny_model, batch_size):
  folder, bag, coat, missing, comma = lists
  manifest, rows, errors = _run(
      tmp_path / "out", input=None, input_list=str(folder / "*"),
      model=tiny_model, label_column="label", batch_size=batch_size)
  expected = (bag[:10] + [coat[0]] + [f"c{i}" for i in range(10)] +
              ["comma"] + [f"p{i}" for i in range(24)])
  assert sorted(_ids(rows)) == sorted(expected)
  by_id = {row["id"]: row for row in rows}
  assert by_id["c3"]["source"] == bag[13] and by_id["c3"]["true_label"] == "Bag"
  assert by_id["comma"]["source"] == comma
  assert by_id["p0"]["true_label"] == "Coat" and by_id[coat[0]]["true_label"] \
      is None
  errors = {e["id"]: e for e in errors}
  assert set(errors) == {missing, "/tmp/\\xff.png", "no_uri",
                         f"{folder / 'b.csv'}#12", "p24"}
  assert "FileNotFoundError" in errors[missing]["error"]
  assert "not valid UTF-8" in errors["/tmp/\\xff.png"]["error"]
  assert "no URI" in errors["no_uri"]["error"] and "no URI" in errors[
      "p24"]["error"]
  assert "null id" in errors[f"{folder / 'b.csv'}#12"]["error"]
  assert manifest["counts"]["inputs"] == len(expected) + 5
  assert manifest["duplicate_ids"] == 0


def test_input_list_with_skip_existing_and_repeated_uris(tmp_path, lists,
                                                         tiny_model):
  folder, bag, _, _, _ = lists
  output = tmp_path / "out"
  first = tmp_path / "first.txt"
  # Saved by Windows' Notepad: a byte order mark before the first URI.
  first.write_bytes(b"\xef\xbb\xbf" + ("\n".join(bag[:20]) + "\n").encode())
  manifest, _, errors = _run(output, input=None, input_list=str(first),
                             model=tiny_model)
  assert manifest["counts"]["predictions"] == 20 and errors == []
  again = tmp_path / "again.txt"
  # Overlapping, and one URI listed twice.
  again.write_text("\n".join(bag[10:30] + bag[25:26]) + "\n")
  manifest, rows, errors = _run(output, input=None, input_list=str(again),
                                model=tiny_model, skip_existing=True,
                                batch_size=4)
  assert manifest["counts"]["skipped"] == 10 and errors == []
  assert sorted(_ids(rows)) == sorted(bag[20:30] + bag[25:26])
  assert manifest["duplicate_ids"] == 1


def test_no_duplicate_count_leaves_the_ids_uncounted(tmp_path, lists,
                                                      tiny_model):
  folder, bag, _, _, _ = lists
  listed = tmp_path / "twice.txt"
  listed.write_text("\n".join(bag[:6] + bag[:2]) + "\n")
  config = config_lib.PredictConfig(None, tiny_model, str(tmp_path / "o"),
                                    input_list=str(listed),
                                    count_duplicate_ids=False)
  assert not pipeline.counts_duplicate_ids(preflight.check(config).config)
  manifest, rows, errors = _run(tmp_path / "out", input=None,
                                input_list=str(listed), model=tiny_model,
                                count_duplicate_ids=False)
  assert len(rows) == 8 and errors == []
  assert manifest["duplicate_ids"] is None
  assert config_lib.parse_args([
      "--input", str(folder), "--model", tiny_model, "--output", "o",
      "--no_duplicate_count"])[0].count_duplicate_ids is False


def test_input_list_config_errors(tmp_path, lists, tiny_model, png_dir):
  folder = lists[0]
  with pytest.raises(config_lib.ConfigError, match="pass one of --input"):
    preflight.check(config_lib.PredictConfig(png_dir, tiny_model, str(tmp_path / "o"),
                             input_list=str(folder / "a.txt")))
  with pytest.raises(config_lib.ConfigError, match="--uri_column 'path'"):
    preflight.check(config_lib.PredictConfig(None, tiny_model, str(tmp_path / "o"),
                             input_list=str(folder / "b.csv"),
                             uri_column="path"))
  with pytest.raises(config_lib.ConfigError, match="text list"):
    preflight.check(config_lib.PredictConfig(None, tiny_model, str(tmp_path / "o"),
                             input_list=str(folder / "a.txt"),
                             label_column="label"))
  with pytest.raises(config_lib.ConfigError, match="matches no files"):
    preflight.check(config_lib.PredictConfig(None, tiny_model, str(tmp_path / "o"),
                             input_list=str(folder / "*.json")))


def test_relative_uris_resolve_from_the_list_folder():
  assert list_source.resolve_uri("x/../y.png", "/data/lists/a.txt") == (
      "/data/lists/y.png")
  assert list_source.resolve_uri("../img/y.png", "gs://b/lists/a.csv") == (
      "gs://b/img/y.png")
  assert list_source.resolve_uri("gs://b/y.png", "/l.txt") == "gs://b/y.png"
  assert list_source.resolve_uri("/abs//y.png", "gs://b/l.txt") == "/abs/y.png"
