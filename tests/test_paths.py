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
