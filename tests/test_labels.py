"""True labels: class names, class indices and labels that match no class."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Without the tools extra (the query tool scores the labels) these tests skip.
pytest.importorskip("duckdb")
# pylint: disable=wrong-import-position

from beam_jobs import outputs
from beam_jobs import predict
from beam_jobs.contracts import LabelMatcher
from model import card as card_lib
from tests.helpers import REPO
from tests.helpers import run_predict
from tools import make_shards
from tools import answers
from tools import query
from tools import sandbox

NAMES = ["cat", "dog", "owl"]


def test_label_matcher():
  match = LabelMatcher(NAMES).match
  # A binary label column's bytes are read as UTF-8 text.
  assert [match(v) for v in ("dog", 1, "1", "01", 2.0, np.int64(0).item(),
                             b"owl", b"1")] == [
      "dog", "dog", "dog", "dog", "owl", "cat", "owl", "dog"]
  for value in (None, 3, -1, "3", "Dog", "", 1.5, True, "1.0", b"\xff"):
    assert match(value) is None, value
  # Class names that are digits themselves match by name only, so "1" can
  # never mean two classes.
  digits = LabelMatcher(["1", "2", "3"]).match
  assert [digits(v) for v in ("1", 1, "3", 0, "0")] == ["1", "1", "3", None,
                                                       None]
  names, given, matched, unmatched = LabelMatcher(NAMES).match_all(
      [0, "owl", None, 7, 2.0])
  assert names == ["cat", "owl", None, None, "owl"]
  assert given == ["0", "owl", None, "7", "2"]
  assert (matched, unmatched) == (3, 1)


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory, png_dir, tiny_model):
  """The sample as shards whose label column holds names, class indices as
  integers, indices as digit strings, or names the model does not know."""
  root = tmp_path_factory.mktemp("labels")
  make_shards.make_shards(png_dir, str(root / "names"), rows_per_shard=1000)
  table = pq.read_table(str(root / "names"))
  class_names = card_lib.load_card(tiny_model).class_names
  indices = [class_names.index(n) for n in table.column("label").to_pylist()]
  forms = {
      "indices": pa.array(indices, pa.int64()),
      "digits": pa.array([str(i) for i in indices]),
      "unknown": pa.array([f"class {i}" for i in indices]),
      "half": pa.array([n if i % 2 else "?" for i, n in enumerate(
          table.column("label").to_pylist())]),
  }
  for name, column in forms.items():
    os.makedirs(root / name)
    pq.write_table(table.set_column(2, "label", column),
                   str(root / name / "shard.parquet"))
  return str(root)


def _run_on(shards, form, model, tmp_path):
  """A run over the shards of one label form, scored by name."""
  return run_predict(tmp_path / form,
                     input=os.path.join(shards, form, "*.parquet"),
                     model=model, label_column="label")


@pytest.mark.slow
def test_class_indices_score_like_class_names(labelled_shards, tiny_model,
                                             tmp_path):
  scores = {}
  for form in ("names", "indices", "digits"):
    run = _run_on(labelled_shards, form, tiny_model, tmp_path)
    output, manifest, rows = run.output, run.manifest, run.predictions
    assert manifest["true_labels"] == {"matched": 200, "unmatched": 0}, form
    scores[form] = answers.accuracy(sandbox.connect(output),
                                  answers.class_names_of(output))
    assert {r["true_label"] for r in rows} <= set(manifest["class_names"])
    if form == "indices":
      first = min(rows, key=lambda r: r["id"])
      assert first["source_label"] == str(
          manifest["class_names"].index(first["true_label"]))
  for form in ("indices", "digits"):
    for key in ("accuracy", "labelled", "confusion_pairs", "per_class",
                "classes", "expected_calibration_error"):
      assert scores[form][key] == scores["names"][key], (form, key)
  assert scores["names"]["labelled"] == 200
  assert scores["names"]["unmatched_labels"] == 0
  assert scores["names"]["classes"] == card_lib.load_card(
      tiny_model).class_names


@pytest.mark.slow
def test_labels_matching_no_class_are_counted_and_not_scored(
    labelled_shards, tiny_model, tmp_path):
  run = _run_on(labelled_shards, "unknown", tiny_model, tmp_path)
  output, manifest, rows = run.output, run.manifest, run.predictions
  assert manifest["true_labels"] == {"matched": 0, "unmatched": 200}
  assert "200 true labels match none" in predict.label_warning(manifest)
  assert all(r["true_label"] is None and r["source_label"].startswith("class")
             for r in rows)
  connection = sandbox.connect(output)
  with pytest.raises(sandbox.QueryError, match="none of the 200 true labels"):
    answers.accuracy(connection, answers.class_names_of(output))
  summary = answers.summary(connection, output)
  assert summary["accuracy"] is None
  assert summary["true_labels"]["unmatched"] == 200
  assert "match no class" in query.render_summary(summary)

  # Half the labels match: those are scored, the rest counted beside them.
  run = _run_on(labelled_shards, "half", tiny_model, tmp_path)
  output, manifest = run.output, run.manifest
  assert manifest["true_labels"] == {"matched": 100, "unmatched": 100}
  scores = answers.accuracy(sandbox.connect(output), answers.class_names_of(output))
  assert scores["labelled"] == 100 and scores["unmatched_labels"] == 100
  assert scores["unmatched_examples"] == [{"label": "?", "images": 100}]
  assert "100 true labels match no class" in query.render_accuracy(scores)


def test_outputs_of_an_earlier_version_with_index_labels_are_refused(
    tmp_path):
  """Before labels were matched, index labels were written as they came:
  such an output gets no accuracy 0.0 but a clear refusal."""
  probabilities = np.eye(3, dtype=np.float32)[[0, 1, 2, 1]]
  table = outputs.predictions_table(
      ["a", "b", "c", "d"], ["s"] * 4, ["0", "1", "2", "1"], probabilities,
      NAMES, 2, "m", "tflite", False)
  table = table.drop(["source_label"])
  pq.write_table(table, tmp_path / "predictions-00000-of-00001.parquet")
  pq.write_table(pa.table({"id": pa.array([], pa.string()),
                           "source": pa.array([], pa.string()),
                           "stage": pa.array([], pa.string()),
                           "error": pa.array([], pa.string())}),
                 tmp_path / "errors-00000-of-00001.parquet")
  with pytest.raises(sandbox.QueryError, match="none of the 4 true labels"):
    answers.accuracy(sandbox.connect(str(tmp_path)))


def test_confusion_matrix_text_names_the_classes(labelled_shards, tiny_model,
                                                 tmp_path):
  output = _run_on(labelled_shards, "indices", tiny_model, tmp_path).output
  text = query.render_accuracy(answers.accuracy(
      sandbox.connect(output), answers.class_names_of(output)))
  matrix = text.split("confusion matrix")[1].splitlines()
  header = matrix[1]
  for name in card_lib.load_card(tiny_model).class_names:
    assert name in header
  assert not any(f" {i} " in f" {header} " for i in range(10))


@pytest.mark.slow
def test_query_accuracy_cli_refuses_without_a_matching_label(
    labelled_shards, tiny_model, tmp_path):
  output = _run_on(labelled_shards, "unknown", tiny_model, tmp_path).output
  result = subprocess.run(
      [sys.executable, "-m", "tools.query", output, "accuracy"],
      capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stdout == ""
  assert result.stderr.count("\n") == 1
  assert "none of the 200 true labels names a class" in result.stderr
