"""beam_jobs/output_folder.py and output_lock.py: what a run may write,
replace and delete in its output folder, one run at a time, with a manifest
that stays true however a run ends (refused, killed, out of disk)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_jobs import config as config_lib
from beam_jobs import output_folder
from beam_jobs import output_lock
from beam_jobs import outputs
from beam_jobs import predict
from beam_jobs import preflight
from model import card as card_lib
from model import datasets
from model import preprocessing
from tests.helpers import RUNNER
from tests.helpers import committed_files
from tests.helpers import files_below
from tests.helpers import listed_rows
from tests.helpers import no_hang
from tests.helpers import png_ids
from tests.helpers import predict_cli
from tests.helpers import read_parquet_rows
from tests.helpers import run_predict


def _one_image_folder(tmp_path, sample) -> str:
  folder = tmp_path / "pile"
  good = datasets.Split(sample.test.images[:3], sample.test.labels[:3])
  datasets.write_png_folder(good, sample.class_names, str(folder))
  return str(folder)


@pytest.mark.slow
def test_files_this_tool_did_not_write_are_never_deleted(tmp_path, tiny_model,
                                                         sample):
  images = _one_image_folder(tmp_path, sample)
  output = tmp_path / "out"
  output.mkdir()
  victim = tmp_path / "victim.txt"
  victim.write_text("keep me")
  theirs = {
      "predictions-00000-of-00001.parquet": b"someone else's",
      "errors-x.parquet": b"someone else's",
      "notes.txt": b"mine",
  }
  for name, data in theirs.items():
    (output / name).write_bytes(data)
  (output / "beam-temp-predictions-x").mkdir()
  os.symlink(victim, output / "predictions-link.parquet")
  config = dict(input=images, model=tiny_model)
  with pytest.raises(config_lib.ConfigError, match="did not write"):
    predict.run(config_lib.PredictConfig(output=str(output), **config),
                list(RUNNER))
  assert {p.name for p in output.iterdir()} == set(theirs) | {
      "beam-temp-predictions-x", "predictions-link.parquet"}
  # --overwrite deletes our kinds only, and a link never beyond itself.
  run_predict(output, **config, overwrite=True)
  assert victim.read_text() == "keep me"
  assert (output / "notes.txt").read_bytes() == b"mine"
  assert not (output / "predictions-link.parquet").exists()
  assert not (output / "beam-temp-predictions-x").exists()
  # The file it left alone stops no later run (one that keeps the results).
  run = run_predict(output, **config, skip_existing=True)
  assert run.manifest["others"] == ["notes.txt"]
  assert len(listed_rows(output, "predictions")) == 3


@pytest.mark.slow
def test_damaged_manifest_stops_predict_in_one_line(tmp_path, tiny_model,
                                                   sample, capsys):
  pytest.importorskip("duckdb")  # tools.query needs the tools extra.
  from tools import query  # pylint: disable=import-outside-toplevel
  images = _one_image_folder(tmp_path, sample)
  output = tmp_path / "out"
  run_predict(output, input=images, model=tiny_model)
  args = ["--input", images, "--model", tiny_model, "--output", str(output)]
  for content in (b"", b"{\"run_id\": \"20240101T", b"\x00" * 10, b"[]"):
    (output / outputs.MANIFEST_FILE).write_bytes(content)
    assert predict.main(args) == 2, content
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err, err
    assert query.main([str(output)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
  # --overwrite replaces the damaged manifest and the shards it hid.
  run = run_predict(output, input=images, model=tiny_model, overwrite=True)
  assert len(run.predictions) == 3 and len(run.manifest["retired"]) == 2
  assert files_below(output) == committed_files(run.manifest)


def test_output_that_is_a_file_is_one_line(tmp_path, tiny_model, sample,
                                           capsys):
  images = _one_image_folder(tmp_path, sample)
  (tmp_path / "out").write_text("a file")
  code = predict.main(["--input", images, "--model", tiny_model, "--output",
                       str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and "is a file" in err


@pytest.mark.parametrize("where", ["read-only file system",
                                   "under a file"])
def test_output_that_cannot_be_written_is_one_line_before_any_work(
    tmp_path, tiny_model, sample, capsys, where):
  images = _one_image_folder(tmp_path, sample)
  if where == "read-only file system":
    output = "/proc/self/beam_jobs_out"  # read-only even for root
  else:
    (tmp_path / "a_file").write_text("x")
    output = str(tmp_path / "a_file" / "out")
  code = predict.main(["--input", images, "--model", tiny_model, "--output",
                       output])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1, err
  assert output in err


@pytest.mark.slow
def test_a_rerun_over_this_models_results_needs_a_choice(tmp_path, tiny_model,
                                                        sample, capsys):
  """Results are never replaced silently: --skip_existing keeps them,
  --overwrite replaces them."""
  images = _one_image_folder(tmp_path, sample)
  args = ["--input", images, "--model", tiny_model, "--output",
          str(tmp_path / "out")]
  assert predict.main(args) == 0
  first = json.loads((tmp_path / "out" / "_run.json").read_text())["run_id"]
  capsys.readouterr()
  assert predict.main(args) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and first in err and "--overwrite" in err
  assert json.loads((tmp_path / "out" / "_run.json").read_text())[
      "run_id"] == first
  assert predict.main(args + ["--skip_existing"]) == 0
  assert predict.main(args + ["--overwrite"]) == 0
  assert json.loads((tmp_path / "out" / "_run.json").read_text())[
      "run_id"] != first


def test_output_of_another_model_needs_overwrite(tmp_path, tiny_model,
                                                 png_dir):
  output = tmp_path / "out"
  output.mkdir()
  (output / "_run.json").write_text(json.dumps({"model_id": "someoneelse"}))
  config = config_lib.PredictConfig(png_dir, tiny_model, str(output))
  with pytest.raises(config_lib.ConfigError, match="--overwrite"):
    preflight.check(config)
  config = config_lib.PredictConfig(png_dir, tiny_model, str(output),
                                    overwrite=True)
  assert preflight.check(config).card.model_id == card_lib.load_card(tiny_model).model_id


def test_ids_never_write_outside_the_output(tmp_path, tiny_model, sample):
  work = tmp_path / "work"
  work.mkdir()
  hostile = ["../../escape.parquet", "/tmp/absolute_escape", "a/../../b",
             "predictions-evil.parquet", "gs://bucket/x"]
  pq.write_table(pa.table({
      "id": hostile,
      "image": [preprocessing.encode_png(x) for x in sample.test.images[:5]],
      "label": ["../" * 3 + "etc"] * 5,
  }), work / "input.parquet")
  before = {str(p) for p in tmp_path.rglob("*")}
  output = work / "out"
  run = run_predict(output, input=str(work / "input.parquet"),
                    model=tiny_model, label_column="label")
  assert run.manifest["counts"]["predictions"] == 5
  created = {str(p) for p in tmp_path.rglob("*")} - before
  assert created and all(p.startswith(str(output)) for p in created)
  assert not os.path.exists("/tmp/absolute_escape")


# The lock ---------------------------------------------------------------------


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def test_a_second_run_is_refused_and_a_dead_runs_lock_taken_over(
    tmp_path, tiny_model, sample):
  images = _one_image_folder(tmp_path, sample)
  output = tmp_path / "out"
  config = config_lib.PredictConfig(images, tiny_model, str(output))
  # A run in progress (this very process holds the lock).
  lock = output_lock.OutputLock(str(output), "20240101T000000-aaaaaa")
  lock.acquire()
  with pytest.raises(output_folder.FolderError, match="in use by run "
                     "20240101T000000-aaaaaa"):
    predict.run(config, list(RUNNER))
  lock.release()
  assert not (output / output_lock.LOCK_FILE).exists()

  # A killed run: its lock names a process that is gone, and it left a
  # staged shard and a staging folder behind.
  killed = "20240102T000000-bbbbbb"
  record = json.loads((output_lock.OutputLock(
      str(output), killed)._record()).decode())  # pylint: disable=protected-access
  record["pid"] = _dead_pid()
  (output / output_lock.LOCK_FILE).write_text(json.dumps(record))
  leftovers = [f"predictions-{killed}-00000-of-00002.parquet",
               f"beam-temp-errors-{killed}-" + "0" * 32]
  (output / leftovers[0]).write_bytes(b"half")
  (output / leftovers[1]).mkdir()
  run = run_predict(output, input=images, model=tiny_model)
  assert len(run.predictions) == 3
  assert set(leftovers) <= set(run.manifest["retired"])
  assert files_below(output) == committed_files(run.manifest)


class _FakeBlob:
  """google.cloud.storage.Blob's generation preconditions, in memory."""

  def __init__(self, bucket, name):
    self._bucket, self.name = bucket, name
    self.generation = None

  def upload_from_string(self, data, content_type=None,
                         if_generation_match=None):
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    current = self._bucket.objects.get(self.name)
    if if_generation_match is not None and (
        (current[1] if current else 0) != if_generation_match):
      raise exceptions.PreconditionFailed("generation mismatch")
    self._bucket.generations += 1
    self.generation = self._bucket.generations
    self._bucket.objects[self.name] = (bytes(data), self.generation)

  def _current(self, if_generation_match):
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    current = self._bucket.objects.get(self.name)
    if current is None:
      raise exceptions.NotFound("gone")
    if if_generation_match is not None and current[1] != if_generation_match:
      raise exceptions.PreconditionFailed("generation mismatch")
    return current

  def download_as_bytes(self, if_generation_match=None):
    return self._current(if_generation_match)[0]

  def delete(self, if_generation_match=None):
    self._current(if_generation_match)
    del self._bucket.objects[self.name]


class _FakeBucket:
  def __init__(self):
    self.objects, self.generations = {}, 0

  def blob(self, name):
    return _FakeBlob(self, name)

  def get_blob(self, name):
    if name not in self.objects:
      return None
    blob = _FakeBlob(self, name)
    blob.generation = self.objects[name][1]
    return blob


class _FakeClient:
  def __init__(self):
    self.buckets = {}

  def bucket(self, name):
    return self.buckets.setdefault(name, _FakeBucket())


def test_gcs_lock_uses_generation_preconditions():
  # The lock and its fake client raise google.api_core's exceptions, which
  # come with the gcp extra.
  pytest.importorskip("google.api_core")
  client = _FakeClient()
  output = "gs://bucket/out/run1"
  first = output_lock.OutputLock(output, "20240101T000000-aaaaaa", client)
  assert first.acquire() == []
  assert list(client.bucket("bucket").objects) == ["out/run1/_run.lock"]
  second = output_lock.OutputLock(output, "20240101T000001-bbbbbb", client)
  with pytest.raises(output_folder.FolderError, match="in use"):
    second.acquire()
  # A lock replaced behind the first run's back is not the first run's to
  # delete: its generation no longer matches.
  objects = client.bucket("bucket").objects
  data, generation = objects["out/run1/_run.lock"]
  objects["out/run1/_run.lock"] = (data, generation + 100)
  first.release()
  assert "out/run1/_run.lock" in objects
  del objects["out/run1/_run.lock"]
  # A dead process's lock is taken over, and its run id inherited.
  stale = json.loads(data)
  stale["pid"] = _dead_pid()
  client.bucket("bucket").blob("out/run1/_run.lock").upload_from_string(
      json.dumps(stale).encode(), if_generation_match=0)
  assert second.acquire() == ["20240101T000000-aaaaaa"]
  assert json.loads(objects["out/run1/_run.lock"][0])["run_id"] == (
      "20240101T000001-bbbbbb")
  second.release()
  assert not objects


# Kills and full disks ---------------------------------------------------------


@pytest.mark.slow
def test_crash_mid_run_leaves_nothing_and_a_rerun_completes(tmp_path, png_dir,
                                                            tiny_model):
  output = tmp_path / "out"
  args = ["--input", png_dir, "--model", tiny_model, "--output", str(output),
          "--batch_size", "16"]
  # Killed as its fourth batch reaches FormatPredictions, mid-run.
  crashed = predict_cli(
      args, kill_at=("beam_jobs.outputs:FormatPredictions.process", 4))
  assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
  staging = [name for name in files_below(output) if "/beam-temp-" in name]
  # No shard, no manifest: nothing half-written. The killed run's lock
  # stays, naming its run for the run that takes it over.
  assert sorted(set(files_below(output)) - set(staging)) == ["_run.lock"]
  # The killed run did write staging files, out of sight.
  assert staging

  again = predict_cli(args)
  assert again.returncode == 0, again.stderr[-2000:]
  rows = read_parquet_rows(str(output / "predictions" / "*.parquet"))
  every_id = [r["id"] for r in rows]
  assert len(every_id) == 200 and len(set(every_id)) == 200
  assert files_below(output) == committed_files(
      outputs.read_manifest(str(output)))


# Where a re-run is killed (SIGKILL, tests/kill_at.py), in the order a run
# reaches them.
KILL_POINTS = [
    ("before the pipeline", "beam_jobs.pipeline:build_pipeline", 1),
    ("mid-write", "beam_jobs.outputs:FormatPredictions.process", 4),
    ("during the commit, between the sinks' renames",
     "apache_beam.io.filesystems:FileSystems.rename", 2),
    ("during the manifest write, before its rename",
     "beam_jobs.outputs:_publish_local", 1),
    ("while deleting the files the new manifest replaced",
     "beam_jobs.output_folder:_delete", 2),
]


def _assert_one_complete_result_set(output, expected_ids: set) -> dict:
  """The manifest is readable and true: the files it lists exist and hold
  the rows it says, every input once, and the query tool agrees."""
  from tools import answers  # pylint: disable=import-outside-toplevel
  from tools import sandbox  # pylint: disable=import-outside-toplevel
  manifest = outputs.read_manifest(str(output))
  predictions = listed_rows(output, "predictions")
  errors = listed_rows(output, "errors")
  ids = [row["id"] for row in predictions + errors]
  assert len(ids) == len(set(ids)) and set(ids) == expected_ids
  assert manifest["totals"] == {"predictions": len(predictions),
                                "errors": len(errors)}
  summary = answers.summary(sandbox.connect(str(output)), str(output))
  assert summary["predictions"] == len(predictions)
  assert summary["manifest"]["run_id"] == manifest["run_id"]
  return manifest


@pytest.mark.slow
def test_a_rerun_killed_anywhere_leaves_one_complete_result_set(
    tmp_path, png_dir, tiny_model, sample):
  pytest.importorskip("duckdb")  # The query tool needs the tools extra.
  output = tmp_path / "out"
  args = ["--input", png_dir, "--model", tiny_model, "--output", str(output),
          "--batch_size", "16"]
  expected = set(png_ids(png_dir, sample))
  first = predict_cli(args)
  assert first.returncode == 0, first.stderr[-2000:]
  committed = _assert_one_complete_result_set(output, expected)
  # Each re-run replaces this model's results, which it must be told to.
  args.append("--overwrite")
  for where, target, calls in KILL_POINTS:
    killed = predict_cli(args, kill_at=(target, calls))
    assert killed.returncode == -signal.SIGKILL, (where, killed.stderr[-2000:])
    manifest = _assert_one_complete_result_set(output, expected)
    if where.startswith("while deleting"):
      # Killed after its manifest was written: its own results stand.
      assert manifest["run_id"] != committed["run_id"], where
    else:
      # Killed before: the earlier results stand, untouched.
      assert manifest == committed, where
  last = predict_cli(args)
  assert last.returncode == 0, last.stderr[-2000:]
  manifest = _assert_one_complete_result_set(output, expected)
  # Nothing else is left: no shard of a killed run, no staging, no lock.
  assert files_below(output) == committed_files(manifest)


@pytest.mark.slow
def test_a_full_disk_at_the_manifest_write_keeps_the_earlier_results(
    tmp_path, tiny_model, sample, capsys, monkeypatch):
  images = _one_image_folder(tmp_path, sample)
  output = tmp_path / "out"
  before = run_predict(output, input=images, model=tiny_model).manifest

  def full_disk(path, data):
    with open(path, "wb") as handle:
      handle.write(data[:len(data) // 2])
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(outputs, "_write_local", full_disk)
  args = ["--input", images, "--model", tiny_model, "--output", str(output),
          "--overwrite"]
  assert predict.main(args + ["--runner", "DirectRunner"]) == 1
  err = capsys.readouterr().err
  assert "No space left on device" in err and "Traceback" not in err
  assert outputs.read_manifest(str(output)) == before
  assert len(listed_rows(output, "predictions")) == 3
  monkeypatch.undo()
  # The failed run kept its lock; its process ends (here: is made to look
  # ended), and the next run takes the lock over and cleans up.
  lock = output / output_lock.LOCK_FILE
  record = json.loads(lock.read_text())
  record["pid"] = _dead_pid()
  lock.write_text(json.dumps(record))
  run = run_predict(output, input=images, model=tiny_model, overwrite=True)
  assert len(run.predictions) == 3
  assert files_below(output) == committed_files(run.manifest)


# Hostile and damaged records (issue 26 items 7 and 8) -----------------------


def _dead_record(run_id: str) -> str:
  record = json.loads(output_lock.OutputLock(  # pylint: disable=protected-access
      "/nowhere", run_id)._record().decode())
  record["pid"] = _dead_pid()
  return json.dumps(record)


@pytest.mark.slow
def test_a_full_disk_before_the_lock_is_written_is_one_line(
    tmp_path, tiny_model, sample, capsys, monkeypatch):
  """Fails on the code before the fix: the lock's temporary file was left
  behind, and the OSError came out as a traceback; the next run then called
  that file foreign."""
  images = _one_image_folder(tmp_path, sample)
  output = tmp_path / "out"
  args = ["--input", images, "--model", tiny_model, "--output", str(output),
          "--runner", "DirectRunner"]

  def full_disk(descriptor):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", full_disk)
  assert predict.main(args) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "No space left on device" in err, err
  assert os.listdir(output) == []
  monkeypatch.undo()
  assert predict.main(args) == 0
  assert files_below(output) == committed_files(
      outputs.read_manifest(str(output)))


@pytest.mark.slow
def test_what_a_run_killed_while_locking_leaves_is_ours(tmp_path, tiny_model,
                                                        sample, capsys):
  """Fails on the code before the fix: the same command refused the folder,
  naming the lock's own leftovers as files this tool did not write. A kill
  inside the take-over of a dead run's lock leaves that lock moved aside
  (`.stale`) and no lock; one while locking leaves the run's record
  (`.tmp`), whole or cut short."""
  images = _one_image_folder(tmp_path, sample)
  output = tmp_path / "out"
  args = ["--input", images, "--model", tiny_model, "--output", str(output),
          "--runner", "DirectRunner"]
  assert predict.main(args) == 0
  first = outputs.read_manifest(str(output))
  leftovers = {
      "_run.lock.20240101T000000-aaaaaa.stale": _dead_record(
          "20240101T000000-bbbbbb"),
      "_run.lock.20240101T000001-cccccc.tmp": _dead_record(
          "20240101T000001-cccccc"),
      "_run.lock.20240101T000002-dddddd.tmp": '{"run_id": "2024',
  }
  for name, text in leftovers.items():
    (output / name).write_text(text)
  capsys.readouterr()
  assert predict.main(args + ["--overwrite"]) == 0, capsys.readouterr().err
  assert files_below(output) == committed_files(
      outputs.read_manifest(str(output)))
  assert outputs.read_manifest(str(output))["run_id"] != first["run_id"]

  # A lock moved aside whose run is alive (the killed run was putting it
  # back) is put back: that run still holds the folder.
  live = json.loads(output_lock.OutputLock(  # pylint: disable=protected-access
      str(output), "20240101T000003-eeeeee")._record().decode())
  moved = output / "_run.lock.20240101T000004-ffffff.stale"
  moved.write_text(json.dumps(live))
  assert predict.main(args + ["--overwrite"]) == 2
  err = capsys.readouterr().err
  assert "in use by run 20240101T000003-eeeeee" in err and err.count(
      "\n") == 1, err
  assert json.loads((output / "_run.lock").read_text()) == live
  assert not moved.exists()


@pytest.mark.parametrize("record", ["_run.json", "_run.lock"])
@pytest.mark.parametrize("kind", ["fifo", "link", "folder"])
def test_a_record_that_is_no_regular_file_is_one_line_never_opened(
    tmp_path, tiny_model, sample, capsys, record, kind):
  """Fails on the code before the fix: a FIFO as _run.json or _run.lock
  hung predict (and tools.query) forever; a link was followed."""
  images = _one_image_folder(tmp_path, sample)
  output = tmp_path / "out"
  output.mkdir()
  target = output / record
  if kind == "fifo":
    os.mkfifo(target)
  elif kind == "link":
    (tmp_path / "elsewhere.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere.json", target)
  else:
    target.mkdir()
  args = ["--input", images, "--model", tiny_model, "--output", str(output),
          "--runner", "DirectRunner"]
  with no_hang(60):
    code = predict.main(args)
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
  # Named for what it is (a timeout would be an OSError too).
  assert record in err and {"fifo": "a FIFO", "link": "symbolic link",
                            "folder": "a folder"}[kind] in err, err
  if record == "_run.json" and importlib.util.find_spec("duckdb"):
    from tools import query  # pylint: disable=import-outside-toplevel
    with no_hang(60):
      assert query.main([str(output)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# Manifests damaged by hand or by another program: each is one line, the
# same for predict (refused unless --overwrite) and for tools.query.
DAMAGED_MANIFESTS = {
    "nested too deep": lambda m: b"[" * 200000 + b"]" * 200000,
    "deep inside a field": lambda m: dict(m, note=json.loads(
        "[" * 500 + "]" * 500)),
    "counts a string": lambda m: dict(m, counts="x"),
    "class names a string": lambda m: dict(m, class_names="abc"),
    "a files entry not an object": lambda m: dict(m, files={
        "predictions": ["a"], "errors": [1]}),
    "rows a string": lambda m: dict(m, files={kind: [
        dict(entry, rows=str(entry["rows"])) for entry in entries]
        for kind, entries in m["files"].items()}),
    "rows a boolean": lambda m: dict(m, files={kind: [
        dict(entry, rows=True) for entry in entries]
        for kind, entries in m["files"].items()}),
    "files a list": lambda m: dict(m, files=[]),
    "run id a list": lambda m: dict(m, run_id=["x"]),
    "retired a string": lambda m: dict(m, retired="predictions"),
    "model a string": lambda m: dict(m, model="m"),
}


@pytest.mark.slow
def test_damaged_manifest_fields_are_one_line_and_overwrite_replaces_them(
    tmp_path, tiny_model, sample, capsys):
  """Fails on the code before the fix: a deep nesting or a field of the
  wrong type gave a traceback (RecursionError, AttributeError, TypeError)
  in predict, even with --overwrite or --skip_existing, or in tools.query."""
  images = _one_image_folder(tmp_path, sample)
  output = tmp_path / "out"
  args = ["--input", images, "--model", tiny_model, "--output", str(output),
          "--runner", "DirectRunner"]
  assert predict.main(args) == 0
  good = outputs.read_manifest(str(output))
  query = None
  if importlib.util.find_spec("duckdb"):
    from tools import query  # pylint: disable=import-outside-toplevel
  for name, damage in DAMAGED_MANIFESTS.items():
    damaged = damage(good)
    (output / outputs.MANIFEST_FILE).write_bytes(
        damaged if isinstance(damaged, bytes) else json.dumps(damaged).encode())
    capsys.readouterr()
    for extra in ([], ["--skip_existing"]):
      assert predict.main(args + extra) == 2, (name, extra)
      err = capsys.readouterr().err
      assert err.count("\n") == 1 and "--overwrite" in err, (name, err)
    if query:
      assert query.main([str(output)]) == 2, name
      assert capsys.readouterr().err.count("\n") == 1, name
  # --overwrite replaces the damaged manifest and the shards it hid.
  assert predict.main(args + ["--overwrite"]) == 0
  assert files_below(output) == committed_files(
      outputs.read_manifest(str(output)))


@pytest.mark.parametrize("record", [b"[" * 100000, b'{"run_id": 3}',
                                    b'{"pid": "x", "claims": "abc"}'])
def test_a_lock_this_tool_did_not_write_is_one_line(tmp_path, tiny_model,
                                                    sample, capsys, record):
  """Fails on the code before the fix: a deeply nested _run.lock gave a
  RecursionError traceback."""
  images = _one_image_folder(tmp_path, sample)
  output = tmp_path / "out"
  output.mkdir()
  (output / output_lock.LOCK_FILE).write_bytes(record)
  assert predict.main(["--input", images, "--model", tiny_model, "--output",
                       str(output), "--runner", "DirectRunner"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "not a lock this tool wrote" in err, err


# The layout: a folder per kind (issue 30) ------------------------------------


@pytest.mark.slow
def test_each_kinds_folder_is_exactly_its_table(tmp_path, tiny_model, sample):
  """Fails on the code before the fix: the shards of both kinds sat side by
  side, and a reader pointed at the folder merged them under the errors'
  columns."""
  images = _one_image_folder(tmp_path, sample)
  (tmp_path / "pile" / "broken.png").write_bytes(b"not an image")
  output = tmp_path / "out"
  run = run_predict(output, input=images, model=tiny_model)
  predictions = pq.read_table(output / "predictions")
  errors = pq.read_table(output / "errors")
  assert predictions.schema.equals(outputs.predictions_schema())
  assert errors.schema.equals(outputs.ERRORS_SCHEMA)
  assert sorted(predictions.column("id").to_pylist()) == sorted(
      row["id"] for row in run.predictions) and predictions.num_rows == 3
  assert errors.column("id").to_pylist() == [str(tmp_path / "pile" /
                                                 "broken.png")]
  assert files_below(output) == committed_files(run.manifest)
  assert all(name.startswith(("predictions/predictions-", "errors/errors-"))
             for name in committed_files(run.manifest)[1:])


def _as_the_layout_before(output) -> dict:
  """Moves a committed folder's shards to its top, as versions before the
  kinds' folders wrote them, with a version 2 manifest."""
  manifest = outputs.read_manifest(str(output))
  for entries in manifest["files"].values():
    for entry in entries:
      name = entry["name"].split("/", 1)[1]
      os.rename(output / entry["name"], output / name)
      entry["name"] = name
  for kind in outputs.KINDS:
    os.rmdir(output / kind)
  manifest["manifest_version"] = 2
  (output / outputs.MANIFEST_FILE).write_text(json.dumps(manifest))
  return manifest


@pytest.mark.slow
def test_a_folder_in_the_layout_before_is_read_and_moved_when_kept(
    tmp_path, tiny_model, sample):
  pytest.importorskip("duckdb")  # tools.query needs the tools extra.
  from tools import answers  # pylint: disable=import-outside-toplevel
  from tools import sandbox  # pylint: disable=import-outside-toplevel
  images = _one_image_folder(tmp_path, sample)
  output = tmp_path / "out"
  run_predict(output, input=images, model=tiny_model)
  before = _as_the_layout_before(output)
  # Read as it is.
  summary = answers.summary(sandbox.connect(str(output)), str(output))
  assert summary["predictions"] == 3 and summary["manifest"] == before
  # --skip_existing keeps its predictions, moved into predictions/.
  for i in (3, 4):
    (tmp_path / "pile" / f"new_{i}.png").write_bytes(
        preprocessing.encode_png(sample.test.images[i]))
  run = run_predict(output, input=images, model=tiny_model,
                    skip_existing=True)
  assert run.manifest["counts"]["skipped"] == 3
  assert pq.read_table(output / "predictions").num_rows == 5
  assert files_below(output) == committed_files(run.manifest)


@pytest.mark.parametrize("what", ["link", "file"])
def test_a_kinds_folder_that_is_no_folder_is_refused_even_with_overwrite(
    tmp_path, tiny_model, sample, capsys, what):
  images = _one_image_folder(tmp_path, sample)
  output = tmp_path / "out"
  output.mkdir()
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  if what == "link":
    os.symlink(elsewhere, output / "predictions")
  else:
    (output / "predictions").write_text("mine")
  code = predict.main(["--input", images, "--model", tiny_model, "--output",
                       str(output), "--runner", "DirectRunner",
                       "--overwrite"])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and "not the folder" in err, err
  assert os.listdir(elsewhere) == []
