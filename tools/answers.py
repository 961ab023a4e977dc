"""The canned answers of tools.query and tools.report: counts, accuracy,
calibration, errors, duplicates and run comparisons, each a function of a
locked `sandbox.ResultViews` returning plain rows and numbers.
"""

from typing import Optional

from tools import embedding_queries
from tools import sandbox
from tools.sandbox import QueryError
from tools.sandbox import rows
from tools.sandbox import scalar

ECE_BINS = 10
DEFAULT_LIMIT = 20
# Rows whose confidence can be binned: a damaged or hostile shard may hold
# NaN, null or values outside [0, 1] (NaN passes BETWEEN on Parquet data).
BINNABLE = "isfinite(confidence) AND confidence BETWEEN 0 AND 1"


def class_counts(connection) -> list:
  return rows(connection, """
      SELECT label, count(*) AS images,
             round(count(*) / sum(count(*)) OVER (), 4) AS share,
             round(avg(confidence), 4) AS mean_confidence
      FROM predictions GROUP BY label ORDER BY images DESC, label""")


def confidence_histogram(connection) -> list:
  return rows(connection, f"""
      SELECT CASE WHEN {BINNABLE} THEN
               least(floor(confidence * {ECE_BINS}), {ECE_BINS - 1}) / {ECE_BINS}
             END AS bin_start,
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


def class_names_in(manifest) -> Optional[list]:
  """The model's class names in index order, as the manifest lists them;
  None when it lists none or something else (a folder's manifest is as
  untrusted as its shards)."""
  names = manifest.get("class_names") if isinstance(manifest, dict) else None
  if isinstance(names, list) and names and all(isinstance(name, str)
                                               for name in names):
    return names
  return None


def class_names_of(output_dir: str) -> Optional[list]:
  """The model's class names in index order, from the run's manifest."""
  return class_names_in(sandbox.read_manifest(output_dir))


# Text from a manifest is shown at most this long.
MAX_FACT_CHARACTERS = 300


def _fact(value) -> Optional[str]:
  """A manifest value as text to show, or None when it is not a plain one."""
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    return None
  return shorten(value)


def run_facts(manifest) -> dict:
  """What the manifest says about its run, each field checked for its type:
  the run id and date, the input, the model's source and id, the engine
  asked for, the counts and the speed. A field that is missing or not of
  its type is None (counts: left out)."""
  manifest = manifest if isinstance(manifest, dict) else {}
  arguments = manifest.get("arguments")
  arguments = arguments if isinstance(arguments, dict) else {}
  counts = manifest.get("counts")
  counts = {str(key): value for key, value in counts.items()
            if isinstance(value, int) and not isinstance(value, bool)
           } if isinstance(counts, dict) else {}
  speed = manifest.get("images_per_second")
  return {
      "run_id": _fact(manifest.get("run_id")),
      "finished_at": _fact(manifest.get("finished_at")),
      "input": _fact(arguments.get("input") or arguments.get("input_list")),
      "model_source": _fact(arguments.get("model")),
      "model_id": _fact(manifest.get("model_id")),
      "engine": _fact(arguments.get("engine")),
      "counts": counts,
      "images_per_second": speed if isinstance(speed, (int, float)) and
                           not isinstance(speed, bool) else None,
  }


def shorten(text, limit: int = MAX_FACT_CHARACTERS) -> str:
  """Text on one line, cut to `limit` characters."""
  text = " ".join(str("" if text is None else text).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def engines(connection) -> list:
  """The engines the predictions name, the commonest first."""
  return [row["engine"] for row in rows(connection, """
      SELECT engine, count(*) AS images FROM predictions GROUP BY 1
      ORDER BY images DESC, engine LIMIT 5""")]


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


# The (true, predicted) pairs `accuracy` returns at most, the commonest first.
MAX_CONFUSION_PAIRS = 100_000


def overall_accuracy(connection, class_names: Optional[list] = None) -> dict:
  """Labelled and correct predictions, and the labels that named no class.

  Only rows whose true label names one of the model's classes count. Raises
  QueryError when no row can be scored, saying why.
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
  scored, parameters = labels["condition"]
  correct = scalar(connection, "SELECT count(*) FROM predictions "
                   f"WHERE {scored} AND true_label = label", parameters)
  return {"labelled": labels["matched"], "correct": correct,
          "accuracy": correct / labels["matched"], "labels": labels}


def accuracy(connection, class_names: Optional[list] = None) -> dict:
  """Accuracy, per-class precision/recall/F1, confusion and calibration.

  Nothing here is sized by the model's class count: `classes` and
  `per_class` hold the classes that occur among the scored rows (as a true
  or a predicted label), in the card's order (`class_names`) or else by
  class index; `confusion_pairs` the (true, predicted) pairs that occur,
  the commonest first, at most MAX_CONFUSION_PAIRS of them
  (`confusion_pairs_total` counts them all). `confusion_matrix()` makes a
  table of the commonest classes from them.
  """
  overall = overall_accuracy(connection, class_names)
  labels = overall.pop("labels")
  scored, parameters = labels.pop("condition")
  counts = rows(connection, f"""
      WITH scored AS (SELECT true_label, label FROM predictions
                      WHERE {scored}),
      truth AS (SELECT true_label AS class, count(*) AS support,
                       count(*) FILTER (WHERE label = true_label) AS correct
                FROM scored GROUP BY 1),
      predicted AS (SELECT label AS class, count(*) AS predicted
                    FROM scored GROUP BY 1),
      positions AS (SELECT label AS class, min(label_index) AS position
                    FROM predictions GROUP BY 1)
      SELECT class, coalesce(support, 0) AS support,
             coalesce(correct, 0) AS correct,
             coalesce(predicted, 0) AS predicted, position
      FROM truth FULL OUTER JOIN predicted USING (class)
      LEFT JOIN positions USING (class)""", parameters)
  if class_names:
    index = {name: i for i, name in enumerate(class_names)}
    order = lambda row: (index.get(row["class"], len(index)), row["class"])  # pylint: disable=unnecessary-lambda-assignment
  else:
    order = lambda row: (row["position"] is None, row["position"] or 0,  # pylint: disable=unnecessary-lambda-assignment
                         row["class"])
  counts.sort(key=order)
  per_class = []
  for row in counts:
    precision = row["correct"] / row["predicted"] if row["predicted"] else 0.0
    recall = row["correct"] / row["support"] if row["support"] else 0.0
    f1 = (2 * precision * recall / (precision + recall)
          if precision + recall else 0.0)
    per_class.append({"class": row["class"], "precision": round(precision, 6),
                      "recall": round(recall, 6), "f1": round(f1, 6),
                      "support": row["support"],
                      "predicted": row["predicted"]})
  pairs = rows(connection, f"""
      SELECT true_label, label, count(*) AS images FROM predictions
      WHERE {scored} GROUP BY ALL ORDER BY images DESC, true_label, label
      LIMIT ?""", parameters + [MAX_CONFUSION_PAIRS])
  pairs_total = (len(pairs) if len(pairs) < MAX_CONFUSION_PAIRS else scalar(
      connection, f"""SELECT count(*) FROM (SELECT DISTINCT true_label, label
      FROM predictions WHERE {scored})""", parameters))
  bins = rows(connection, f"""
      SELECT least(floor(confidence * {ECE_BINS}), {ECE_BINS - 1})::INTEGER
               AS bin,
             count(*) AS images,
             avg(confidence::DOUBLE) AS mean_confidence,
             avg((label = true_label)::INTEGER::DOUBLE) AS accuracy
      FROM predictions WHERE {scored} AND {BINNABLE}
      GROUP BY 1 ORDER BY 1""", parameters)
  # Over the rows with a confidence in [0, 1]: a NaN has no bin.
  binned = sum(b["images"] for b in bins)
  ece = sum(b["images"] / binned * abs(b["accuracy"] - b["mean_confidence"])
            for b in bins)
  return dict(overall, **{
      "unmatched_labels": labels["unmatched"],
      "unmatched_examples": labels["unmatched_examples"],
      "class_count": len(class_names) if class_names else None,
      "classes": [row["class"] for row in per_class],
      "per_class": per_class,
      "confusion_pairs": pairs,
      "confusion_pairs_total": pairs_total,
      "expected_calibration_error": ece,
      "calibration_bins": bins,
  })


def commonest_classes(scores: dict, limit: int) -> list:
  """The `limit` classes with the most scored rows (as the true or the
  predicted label), in the order of `scores["classes"]`."""
  ranked = sorted(scores["per_class"],
                  key=lambda row: (-(row["support"] + row["predicted"]),
                                   -row["support"]))
  kept = {row["class"] for row in ranked[:limit]}
  return [name for name in scores["classes"] if name in kept]


def confusion_matrix(scores: dict, limit: int) -> dict:
  """A confusion table of at most `limit` classes, the commonest, from the
  sparse pairs of `accuracy`.

  Returns {"classes": shown, "matrix": rows (true) by columns (predicted),
  "other_predicted": per shown true class, the rows predicted as a class not
  shown, "left_out": how many classes occur but are not shown}.
  """
  shown = commonest_classes(scores, limit)
  index = {name: i for i, name in enumerate(shown)}
  matrix = [[0] * len(shown) for _ in shown]
  other = [0] * len(shown)
  for pair in scores["confusion_pairs"]:
    row = index.get(pair["true_label"])
    if row is None:
      continue
    column = index.get(pair["label"])
    if column is None:
      other[row] += pair["images"]
    else:
      matrix[row][column] += pair["images"]
  return {"classes": shown, "matrix": matrix, "other_predicted": other,
          "left_out": len(scores["classes"]) - len(shown)}


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


def summary(connection, output_dir: Optional[str] = None) -> dict:
  """Counts, classes, confidence, errors and the run's facts. The manifest is
  the one the views were made from (`connection.manifest`); `output_dir` is
  not read again."""
  del output_dir  # The connection's manifest is the folder's, read once.
  manifest = connection.manifest
  class_names = class_names_in(manifest)
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
      "run": run_facts(manifest),
      "engines": engines(connection),
  }
  result["true_labels"] = labels
  try:
    scores = overall_accuracy(connection, class_names)
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
