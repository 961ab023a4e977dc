"""The canned answers of tools.query and tools.report: counts, accuracy,
calibration, errors, duplicates and run comparisons, each a function of a
locked `sandbox.ResultViews` returning plain rows and numbers.
"""

from typing import Optional

from beam_jobs import outputs
from tools import embedding_queries
from tools.sandbox import QueryError
from tools.sandbox import rows
from tools.sandbox import scalar

ECE_BINS = 10
DEFAULT_LIMIT = 20


def class_counts(connection) -> list:
  return rows(connection, """
      SELECT label, count(*) AS images,
             round(count(*) / sum(count(*)) OVER (), 4) AS share,
             round(avg(confidence), 4) AS mean_confidence
      FROM predictions GROUP BY label ORDER BY images DESC, label""")


def confidence_histogram(connection) -> list:
  return rows(connection, f"""
      SELECT least(floor(confidence * {ECE_BINS}), {ECE_BINS - 1}) / {ECE_BINS}
               AS bin_start,
             count(*) AS images
      FROM predictions GROUP BY 1 ORDER BY 1""")


def error_summary(connection) -> dict:
  by_stage = rows(connection, """
      SELECT stage, count(*) AS errors FROM errors
      GROUP BY stage ORDER BY errors DESC, stage""")
  reasons = rows(connection, """
      SELECT stage, split_part(error, ':', 1) AS reason, count(*) AS errors
      FROM errors GROUP BY ALL ORDER BY errors DESC, stage, reason LIMIT 5""")
  return {"by_stage": by_stage, "top_reasons": reasons}


def low_confidence(connection, below: float = 0.6,
                   limit: int = DEFAULT_LIMIT) -> list:
  return rows(connection, """
      SELECT id, label, round(confidence, 4) AS confidence, true_label
      FROM predictions WHERE confidence < ?
      ORDER BY confidence, id LIMIT ?""", [below, limit])


def misclassified(connection, limit: int = DEFAULT_LIMIT) -> list:
  return rows(connection, """
      SELECT id, label, round(confidence, 4) AS confidence, true_label
      FROM predictions
      WHERE true_label IS NOT NULL AND label <> true_label
      ORDER BY confidence DESC, id LIMIT ?""", [limit])


def error_rows(connection, limit: int = DEFAULT_LIMIT) -> list:
  return rows(connection, "SELECT id, stage, error FROM errors ORDER BY id "
               "LIMIT ?", [limit])


def _columns(connection, view: str = "predictions") -> set:
  return {row["column_name"] for row in rows(connection, f"DESCRIBE {view}")}


def class_names_of(output_dir: str) -> Optional[list]:
  """The model's class names in index order, from the run's manifest."""
  manifest = outputs.read_manifest(output_dir) or {}
  return manifest.get("class_names")


def label_check(connection, class_names: Optional[list] = None) -> dict:
  """How the given true labels matched the model's classes.

  Returns the rows' count with a label that names a class ("matched") and
  with one that matches none ("unmatched", with the most common of them),
  and the SQL condition that selects the matched rows.
  """
  if "source_label" in _columns(connection):
    # predict matched the labels itself: true_label is a class name or null,
    # and source_label keeps each label as it was given.
    scored = "true_label IS NOT NULL"
    unmatched = "source_label IS NOT NULL AND true_label IS NULL"
    given, parameters = "source_label", []
  else:
    # Outputs of an earlier version hold labels as given in true_label; only
    # those naming a known class (or, lacking the card's list, a predicted
    # one) can be scored.
    known = class_names or [r["label"] for r in rows(
        connection, "SELECT DISTINCT label FROM predictions")]
    scored = "list_contains(?::VARCHAR[], true_label)"
    unmatched = ("true_label IS NOT NULL AND NOT list_contains(?::VARCHAR[], "
                 "true_label)")
    given, parameters = "true_label", [known]
  return {
      "matched": scalar(connection, f"SELECT count(*) FROM predictions WHERE "
                        f"{scored}", parameters),
      "unmatched": scalar(connection, "SELECT count(*) FROM predictions "
                          f"WHERE {unmatched}", parameters),
      "unmatched_examples": rows(connection, f"""
          SELECT {given} AS label, count(*) AS images FROM predictions
          WHERE {unmatched} GROUP BY 1 ORDER BY images DESC, label LIMIT 5""",
                                 parameters),
      "condition": (scored, parameters),
  }


def unmatched_text(labels: dict) -> str:
  return ", ".join(f"{r['label']!r} ({r['images']})"
                   for r in labels["unmatched_examples"])


def accuracy(connection, class_names: Optional[list] = None) -> dict:
  """Accuracy, per-class precision/recall/F1, confusion and calibration.

  Only rows whose true label names one of the model's classes count; with
  `class_names` (the card's, in index order) the matrix has every class.
  """
  labels = label_check(connection, class_names)
  if not labels["matched"]:
    if labels["unmatched"]:
      raise QueryError(
          f"none of the {labels['unmatched']} true labels names a class of "
          f"the model (most common: {unmatched_text(labels)}); labels must be "
          "class names or class indices, so there is no score to give")
    raise QueryError("no prediction has a true_label: accuracy needs inputs "
                     "in class folders or a --label_column")
  scored, parameters = labels.pop("condition")
  labelled = labels["matched"]
  correct = scalar(connection, "SELECT count(*) FROM predictions "
                    f"WHERE {scored} AND true_label = label", parameters)
  classes = list(class_names) if class_names else [
      row["name"] for row in rows(connection, f"""
      SELECT name FROM (
        SELECT label AS name, min(label_index) AS position FROM predictions
        GROUP BY label
        UNION ALL
        SELECT true_label, NULL FROM predictions
        WHERE {scored} GROUP BY true_label)
      GROUP BY name ORDER BY min(position) NULLS LAST, name""", parameters)]
  pairs = rows(connection, f"""
      SELECT true_label, label, count(*) AS images FROM predictions
      WHERE {scored} GROUP BY ALL""", parameters)
  index = {name: i for i, name in enumerate(classes)}
  matrix = [[0] * len(classes) for _ in classes]
  for pair in pairs:
    matrix[index[pair["true_label"]]][index[pair["label"]]] = pair["images"]
  per_class = []
  for i, name in enumerate(classes):
    true_positive = matrix[i][i]
    predicted = sum(row[i] for row in matrix)
    support = sum(matrix[i])
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / support if support else 0.0
    f1 = (2 * precision * recall / (precision + recall)
          if precision + recall else 0.0)
    per_class.append({"class": name, "precision": round(precision, 6),
                      "recall": round(recall, 6), "f1": round(f1, 6),
                      "support": support})
  bins = rows(connection, f"""
      SELECT least(floor(confidence * {ECE_BINS}), {ECE_BINS - 1})::INTEGER
               AS bin,
             count(*) AS images,
             avg(confidence::DOUBLE) AS mean_confidence,
             avg((label = true_label)::INTEGER::DOUBLE) AS accuracy
      FROM predictions WHERE {scored} GROUP BY 1 ORDER BY 1""", parameters)
  ece = sum(b["images"] / labelled * abs(b["accuracy"] - b["mean_confidence"])
            for b in bins)
  return {
      "labelled": labelled,
      "correct": correct,
      "accuracy": correct / labelled,
      "unmatched_labels": labels["unmatched"],
      "unmatched_examples": labels["unmatched_examples"],
      "classes": classes,
      "per_class": per_class,
      "confusion_matrix": matrix,
      "expected_calibration_error": ece,
      "calibration_bins": bins,
  }


_ALL_IDS = "(SELECT id FROM predictions UNION ALL SELECT id FROM errors)"


def duplicate_count(connection) -> int:
  """Rows, predictions and errors together, whose id an earlier row had."""
  return scalar(connection,
                f"SELECT count(*) - count(DISTINCT id) FROM {_ALL_IDS}")


def duplicates(connection, limit: int = DEFAULT_LIMIT) -> list:
  return rows(connection, f"""
      SELECT id, count(*) AS rows FROM {_ALL_IDS}
      GROUP BY id HAVING count(*) > 1 ORDER BY rows DESC, id LIMIT ?""",
              [limit])


def summary(connection, output_dir: str) -> dict:
  manifest = outputs.read_manifest(output_dir)
  class_names = (manifest or {}).get("class_names")
  labels = label_check(connection, class_names)
  labels.pop("condition")
  result = {
      "manifest": manifest,
      "predictions": scalar(connection, "SELECT count(*) FROM predictions"),
      "errors": scalar(connection, "SELECT count(*) FROM errors"),
      "duplicate_ids": duplicate_count(connection),
      "classes": class_counts(connection),
      "confidence_histogram": confidence_histogram(connection),
      "error_summary": error_summary(connection),
      "least_confident": low_confidence(connection, below=1.01, limit=5),
  }
  result["true_labels"] = labels
  try:
    scores = accuracy(connection, class_names)
    result["accuracy"] = {k: scores[k] for k in ("labelled", "correct",
                                                 "accuracy")}
  except QueryError:
    result["accuracy"] = None
  return result


def compare(connection, limit: int = DEFAULT_LIMIT) -> dict:
  """Where two runs disagree on the same ids, with counts per label pair."""
  joined = """FROM predictions AS a JOIN other_predictions AS b USING (id)"""
  return {
      "common_ids": scalar(connection, f"SELECT count(*) {joined}"),
      "only_here": scalar(connection, "SELECT count(*) FROM predictions "
                           "WHERE id NOT IN (SELECT id FROM other_predictions)"),
      "only_other": scalar(connection, "SELECT count(*) FROM other_predictions "
                            "WHERE id NOT IN (SELECT id FROM predictions)"),
      "disagreements": scalar(
          connection, f"SELECT count(*) {joined} WHERE a.label <> b.label"),
      "label_pairs": rows(connection, f"""
          SELECT a.label AS label, b.label AS other_label, count(*) AS images
          {joined} WHERE a.label <> b.label
          GROUP BY ALL ORDER BY images DESC, label, other_label LIMIT ?""",
                           [limit]),
      "examples": rows(connection, f"""
          SELECT id, a.label AS label, round(a.confidence, 4) AS confidence,
                 b.label AS other_label,
                 round(b.confidence, 4) AS other_confidence
          {joined} WHERE a.label <> b.label ORDER BY id LIMIT ?""", [limit]),
      # Where both runs wrote embeddings: how alike they are, id by id.
      "embeddings": embedding_queries.mean_cosine(connection),
  }
