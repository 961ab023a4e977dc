"""imagebatch/paths.py: what a pattern matches, locally."""

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
