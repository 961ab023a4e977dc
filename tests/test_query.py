"""Query answers checked against independent computations."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from beam_jobs import config as config_lib
from beam_jobs import outputs
from beam_jobs import predict
from tools import query
from tests.conftest import REPO
from tests.conftest import read_parquet_rows

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


def assert_scores_match(result: dict, expected: dict) -> None:
  assert result["labelled"] == expected["labelled"]
  assert result["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
  assert result["confusion_matrix"] == expected["matrix"]
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
  result = query.accuracy(query.connect(folder))
  assert result["classes"] == CLASSES
  assert result["labelled"] == 280
  assert_scores_match(result, independent_scores(rows, CLASSES))


@pytest.mark.slow
def test_accuracy_json_on_a_pipeline_run_matches_pyarrow(tmp_path, png_dir,
                                                         tiny_model, sample):
  output = str(tmp_path / "out")
  predict.run(config_lib.PredictConfig(png_dir, tiny_model, output),
              ["--runner", "DirectRunner"])
  result = subprocess.run(
      [sys.executable, "-m", "tools.query", output, "accuracy", "--json"],
      capture_output=True, text=True, cwd=REPO, check=True)
  scores = json.loads(result.stdout)
  rows = read_parquet_rows(os.path.join(output, "predictions-*.parquet"))
  classes = scores["classes"]
  assert sorted(classes) == sorted(sample.class_names)
  assert_scores_match(scores, independent_scores(rows, classes))
  assert scores["labelled"] == 200


def test_summary_counts(crafted):
  folder, probabilities, _ = crafted
  result = query.summary(query.connect(folder), folder)
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
  connection = query.connect(folder)
  below = query.low_confidence(connection, below=0.5, limit=1000)
  assert len(below) == int((probabilities.max(1) < 0.5).sum())
  wrong = query.misclassified(connection, limit=1000)
  expected = sum(1 for p, t in zip(probabilities.argmax(1), truth_names)
                 if t is not None and CLASSES[p] != t)
  assert len(wrong) == expected
  assert all(r["label"] != r["true_label"] for r in wrong)


def test_sql_is_read_only(crafted):
  folder, _, _ = crafted
  connection = query.connect(folder)
  assert query.run_sql(connection, "SELECT count(*) AS n FROM predictions") == [
      {"n": 300}]
  assert query.run_sql(connection, "WITH t AS (SELECT 1 AS x) SELECT x FROM t")
  assert query.run_sql(connection, "DESCRIBE predictions")
  assert query.run_sql(connection, "SUMMARIZE errors")
  for statement in (f"COPY predictions TO '{folder}/x.csv'",
                    "CREATE TABLE t AS SELECT 1", "SELECT 1; SELECT 2",
                    "INSTALL httpfs", "ATTACH 'x.db'"):
    with pytest.raises(query.QueryError):
      query.run_sql(connection, statement)
  assert not os.path.exists(os.path.join(folder, "x.csv"))


def test_compare_two_runs(crafted, tmp_path):
  folder, probabilities, truth_names = crafted
  flipped = probabilities[:, [1, 0, 2]]  # Swaps cat and dog.
  table = outputs.predictions_table(
      [f"img{i:04d}" for i in range(300)], ["src"] * 300, truth_names, flipped,
      CLASSES, 2, "m2", "tflite", False)
  pq.write_table(table, tmp_path / "predictions-00000-of-00001.parquet")
  pq.write_table(_errors_table(), tmp_path / "errors-00000-of-00001.parquet")
  result = query.compare(query.connect(folder, str(tmp_path)))
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
