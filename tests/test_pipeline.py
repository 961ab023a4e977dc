"""The whole graph end to end: sources, inference, sinks and the manifest,
on images and shards, one process or several."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from beam_jobs import config as config_lib
from imagebatch import paths
from model import card as card_lib
from model import datasets
from model import preprocessing
from tools import make_shards
from tests.helpers import REPO
from tests.helpers import expected_labels
from tests.helpers import png_ids
from tests.helpers import run_predict


@pytest.mark.parametrize("engine", ["keras", "tflite"])
def test_predict_image_folder(tmp_path, png_dir, tiny_model, sample, engine):
  run = run_predict(tmp_path / engine, input=png_dir, model=tiny_model,
                    engine=engine, batch_size=64)
  manifest, rows, errors = run.manifest, run.predictions, run.errors
  card = card_lib.load_card(tiny_model)
  ids = png_ids(png_dir, sample)
  expected = dict(zip(ids, expected_labels(tiny_model, sample, engine)))
  assert {r["id"]: r["label"] for r in rows} == expected
  assert errors == []
  row = rows[0]
  assert row["model_id"] == card.model_id and row["engine"] == engine
  assert row["source"] == row["id"]
  assert row["label"] == card.class_names[row["label_index"]]
  assert len(row["top_k"]) == 3 and row["top_k"][0]["label"] == row["label"]
  assert row["top_k"][0]["confidence"] == pytest.approx(row["confidence"])
  assert all(r["true_label"] == sample.class_names[l]
             for r, l in zip(sorted(rows, key=lambda r: r["id"]),
                             [sample.test.labels[ids.index(i)]
                              for i in sorted(r["id"] for r in rows)]))
  assert manifest["counts"] == {"inputs": 200, "predictions": 200,
                                "errors": 0, "skipped": 0, "model_loads": 1}
  assert manifest["accounted"] and manifest["model_id"] == card.model_id
  # Accuracy over the folder is the accuracy training reported.
  accuracy = np.mean([r["label"] == r["true_label"] for r in rows])
  assert accuracy == pytest.approx(card.metrics["test_accuracy"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["encoded", "raw"])
def test_predict_parquet_matches_image_folder(tmp_path, sample_shards,
                                              png_dir, tiny_model, form):
  by_id = run_predict(tmp_path / "folder", input=png_dir,
                      model=tiny_model).predictions_by_id
  run = run_predict(
      tmp_path / form, input=os.path.join(sample_shards, form, "*.parquet"),
      model=tiny_model, label_column="label", write_probabilities=True)
  assert run.errors == [] and run.manifest["counts"]["predictions"] == 200
  for row in run.predictions:
    assert row["label"] == by_id[row["id"]]["label"]
    assert row["true_label"] == by_id[row["id"]]["true_label"]
    assert row["confidence"] == pytest.approx(by_id[row["id"]]["confidence"],
                                              abs=1e-6)
    assert len(row["probabilities"]) == 10
    assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert max(row["probabilities"]) == pytest.approx(row["confidence"])


def test_bad_files_become_error_rows_and_batch_mates_survive(
    tmp_path, png_dir, tiny_model, sample):
  folder = tmp_path / "mixed"
  good = datasets.Split(sample.test.images[:10], sample.test.labels[:10])
  datasets.write_png_folder(good, sample.class_names, str(folder))
  bad = {
      folder / "Bag" / "empty.png": b"",
      folder / "Bag" / "text.jpg": b"this is not a jpeg",
      folder / "Bag" / ".DS_Store": b"\x00\x00\x00\x01Bud1\x00\x00",
      folder / "Coat" / "truncated.png":
          preprocessing.encode_png(sample.test.images[0])[:60],
  }
  for path, data in bad.items():
    path.write_bytes(data)
  run = run_predict(tmp_path / "out", input=str(folder), model=tiny_model)
  errors = run.errors
  assert len(run.predictions) == 10
  assert sorted(e["id"] for e in errors) == sorted(str(p) for p in bad)
  assert {e["stage"] for e in errors} == {"decode"}
  assert all(e["error"] for e in errors)
  assert run.manifest["counts"]["inputs"] == 14


@pytest.mark.slow
def test_predict_cli_missing_model_is_one_line(tmp_path, png_dir):
  result = subprocess.run(
      [sys.executable, "-m", "beam_jobs.predict", "--input", png_dir,
       "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0, result.stderr
  assert "is not a model folder" in result.stderr


@pytest.mark.slow
def test_multi_processing_gives_identical_outputs(tmp_path, png_dir,
                                                  tiny_model):
  one = run_predict(tmp_path / "one", input=png_dir, model=tiny_model,
                    batch_size=32)
  two = run_predict(tmp_path / "two", input=png_dir, model=tiny_model,
                    batch_size=32, beam_args=[
                        "--runner", "DirectRunner", "--direct_num_workers",
                        "2", "--direct_running_mode", "multi_processing"])
  assert one.predictions_by_id == two.predictions_by_id
  # Exactly one model load per worker process.
  assert two.manifest["counts"]["model_loads"] == 2
  assert two.manifest["counts"]["inputs"] == 200


def test_ids_match_between_relative_folder_and_shards(tmp_path, png_dir,
                                                      monkeypatch):
  monkeypatch.chdir(os.path.dirname(png_dir))
  relative = os.path.basename(png_dir)
  make_shards.make_shards(relative, str(tmp_path / "shards"), 1000)
  ids = pq.read_table(str(tmp_path / "shards")).column("id").to_pylist()
  assert all(os.path.isabs(i) and os.path.exists(i) for i in ids)
  config = config_lib.PredictConfig(relative, "unused", "out")
  assert paths.absolute(config.input) == png_dir
  assert sorted(ids) == sorted(
      paths.match_paths(paths.expand_pattern(png_dir)))


def _worker_processes(launcher: int) -> set:
  """The SDK worker processes below `launcher` (and the shells that
  started them), from /proc."""
  parents, commands = {}, {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat", "rb") as handle:
        parents[int(entry)] = int(handle.read().rsplit(b")", 1)[1].split()[1])
      with open(f"/proc/{entry}/cmdline", "rb") as handle:
        commands[int(entry)] = handle.read()
    except (OSError, IndexError):
      continue
  below, grew = {launcher}, True
  while grew:
    grew = False
    for pid, parent in parents.items():
      if parent in below and pid not in below:
        below.add(pid)
        grew = True
  return {pid for pid in below if b"sdk_worker_main" in commands.get(pid, b"")}


def _running(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat", "rb") as handle:
      return handle.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
  except (OSError, IndexError):
    return False


@pytest.mark.slow
def test_worker_processes_end_with_a_killed_launcher(tmp_path, png_dir,
                                                    tiny_model):
  """Fails on the code before the fix: after kill -9 of the launcher of a
  multi-process run whose output nobody was reading yet, its SDK worker
  processes lived on (about two minutes)."""
  if not os.path.isdir("/proc"):
    pytest.skip("the watchdog finds the workers through /proc (Linux)")
  output = tmp_path / "out"
  launcher = subprocess.Popen(
      [sys.executable, "-m", "beam_jobs.predict", "--input", png_dir,
       "--model", tiny_model, "--output", str(output), "--batch_size", "1",
       "--direct_num_workers", "2", "--direct_running_mode",
       "multi_processing", "--progress_seconds", "0"],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  workers = set()
  try:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and launcher.poll() is None:
      workers = _worker_processes(launcher.pid)
      if len(workers) >= 4:  # two shells, two workers
        break
      time.sleep(0.2)
    assert launcher.poll() is None and len(workers) >= 4, workers
    os.kill(launcher.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(map(_running, workers)):
      time.sleep(0.2)
    assert not [pid for pid in workers if _running(pid)]
  finally:
    for pid in workers:
      if _running(pid):
        os.kill(pid, signal.SIGKILL)
    launcher.kill()
    launcher.wait()


@pytest.mark.slow
def test_make_shards_output_is_scored_without_a_label_flag(tmp_path,
                                                          sample_shards,
                                                          tiny_model, capsys):
  """Fails on the code before the fix: make_shards writes `label`, and
  predict ignored it unless --label_column label was passed."""
  from beam_jobs import outputs  # pylint: disable=import-outside-toplevel
  from beam_jobs import predict  # pylint: disable=import-outside-toplevel
  shards = os.path.join(sample_shards, "encoded", "*.parquet")
  args = ["--input", shards, "--model", tiny_model, "--runner",
          "DirectRunner"]
  assert predict.main(args + ["--output", str(tmp_path / "one")]) == 0
  out = capsys.readouterr().out
  assert ("true labels (from the 'label' column, as --label_column was not "
          "given; --label_column '' reads none): 200 match a class") in out
  manifest = outputs.read_manifest(str(tmp_path / "one"))
  assert manifest["true_labels"] == {"matched": 200, "unmatched": 0}
  # --label_column '' reads none.
  assert predict.main(args + ["--output", str(tmp_path / "two"),
                              "--label_column", ""]) == 0
  assert "true labels" not in capsys.readouterr().out
  manifest = outputs.read_manifest(str(tmp_path / "two"))
  assert manifest["true_labels"] == {"matched": 0, "unmatched": 0}
