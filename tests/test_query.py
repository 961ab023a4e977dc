"""Query answers checked against independent computations."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

# Without the tools extra these tests skip.
pytest.importorskip("duckdb")
# pylint: disable=wrong-import-position

from beam_jobs import outputs
from tools import answers
from tools import query
from tools import sandbox
from tests.helpers import REPO
from tests.helpers import read_parquet_rows
from tests.helpers import run_predict

CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
  """A prediction output with known labels, written in two shards."""
  rng = np.random.default_rng(11)
  rows = 300
  logits = rng.normal(size=(rows, 3)) * 2
  probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  predicted = probabilities.argmax(1)
  truth = np.where(rng.random(rows) < 0.7, predicted, rng.integers(0, 3, rows))
  truth_names = [CLASSES[t] for t in truth]
  truth_names[:20] = [None] * 20  # Unlabelled rows do not count.
  folder = tmp_path_factory.mktemp("crafted")
  ids = [f"img{i:04d}" for i in range(rows)]
  for part, (start, stop) in enumerate(((0, 150), (150, rows))):
    table = outputs.predictions_table(
        ids[start:stop], ["src"] * (stop - start), truth_names[start:stop],
        probabilities[start:stop].astype(np.float32), CLASSES, 2, "m1",
        "keras", False)
    pq.write_table(table, folder / f"predictions-{part:05d}-of-00002.parquet")
  pq.write_table(_errors_table(), folder / "errors-00000-of-00001.parquet")
  return str(folder), probabilities.astype(np.float32), truth_names


def _errors_table():
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  return pa.Table.from_pylist([
      {"id": "bad1", "source": "s", "stage": "decode",
       "error": "UnidentifiedImageError: cannot identify image file"},
      {"id": "bad2", "source": "s", "stage": "decode",
       "error": "UnidentifiedImageError: cannot identify image file"},
      {"id": "bad3", "source": "s", "stage": "read", "error": "OSError: gone"},
  ], schema=outputs.ERRORS_SCHEMA)


def independent_scores(rows: list, classes: list) -> dict:
  """Accuracy, confusion, per-class scores and ECE, with numpy only."""
  rows = [r for r in rows if r["true_label"] is not None]
  truth = np.array([classes.index(r["true_label"]) for r in rows])
  predicted = np.array([classes.index(r["label"]) for r in rows])
  confidence = np.array([r["confidence"] for r in rows], dtype=np.float64)
  matrix = np.zeros((len(classes), len(classes)), dtype=int)
  np.add.at(matrix, (truth, predicted), 1)
  ece = 0.0
  bins = np.minimum((confidence * 10).astype(int), 9)
  for b in range(10):
    inside = bins == b
    if inside.any():
      ece += inside.mean() * abs((predicted[inside] == truth[inside]).mean() -
                                 confidence[inside].mean())
  per_class = []
  for i in range(len(classes)):
    precision = matrix[i, i] / matrix[:, i].sum() if matrix[:, i].sum() else 0
    recall = matrix[i, i] / matrix[i].sum() if matrix[i].sum() else 0
    f1 = (2 * precision * recall / (precision + recall)
          if precision + recall else 0)
    per_class.append((precision, recall, f1, int(matrix[i].sum())))
  return {"labelled": len(rows), "accuracy": (predicted == truth).mean(),
          "matrix": matrix.tolist(), "ece": ece, "per_class": per_class}


def dense_matrix(result: dict, classes: list) -> list:
  """The confusion matrix over `classes` from the sparse pairs."""
  matrix = [[0] * len(classes) for _ in classes]
  for pair in result["confusion_pairs"]:
    matrix[classes.index(pair["true_label"])][classes.index(
        pair["label"])] += pair["images"]
  return matrix


def assert_scores_match(result: dict, expected: dict) -> None:
  assert result["labelled"] == expected["labelled"]
  assert result["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
  assert dense_matrix(result, result["classes"]) == expected["matrix"]
  assert result["confusion_pairs_total"] == len(result["confusion_pairs"])
  assert result["expected_calibration_error"] == pytest.approx(
      expected["ece"], abs=1e-6)
  for row, (precision, recall, f1, support) in zip(result["per_class"],
                                                   expected["per_class"]):
    assert row["precision"] == pytest.approx(precision, abs=1e-6)
    assert row["recall"] == pytest.approx(recall, abs=1e-6)
    assert row["f1"] == pytest.approx(f1, abs=1e-6)
    assert row["support"] == support


def test_accuracy_confusion_and_ece_match_an_independent_computation(crafted):
  folder, _, _ = crafted
  rows = read_parquet_rows(os.path.join(folder, "predictions-*.parquet"))
  result = answers.accuracy(sandbox.connect(folder))
  assert result["classes"] == CLASSES
  assert result["labelled"] == 280
  assert_scores_match(result, independent_scores(rows, CLASSES))


@pytest.mark.slow
def test_accuracy_json_on_a_pipeline_run_matches_pyarrow(tmp_path, png_dir,
                                                         tiny_model, sample):
  run = run_predict(tmp_path / "out", input=png_dir, model=tiny_model)
  output = run.output
  result = subprocess.run(
      [sys.executable, "-m", "tools.query", output, "accuracy", "--json"],
      capture_output=True, text=True, cwd=REPO, check=True)
  scores = json.loads(result.stdout)
  rows = run.predictions
  classes = scores["classes"]
  assert sorted(classes) == sorted(sample.class_names)
  assert_scores_match(scores, independent_scores(rows, classes))
  assert scores["labelled"] == 200


def test_summary_counts(crafted):
  folder, probabilities, _ = crafted
  result = answers.summary(sandbox.connect(folder), folder)
  counts = np.bincount(probabilities.argmax(1), minlength=3)
  assert {r["label"]: r["images"] for r in result["classes"]} == dict(
      zip(CLASSES, counts.tolist()))
  assert result["predictions"] == 300 and result["errors"] == 3
  assert sum(r["images"] for r in result["confidence_histogram"]) == 300
  assert result["error_summary"]["by_stage"] == [
      {"stage": "decode", "errors": 2}, {"stage": "read", "errors": 1}]
  assert result["error_summary"]["top_reasons"][0] == {
      "stage": "decode", "reason": "UnidentifiedImageError", "errors": 2}
  least = result["least_confident"]
  assert least[0]["confidence"] == pytest.approx(
      float(probabilities.max(1).min()), abs=1e-4)


def test_low_confidence_and_misclassified_lists(crafted):
  folder, probabilities, truth_names = crafted
  connection = sandbox.connect(folder)
  below = answers.low_confidence(connection, below=0.5, limit=1000)
  assert len(below) == int((probabilities.max(1) < 0.5).sum())
  wrong = answers.misclassified(connection, limit=1000)
  expected = sum(1 for p, t in zip(probabilities.argmax(1), truth_names)
                 if t is not None and CLASSES[p] != t)
  assert len(wrong) == expected
  assert all(r["label"] != r["true_label"] for r in wrong)


def test_sql_is_read_only(crafted):
  folder, _, _ = crafted
  connection = sandbox.connect(folder)
  assert sandbox.run_sql(connection, "SELECT count(*) AS n FROM predictions") == [
      {"n": 300}]
  assert sandbox.run_sql(connection, "WITH t AS (SELECT 1 AS x) SELECT x FROM t")
  assert sandbox.run_sql(connection, "DESCRIBE predictions")
  assert sandbox.run_sql(connection, "SUMMARIZE errors")
  for statement in (f"COPY predictions TO '{folder}/x.csv'",
                    "CREATE TABLE t AS SELECT 1", "SELECT 1; SELECT 2",
                    "INSTALL httpfs", "ATTACH 'x.db'"):
    with pytest.raises(sandbox.QueryError):
      sandbox.run_sql(connection, statement)
  assert not os.path.exists(os.path.join(folder, "x.csv"))


def test_compare_two_runs(crafted, tmp_path):
  folder, probabilities, truth_names = crafted
  flipped = probabilities[:, [1, 0, 2]]  # Swaps cat and dog.
  table = outputs.predictions_table(
      [f"img{i:04d}" for i in range(300)], ["src"] * 300, truth_names, flipped,
      CLASSES, 2, "m2", "tflite", False)
  pq.write_table(table, tmp_path / "predictions-00000-of-00001.parquet")
  pq.write_table(_errors_table(), tmp_path / "errors-00000-of-00001.parquet")
  result = answers.compare(sandbox.connect(folder, str(tmp_path)))
  changed = int(np.isin(probabilities.argmax(1), [0, 1]).sum())
  assert result["common_ids"] == 300 and result["disagreements"] == changed
  assert {(r["label"], r["other_label"]) for r in result["label_pairs"]} == {
      ("cat", "dog"), ("dog", "cat")}


@pytest.mark.slow
def test_cli_json_and_errors(crafted, tmp_path):
  folder, _, _ = crafted
  run = lambda *args: subprocess.run(  # pylint: disable=unnecessary-lambda-assignment
      [sys.executable, "-m", "tools.query", *args], capture_output=True,
      text=True, cwd=REPO, check=False)
  result = run(folder, "accuracy", "--json")
  assert result.returncode == 0
  assert json.loads(result.stdout)["labelled"] == 280
  assert run(folder, "--json").returncode == 0
  table = run(folder)
  assert "predictions per class" in table.stdout
  missing = run(str(tmp_path / "nothing"))
  assert missing.returncode == 2 and "no predictions" in missing.stderr


def _committed_output(folder, predictions: list, errors: list) -> list:
  """An output folder as a run leaves it: shards and a manifest listing
  them. Returns the prediction shards' paths."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  folder.mkdir(exist_ok=True)
  run = "20240101T000000-0a0b0c"
  files = {"predictions": [], "errors": []}
  written = []
  for kind, tables in (("predictions", predictions), ("errors", errors)):
    for index, table in enumerate(tables):
      name = f"{kind}-{run}-{index:05d}-of-{len(tables):05d}.parquet"
      if isinstance(table, pa.Table):
        pq.write_table(table, folder / name, compression="none")
        rows = table.num_rows
      else:
        rows = 0
      files[kind].append({"name": name, "rows": rows})
      written.append(folder / name)
  outputs.write_manifest(str(folder), {"run_id": run, "model_id": "m",
                                       "files": files})
  return [p for p in written if p.name.startswith("predictions")]


def _prediction_table(ids):
  probabilities = np.full((len(ids), 3), 1 / 3, dtype=np.float32)
  return outputs.predictions_table(ids, ["s"] * len(ids), [None] * len(ids),
                                   probabilities, CLASSES, 2, "m", "keras",
                                   False)


def test_corrupt_shards_are_named_and_the_rest_answered(tmp_path, capsys):
  folder = tmp_path / "out"
  shards = _committed_output(folder, [
      _prediction_table([f"a{i}" for i in range(100)]),
      _prediction_table([f"b{i}" for i in range(100)]),
      _prediction_table([f"c{i}" for i in range(100)]),
      _prediction_table([f"d{i}" for i in range(100)]),
  ], [_errors_table()])
  truncated, empty, damaged, good = shards
  truncated.write_bytes(truncated.read_bytes()[:-100])
  empty.write_bytes(b"")
  # A valid footer over damaged pages: found only when the pages are read.
  data = bytearray(damaged.read_bytes())
  start = pq.read_metadata(damaged).row_group(0).column(0).data_page_offset
  data[start + 40:start + 400] = b"\xff" * 360
  damaged.write_bytes(bytes(data))
  connection = sandbox.connect(str(folder))
  assert sandbox.scalar(connection, "SELECT count(DISTINCT id) FROM predictions"
                      ) == 100
  assert sandbox.scalar(connection, "SELECT min(id) FROM predictions") == "d0"
  warnings = capsys.readouterr().err
  for path in (truncated, empty, damaged):
    assert f"skipped {path}" in warnings
  assert str(good) not in warnings


def test_a_folder_of_errors_alone_can_be_queried(tmp_path, capsys):
  folder = tmp_path / "out"
  _committed_output(folder, [], [_errors_table()])
  connection = sandbox.connect(str(folder))
  result = answers.summary(connection, str(folder))
  assert result["predictions"] == 0 and result["errors"] == 3
  assert len(answers.error_rows(connection)) == 3
  assert query.main([str(folder), "errors"]) == 0
  assert "bad1" in capsys.readouterr().out


def test_duplicate_ids_are_reported(tmp_path):
  folder = tmp_path / "out"
  _committed_output(folder, [_prediction_table(["x", "y", "x"]),
                             _prediction_table(["x", "bad1"])],
                    [_errors_table()])
  connection = sandbox.connect(str(folder))
  # x three times, bad1 as a prediction and an error: 2 + 1 repeats.
  assert answers.summary(connection, str(folder))["duplicate_ids"] == 3
  assert answers.duplicates(connection) == [{"id": "x", "rows": 3},
                                          {"id": "bad1", "rows": 2}]


@pytest.mark.parametrize("manifest", [b"", b"{\"run_id\": ", b"[1, 2]",
                                      b"\xff\xfe"])
def test_a_damaged_manifest_is_one_line(tmp_path, capsys, manifest):
  folder = tmp_path / "out"
  _committed_output(folder, [_prediction_table(["a"])], [])
  (folder / outputs.MANIFEST_FILE).write_bytes(manifest)
  assert query.main([str(folder)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "_run.json" in err and "--overwrite" in err


def _many_classes_output(folder, classes: int, labelled: int) -> list:
  """A committed run of a model with `classes` classes, `labelled` of whose
  predictions have a true label. Returns the class names."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  names = [f"class {i:06d}" for i in range(classes)]
  rng = np.random.default_rng(5)
  picked = rng.choice(classes, size=labelled * 2, replace=False)
  probabilities = np.zeros((labelled, classes), dtype=np.float32)
  probabilities[np.arange(labelled), picked[:labelled]] = 1.0
  truth = [names[i] for i in picked[:labelled // 2]] + [
      names[i] for i in picked[labelled:labelled + labelled - labelled // 2]]
  table = outputs.predictions_table(
      [f"img{i}" for i in range(labelled)], ["s"] * labelled, truth,
      probabilities, names, 2, "m", "tflite", False)
  folder.mkdir()
  run = "20240101T000000-0a0b0c"
  shard = f"predictions-{run}-00000-of-00001.parquet"
  pq.write_table(table, folder / shard)
  errors = f"errors-{run}-00000-of-00001.parquet"
  pq.write_table(pa.Table.from_pylist([], schema=outputs.ERRORS_SCHEMA),
                 folder / errors)
  outputs.write_manifest(str(folder), {
      "run_id": run, "model_id": "m", "class_names": names,
      "files": {"predictions": [{"name": shard, "rows": labelled}],
                "errors": [{"name": errors, "rows": 0}]}})
  return names


@pytest.mark.parametrize("classes", [3_000, 100_000])
def test_nothing_is_sized_by_the_class_count(tmp_path, capsys, classes):
  """A model of many classes with 20 labelled rows: accuracy, the summary
  and their text hold the classes that occur, in memory of their size.
  Fails on the code before the fix, which built a classes x classes matrix
  (3,000 classes: 9 million cells; 100,000 were killed past 3 GB)."""
  import tracemalloc  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "out"
  names = _many_classes_output(folder, classes, labelled=20)
  connection = sandbox.connect(str(folder))
  tracemalloc.start()
  try:
    scores = answers.accuracy(connection, names)
    text = query.render_accuracy(scores)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # Only the card's order (a dict of the names) grows with the class count.
  assert peak < 8 * 1024**2 + classes * 200, peak
  text += query.render_summary(answers.summary(connection, str(folder)))
  assert scores["labelled"] == 20 and scores["class_count"] == classes
  assert len(scores["classes"]) <= 40 and len(scores["per_class"]) <= 40
  assert sum(pair["images"] for pair in scores["confusion_pairs"]) == 20
  assert scores["classes"] == sorted(scores["classes"])  # The card's order.
  assert len(text.splitlines()) < 150
  assert query.main([str(folder), "accuracy"]) == 0
  assert "confusion matrix of the 12 commonest of" in capsys.readouterr().out


def test_per_class_scores_cover_the_classes_that_occur(crafted):
  """Precision, recall and F1 for each class that occurs as a true or a
  predicted label, and a confusion table of the commonest from the pairs."""
  folder, _, _ = crafted
  scores = answers.accuracy(sandbox.connect(folder), CLASSES)
  table = answers.confusion_matrix(scores, 2)
  assert len(table["classes"]) == 2 and table["left_out"] == 1
  full = answers.confusion_matrix(scores, 10)
  for row, name in enumerate(table["classes"]):
    source = full["classes"].index(name)
    kept = [full["classes"].index(other) for other in table["classes"]]
    assert table["matrix"][row] == [full["matrix"][source][k] for k in kept]
    assert table["other_predicted"][row] == sum(full["matrix"][source]) - sum(
        table["matrix"][row])


@pytest.mark.parametrize("kind", ["fifo", "link", "nested", "wrong_types"])
def test_a_hostile_manifest_is_one_line_never_a_hang(tmp_path, capsys, kind):
  """Fails on the code before the fix: a FIFO as _run.json blocked the query
  forever, a deeply nested one raised RecursionError."""
  from tests.helpers import no_hang  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "out"
  _committed_output(folder, [_prediction_table(["a"])], [])
  manifest = folder / outputs.MANIFEST_FILE
  manifest.unlink()
  if kind == "fifo":
    os.mkfifo(manifest)
  elif kind == "link":
    (tmp_path / "elsewhere.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere.json", manifest)
  elif kind == "nested":
    manifest.write_text("[" * 100000 + "]" * 100000)
  else:
    manifest.write_text(json.dumps({"run_id": 5, "files": {
        "predictions": [{"name": 5}, "x"], "errors": "y"}, "counts": "x",
                                    "class_names": "abc"}))
  start = time.monotonic()
  with no_hang(60):
    code = query.main([str(folder)])
  assert time.monotonic() - start < 30, "blocked on the manifest"
  err = capsys.readouterr().err
  assert code in (0, 2) and "Traceback" not in err
  if kind != "wrong_types":
    assert code == 2 and err.count("\n") == 1 and "_run.json" in err, err
