"""beam_jobs/sources/listing.py: listing folders and gs:// prefixes in
parallel, in groups, keyed by bucket for the --skip_existing join; and what
a folder that cannot be listed becomes."""

import os

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to

from beam_jobs.contracts import id_bucket
from beam_jobs.sources import listing
from beam_jobs.sources import lists as list_source
from model import datasets
from tests.helpers import beam_match
from tests.helpers import run_predict


def _flatten(group):
  return list(group)


@pytest.mark.slow
@pytest.mark.parametrize("relative", [
    "**", "*/*.png", "**/00*.png", "[BC]*/*", "a/?/c/**", "Bag/01?.png",
    "Sandal/*/0[12]/*.png", "*.png", "a/b*/**", "a/b2/", "Sandal/2024/*/"])
def test_listing_matches_what_beam_matches(nested, relative):
  pattern = os.path.join(nested, relative)
  expected = beam_match(pattern)
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
  expected = beam_match(pattern)
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


@pytest.mark.slow
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


# Folders that cannot be listed ------------------------------------------------


def test_unreadable_subfolder_is_an_error_row(tmp_path, tiny_model, sample):
  if os.geteuid() == 0:
    pytest.skip("root reads every folder")
  folder = tmp_path / "pile"
  good = datasets.Split(sample.test.images[:4], sample.test.labels[:4])
  datasets.write_png_folder(good, sample.class_names, str(folder))
  (folder / "locked").mkdir()
  (folder / "locked" / "a.png").write_bytes(b"x")
  os.chmod(folder / "locked", 0)
  try:
    run = run_predict(tmp_path / "out", input=str(folder), model=tiny_model)
  finally:
    os.chmod(folder / "locked", 0o755)
  assert list(run.errors_by_id) == [str(folder / "locked")]
  assert len(run.predictions) == 4 and run.manifest["counts"]["inputs"] == 5


# The output inside the input ---------------------------------------------------


@pytest.mark.slow
def test_an_output_inside_the_input_is_never_an_input(tmp_path, tiny_model,
                                                      sample, capsys):
  """Fails on the code before the fix: the run's own lock, manifest and
  shards were listed as inputs (error rows), more at each run."""
  from tools import make_shards  # pylint: disable=import-outside-toplevel
  from beam_jobs import predict  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "pile"
  good = datasets.Split(sample.test.images[:3], sample.test.labels[:3])
  datasets.write_png_folder(good, sample.class_names, str(folder))
  shards = tmp_path / "shards"
  make_shards.make_shards(str(folder), str(shards / "part1"),
                          rows_per_shard=2)
  output = folder / "results"
  for flags in ({}, {"skip_existing": True}, {"overwrite": True}):
    run = run_predict(output, input=str(folder), model=tiny_model, **flags)
    assert run.errors == [], run.errors
    assert run.manifest["counts"]["inputs"] == (0 if flags.get(
        "skip_existing") else 3)
  # Shards under a recursive glob, the output among them.
  for flags in ({}, {"overwrite": True}):
    run = run_predict(shards / "out", input=str(shards / "**.parquet"),
                      model=tiny_model, **flags)
    assert run.errors == [] and run.manifest["counts"]["inputs"] == 3
  # An output that holds the input (or is its folder) is refused.
  for output in (folder, tmp_path):
    capsys.readouterr()
    assert predict.main(["--input", str(folder), "--model", tiny_model,
                         "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is inside --output" in err, err
