"""Hostile inputs, models and output folders, with exact accounting.

Every run here checks inputs == predictions + errors (+ skipped, counted
apart), row for row against what the test put in, and that the shards the
manifest lists hold exactly those rows. Nothing may hang, crash the job or
vanish from the count.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_jobs import config as config_lib
from beam_jobs import preflight
from beam_jobs import output_folder
from beam_jobs import output_lock
from beam_jobs import outputs
from beam_jobs import predict
from model import card as card_lib
from model import datasets
from model import preprocessing
from tools import answers
from tools import query
from tools import sandbox

RUNNER = ["--runner", "DirectRunner"]
# A regression that opened a FIFO would hang the suite; this fails it.
HANG_SECONDS = 240


@contextlib.contextmanager
def _no_hang(seconds: int = HANG_SECONDS):
  def expire(signum, frame):
    raise TimeoutError(f"still running after {seconds}s: something blocked")
  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _listed_rows(output: str, kind: str) -> list:
  """The rows of the shards the manifest lists, and only those."""
  manifest = outputs.read_manifest(output)
  rows = []
  for entry in manifest["files"][kind]:
    table = pq.read_table(os.path.join(output, entry["name"]))
    assert table.num_rows == entry["rows"]
    rows.extend(table.to_pylist())
  return rows


def _run(output, **fields):
  config = config_lib.PredictConfig(output=str(output), **fields)
  with _no_hang():
    manifest = predict.run(config, RUNNER)
  predictions = _listed_rows(str(output), "predictions")
  errors = _listed_rows(str(output), "errors")
  counts = manifest["counts"]
  assert counts["inputs"] == counts["predictions"] + counts["errors"]
  assert len(predictions) == manifest["totals"]["predictions"]
  assert len(errors) == manifest["totals"]["errors"]
  assert manifest["accounted"]
  return manifest, predictions, {e["id"]: e for e in errors}


# Image folders ----------------------------------------------------------------


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
    manifest, predictions, errors = _run(tmp_path / "out", input=str(folder),
                                         model=tiny_model, batch_size=4)
  finally:
    server.close()
  assert set(errors) == set(hostile)
  for id_, fragment in hostile.items():
    assert fragment in errors[id_]["error"], errors[id_]
  assert len(predictions) == 12 + 1
  assert manifest["counts"]["inputs"] == 12 + 1 + len(hostile)
  # The FIFO was never opened for reading: no writer was ever needed.
  assert (bag / "fifo.png").is_fifo()


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
    manifest, predictions, errors = _run(tmp_path / "out", input=str(folder),
                                         model=tiny_model)
  finally:
    os.chmod(folder / "locked", 0o755)
  assert list(errors) == [str(folder / "locked")]
  assert len(predictions) == 4 and manifest["counts"]["inputs"] == 5


def test_a_folder_that_cannot_be_listed_is_matched_not_dropped(tmp_path,
                                                               monkeypatch):
  """As root every folder can be listed, so the refusal is simulated."""
  from imagebatch import paths  # pylint: disable=import-outside-toplevel
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


# Parquet ----------------------------------------------------------------------


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

  manifest, predictions, errors = _run(
      tmp_path / "out", input=str(shards / "*.parquet"), model=tiny_model,
      label_column="label", batch_size=4)
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
  connection = sandbox.connect(str(tmp_path / "out"))
  assert {row["id"]: row["rows"] for row in answers.duplicates(connection)} == {
      "e2": 2, "raw0": 2}

  # Again with --skip_existing: the predicted ids are skipped, every failed
  # row is tried again, and the null ids never count as seen.
  manifest, again, errors = _run(
      tmp_path / "out", input=str(shards / "*.parquet"), model=tiny_model,
      label_column="label", batch_size=4, skip_existing=True)
  counts = manifest["counts"]
  assert counts["skipped"] == len(predicted)
  assert counts["inputs"] + counts["skipped"] == first_inputs
  assert set(errors) == set(expected_errors)
  assert sorted(row["id"] for row in again) == predicted


def test_raw_pixel_rows_are_checked_one_by_one():
  from beam_jobs.sources import parquet  # pylint: disable=import-outside-toplevel
  column = pa.array([[1, 2, 3, 4], [1, None, 3, 4], [1, 2, 3, 999], None,
                     [1, 2], [255, 0, 0, 255]], pa.list_(pa.int32()))
  pixels, good, bad = parquet.raw_pixel_array(column, 4)
  assert list(good) == [0, 5]
  assert list(pixels) == [1, 2, 3, 4, 255, 0, 0, 255]
  assert sorted(bad) == [1, 2, 3, 4]
  fixed = pa.array([[1, 2], [3, 4]], pa.list_(pa.uint8(), 2))
  pixels, good, bad = parquet.raw_pixel_array(fixed, 2)
  assert list(good) == [0, 1] and not bad


# Models -----------------------------------------------------------------------


def _edited_model(tmp_path, tiny_model, edit_config=None, edit_card=None):
  """A copy of the model folder with its Keras config or card edited and
  the model id recomputed, as an attacker who knows the hash would."""
  folder = tmp_path / "edited"
  shutil.copytree(tiny_model, folder)
  keras_path = folder / card_lib.MODEL_FILE
  if edit_config:
    with zipfile.ZipFile(keras_path) as archive:
      members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    edit_config(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(keras_path, "w") as archive:
      for name, data in members.items():
        archive.writestr(name, data)
  card = card_lib.load_card(str(folder))
  if edit_card:
    edit_card(card)
  card.model_id = card_lib.compute_model_id(
      card, keras_path.read_bytes(),
      (folder / card_lib.TFLITE_FILE).read_bytes())
  (folder / card_lib.CARD_FILE).write_text(card.to_json())
  return str(folder)


def _first_layer(config) -> dict:
  return config["config"]["layers"][1]


@pytest.mark.parametrize("spelling", [
    {"class_name": "layers.Lambda"},
    {"class_name": "keras.layers.Lambda"},
    {"class_name": "Lambda", "module": "keras.layers"},
    {"registered_name": "my_package>Lambda"},
    {"class_name": "__lambda__"},
    {"module": "os"},
])
def test_code_carrying_layers_are_refused_however_spelled(
    tmp_path, tiny_model, png_dir, spelling):
  folder = _edited_model(tmp_path, tiny_model,
                         edit_config=lambda c: _first_layer(c).update(spelling))
  config = config_lib.PredictConfig(png_dir, folder, str(tmp_path / "out"))
  with pytest.raises(config_lib.ConfigError, match="refused"):
    preflight.check(config)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda card: card.class_names.pop(), "outputs 10 classes"),
    (lambda card: card.class_names.append("Extra"), "outputs 10 classes"),
    (lambda card: card.input_shape.__setitem__(0, 32), "input of shape"),
])
def test_card_and_model_that_disagree_are_refused(tmp_path, tiny_model,
                                                 png_dir, edit, message):
  folder = _edited_model(tmp_path, tiny_model, edit_card=edit)
  config = config_lib.PredictConfig(png_dir, folder, str(tmp_path / "out"))
  with pytest.raises(config_lib.ConfigError, match=message):
    preflight.check(config)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [
    ("--model", "http://example.com/model"),
    ("--model", "file:///tmp/model"),
    ("--input", "https://example.com/images/"),
    ("--output", "https://example.com/out"),
    ("--output", "s3://bucket/out"),
])
def test_url_paths_are_one_line_exit_2(tmp_path, tiny_model, png_dir, capsys,
                                       flag, value):
  args = {"--input": png_dir, "--model": tiny_model,
          "--output": str(tmp_path / "out")}
  args[flag] = value
  code = predict.main([part for pair in args.items() for part in pair])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and value in err


# Output folders ---------------------------------------------------------------


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
                RUNNER)
  assert {p.name for p in output.iterdir()} == set(theirs) | {
      "beam-temp-predictions-x", "predictions-link.parquet"}
  # --overwrite deletes our kinds only, and a link never beyond itself.
  _run(output, **config, overwrite=True)
  assert victim.read_text() == "keep me"
  assert (output / "notes.txt").read_bytes() == b"mine"
  assert not (output / "predictions-link.parquet").exists()
  assert not (output / "beam-temp-predictions-x").exists()
  # The file it left alone stops no later run (one that keeps the results).
  manifest, predictions, _ = _run(output, **config, skip_existing=True)
  assert manifest["others"] == ["notes.txt"] and len(predictions) == 3


@pytest.mark.slow
def test_damaged_manifest_stops_predict_in_one_line(tmp_path, tiny_model,
                                                   sample, capsys):
  images = _one_image_folder(tmp_path, sample)
  output = tmp_path / "out"
  _run(output, input=images, model=tiny_model)
  args = ["--input", images, "--model", tiny_model, "--output", str(output)]
  for content in (b"", b"{\"run_id\": \"20240101T", b"\x00" * 10, b"[]"):
    (output / outputs.MANIFEST_FILE).write_bytes(content)
    assert predict.main(args) == 2, content
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err, err
    assert query.main([str(output)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
  # --overwrite replaces the damaged manifest and the shards it hid.
  manifest, predictions, _ = _run(output, input=images, model=tiny_model,
                                  overwrite=True)
  assert len(predictions) == 3 and len(manifest["retired"]) == 2
  assert sorted(p.name for p in output.iterdir()) == sorted(
      [outputs.MANIFEST_FILE] + [e["name"] for k in manifest["files"].values()
                                 for e in k])


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
    predict.run(config, RUNNER)
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
  manifest, predictions, _ = _run(output, input=images, model=tiny_model)
  assert len(predictions) == 3
  assert set(leftovers) <= set(manifest["retired"])
  assert sorted(p.name for p in output.iterdir()) == sorted(
      [outputs.MANIFEST_FILE] + [e["name"] for k in manifest["files"].values()
                                 for e in k])


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


# Memory -----------------------------------------------------------------------


def _save(image, fmt, **kwargs) -> bytes:
  import io  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def test_large_images_are_reduced_before_any_conversion():
  from PIL import Image  # pylint: disable=import-outside-toplevel
  side = 4200  # 17.6 MP: above REDUCE_ABOVE_PIXELS
  assert side * side > preprocessing.REDUCE_ABOVE_PIXELS
  ramp = np.linspace(0, 65535, side).astype(np.uint16)
  wide = np.ascontiguousarray(np.broadcast_to(ramp, (side, side)))
  decoded = preprocessing.decode_image(
      _save(Image.fromarray(wide), "PNG"), 28, 28, "grayscale")
  # What the unreduced path gives: 8 bits first, then the resize.
  expected = np.asarray(preprocessing._to_eight_bit(  # pylint: disable=protected-access
      Image.fromarray(wide)).resize((28, 28), Image.Resampling.BILINEAR))
  assert np.abs(decoded[..., 0].astype(int) - expected).max() <= 2
  # EXIF orientation still applies to a reduced JPEG: dark left half, turned
  # a quarter (orientation 6), becomes a dark top half.
  halves = np.zeros((side, side), dtype=np.uint8)
  halves[:, side // 2:] = 255
  exif = Image.Exif()
  exif[0x0112] = 6
  turned = preprocessing.decode_image(
      _save(Image.fromarray(halves), "JPEG", exif=exif), 28, 28, "grayscale")
  assert turned[:10].mean() < 30 and turned[-10:].mean() > 225


@pytest.mark.slow
def test_a_huge_sixteen_bit_png_decodes_in_bounded_memory(tmp_path):
  """The review's 9400x9400 16-bit PNG took 2.4 GB; it must stay near its
  own decoded size (177 MB)."""
  from tests.conftest import REPO  # pylint: disable=import-outside-toplevel
  result = subprocess.run(
      [sys.executable, "-c",
       "from benchmarks import decode_memory as d; import sys; "
       "cases = d.make_cases(sys.argv[1]); "
       "d.measure(cases['16-bit grey PNG'][0], 28, 'grayscale')",
       str(tmp_path)], capture_output=True, text=True, cwd=REPO, check=True)
  assert float(result.stdout.split()[-1]) < 400


# Kills ------------------------------------------------------------------------

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
  manifest = outputs.read_manifest(str(output))
  predictions = _listed_rows(str(output), "predictions")
  errors = _listed_rows(str(output), "errors")
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
  from tests.conftest import png_ids  # pylint: disable=import-outside-toplevel
  from tests.test_reliability import _predict_cli  # pylint: disable=import-outside-toplevel
  output = tmp_path / "out"
  args = ["--input", png_dir, "--model", tiny_model, "--output", str(output),
          "--batch_size", "16"]
  expected = set(png_ids(png_dir, sample))
  first = _predict_cli(args)
  assert first.returncode == 0, first.stderr[-2000:]
  committed = _assert_one_complete_result_set(output, expected)
  # Each re-run replaces this model's results, which it must be told to.
  args.append("--overwrite")
  for where, target, calls in KILL_POINTS:
    killed = _predict_cli(args, kill_at=(target, calls))
    assert killed.returncode == -signal.SIGKILL, (where, killed.stderr[-2000:])
    manifest = _assert_one_complete_result_set(output, expected)
    if where.startswith("while deleting"):
      # Killed after its manifest was written: its own results stand.
      assert manifest["run_id"] != committed["run_id"], where
    else:
      # Killed before: the earlier results stand, untouched.
      assert manifest == committed, where
  last = _predict_cli(args)
  assert last.returncode == 0, last.stderr[-2000:]
  manifest = _assert_one_complete_result_set(output, expected)
  # Nothing else is left: no shard of a killed run, no staging, no lock.
  assert sorted(p.name for p in output.iterdir()) == sorted(
      [outputs.MANIFEST_FILE] + [e["name"] for k in manifest["files"].values()
                                 for e in k])


@pytest.mark.slow
def test_a_full_disk_at_the_manifest_write_keeps_the_earlier_results(
    tmp_path, tiny_model, sample, capsys, monkeypatch):
  images = _one_image_folder(tmp_path, sample)
  output = tmp_path / "out"
  before, _, _ = _run(output, input=images, model=tiny_model)

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
  assert len(_listed_rows(str(output), "predictions")) == 3
  monkeypatch.undo()
  # The failed run kept its lock; its process ends (here: is made to look
  # ended), and the next run takes the lock over and cleans up.
  lock = output / output_lock.LOCK_FILE
  record = json.loads(lock.read_text())
  record["pid"] = _dead_pid()
  lock.write_text(json.dumps(record))
  manifest, predictions, _ = _run(output, input=images, model=tiny_model,
                                  overwrite=True)
  assert len(predictions) == 3
  assert sorted(p.name for p in output.iterdir()) == sorted(
      [outputs.MANIFEST_FILE] + [e["name"] for k in manifest["files"].values()
                                 for e in k])
