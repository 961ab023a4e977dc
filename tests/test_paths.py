"""imagebatch/paths.py: what a pattern matches, locally, and the labels
folders give."""

import os

import pytest

from imagebatch import paths


@pytest.mark.parametrize("order", [sorted, lambda e: sorted(e, reverse=True)])
def test_the_first_match_is_the_same_whatever_the_disk_order(tmp_path,
                                                              monkeypatch,
                                                              order):
  """Fails on the code before the fix: a check of the first shard read
  whichever file os.scandir yielded first, so whether one shard with a
  wrong column refused the job depended on the disk's order."""
  for name in ("m.parquet", "z.parquet", "a.parquet", "b.parquet"):
    (tmp_path / name).write_bytes(b"")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "0.parquet").write_bytes(b"")
  scan = paths.scan_local
  monkeypatch.setattr(paths, "scan_local",
                      lambda folder: iter(order(list(scan(folder)))))
  assert paths.match_paths(str(tmp_path / "*.parquet"), limit=1) == [
      str(tmp_path / "a.parquet")]
  assert paths.match_paths(str(tmp_path / "**"), limit=2) == [
      str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
  assert paths.match_paths(str(tmp_path / "**")) == sorted(
      str(p) for p in tmp_path.rglob("*.parquet"))


def test_folder_label_only_for_known_classes():
  names = frozenset(["cat", "dog"])
  assert paths.folder_label("/d/cat/1.png", "/d/", names) == "cat"
  assert paths.folder_label("/d/x/dog/1.png", "/d/", names) == "dog"
  assert paths.folder_label("/d/incoming/1.png", "/d/", names) is None
  assert paths.folder_label("/d/1.png", "/d/", names) is None
  assert paths.folder_label("gs://b/d/cat/1.png", "gs://b/d/", names) == "cat"
  assert paths.pattern_base("gs://b/d/*/*.png") == "gs://b/d/"
  assert paths.expand_pattern("/d/") == "/d/**"


def test_a_folder_that_cannot_be_listed_is_matched_not_dropped(tmp_path,
                                                               monkeypatch):
  """As root every folder can be listed, so the refusal is simulated."""
  (tmp_path / "open").mkdir()
  (tmp_path / "open" / "a.png").write_bytes(b"x")
  (tmp_path / "locked").mkdir()
  (tmp_path / "locked" / "b.png").write_bytes(b"x")
  scandir = os.scandir

  def refusing(path="."):
    if os.fspath(path).endswith("locked"):
      raise PermissionError(13, "Permission denied", os.fspath(path))
    return scandir(path)

  monkeypatch.setattr(os, "scandir", refusing)
  assert paths.match_paths(str(tmp_path) + "/**") == [
      str(tmp_path / "locked"), str(tmp_path / "open" / "a.png")]
  # Only a recursive pattern could have reached into it.
  assert paths.match_paths(str(tmp_path) + "/*/a.png") == [
      str(tmp_path / "open" / "a.png")]
  with pytest.raises(paths.NotARegularFile, match="is a folder"):
    paths.open_file(str(tmp_path / "locked"))


class _Blob:
  def __init__(self, bucket, name):
    import datetime  # pylint: disable=import-outside-toplevel
    self.bucket, self.name, self.size = bucket, name, 1
    self.updated = datetime.datetime(2024, 1, 1,
                                     tzinfo=datetime.timezone.utc)


class _ListingClient:
  """google.cloud.storage's Client as Beam's gcsio lists with it: names in
  lexicographic order, as GCS returns them."""

  def __init__(self, names):
    self._names = sorted(names)

  def bucket(self, name):
    class Bucket:  # pylint: disable=too-few-public-methods
      pass
    bucket = Bucket()
    bucket.name = name
    return bucket

  def list_blobs(self, bucket, prefix=None, **kwargs):
    del kwargs
    return [_Blob(bucket, name) for name in self._names
            if name.startswith(prefix or "")]


def test_the_first_match_is_the_first_name_locally_and_on_gcs(tmp_path,
                                                              monkeypatch):
  """Fails on the code before the fix: locally a folder's files came before
  its sub-folders' files, while gs:// lists names in lexicographic order,
  so a check of the first shard read another file there."""
  pytest.importorskip("google.cloud.storage")
  # pylint: disable=import-outside-toplevel
  from apache_beam.io.gcp import gcsfilesystem
  from apache_beam.io.gcp import gcsio
  names = ["data/b.parquet", "data/0/x.parquet", "data/a/z.parquet",
           "data/a.parquet", "data/a/notes.txt"]
  for name in names:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  expected = ["data/0/x.parquet", "data/a.parquet"]
  assert paths.match_paths(str(tmp_path / "data" / "**.parquet"),
                           limit=2) == [str(tmp_path / e) for e in expected]
  client = _ListingClient(names)
  monkeypatch.setattr(gcsfilesystem.GCSFileSystem, "_gcsIO",
                      lambda self: gcsio.GcsIO(storage_client=client))
  assert paths.match_paths("gs://bucket/data/**.parquet", limit=2) == [
      f"gs://bucket/{e}" for e in expected]
