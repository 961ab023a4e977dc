"""Answers from the prediction outputs, with SQL over the Parquet files.

Usage:
  python -m tools.query OUTPUT_DIR [summary]         # the default
  python -m tools.query OUTPUT_DIR sql "SELECT label, count(*) FROM predictions GROUP BY 1"
  python -m tools.query OUTPUT_DIR accuracy
  python -m tools.query OUTPUT_DIR low-confidence --below 0.6
  python -m tools.query OUTPUT_DIR misclassified | errors
  python -m tools.query OUTPUT_DIR compare OTHER_OUTPUT_DIR
Every command takes --json for scripts.

DuckDB reads the Parquet shards in place as the views `predictions` and
`errors`; no server, no copy.
"""

import argparse
import dataclasses
import json
import math
import sys
from typing import Callable, Optional

import duckdb

from beam_jobs import outputs
from model import cli
from model import paths

ECE_BINS = 10
DEFAULT_LIMIT = 20
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")


class QueryError(ValueError):
  """A folder, statement or request that cannot be answered."""


def _register_remote(connection, path: str) -> None:
  """gs:// and other remote paths go through fsspec, where it is installed."""
  if not paths.is_remote(path):
    return
  try:
    import fsspec  # pylint: disable=import-outside-toplevel
    connection.register_filesystem(fsspec.filesystem(path.split("://")[0]))
  except Exception as error:  # pylint: disable=broad-except
    raise QueryError(f"cannot read {path}: install gcsfs (pip install "
                     f"gcsfs) for gs:// paths ({error})") from None


def connect(output_dir: str, other_dir: Optional[str] = None):
  """An in-memory DuckDB with views over one (or two) output folders."""
  connection = duckdb.connect()
  for alias, folder in (("", output_dir), ("other_", other_dir)):
    if folder is None:
      continue
    _register_remote(connection, folder)
    for prefix, pattern in (
        (outputs.PREDICTIONS_PREFIX, outputs.predictions_glob(folder)),
        (outputs.ERRORS_PREFIX, outputs.errors_glob(folder))):
      try:
        connection.execute(
            f"CREATE VIEW {alias}{prefix} AS SELECT * FROM "
            f"read_parquet('{pattern.replace(chr(39), chr(39) * 2)}', "
            "union_by_name=true)")
        connection.execute(f"SELECT 1 FROM {alias}{prefix} LIMIT 0")
      except duckdb.Error:
        raise QueryError(f"{folder} holds no {prefix}-*.parquet files: "
                         "expected the --output folder of "
                         "python -m beam_jobs.predict") from None
  return connection


def rows(connection, sql: str, parameters=None) -> list:
  """The result of a query as a list of {column: value} dicts."""
  cursor = connection.execute(sql, parameters or [])
  names = [column[0] for column in cursor.description]
  return [dict(zip(names, row)) for row in cursor.fetchall()]


def scalar(connection, sql: str, parameters=None):
  """The first value of a query's first row."""
  return connection.execute(sql, parameters or []).fetchone()[0]


def run_sql(connection, statement: str) -> list:
  """Runs one read-only statement: a query, EXPLAIN, DESCRIBE or SUMMARIZE."""
  try:
    statements = duckdb.extract_statements(statement)
  except duckdb.Error as error:
    raise QueryError(f"cannot parse SQL: {error}") from None
  if len(statements) != 1:
    raise QueryError(f"expected one SQL statement, got {len(statements)}")
  kind = statements[0].type.name
  if kind not in READ_ONLY_STATEMENTS:
    raise QueryError(f"only read-only queries are allowed (SELECT, WITH, "
                     f"EXPLAIN, DESCRIBE, SUMMARIZE); got a {kind} statement")
  try:
    return rows(connection, statement)
  except duckdb.Error as error:
    raise QueryError(f"SQL error: {error}") from None


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


def errorrows(connection, limit: int = DEFAULT_LIMIT) -> list:
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


def _examples(labels: dict) -> str:
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
          f"the model (most common: {_examples(labels)}); labels must be "
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


def summary(connection, output_dir: str) -> dict:
  manifest = outputs.read_manifest(output_dir)
  class_names = (manifest or {}).get("class_names")
  labels = label_check(connection, class_names)
  labels.pop("condition")
  result = {
      "manifest": manifest,
      "predictions": scalar(connection, "SELECT count(*) FROM predictions"),
      "errors": scalar(connection, "SELECT count(*) FROM errors"),
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
  }


def format_table(rows: list, title: str = "") -> str:
  """A plain fixed-width table for the terminal."""
  lines = [title] if title else []
  if not rows:
    return "\n".join(lines + ["  (none)"])
  columns = list(rows[0])
  cells = [[_cell(row[c]) for c in columns] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells))
            for i, c in enumerate(columns)]
  lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  lines.append("  ".join("-" * w for w in widths))
  lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells)
  return "\n".join(lines)


def _cell(value) -> str:
  if isinstance(value, float):
    return "" if math.isnan(value) else f"{value:.4g}"
  return "" if value is None else str(value)


def render_summary(result: dict) -> str:
  manifest = result["manifest"] or {}
  counts = manifest.get("counts", {})
  parts = [f"model {manifest.get('model_id', '?')}: "
           f"{result['predictions']} predictions, {result['errors']} errors"
           + (f", {counts.get('inputs')} inputs, "
              f"{manifest.get('images_per_second')} images/s"
              if counts else "")]
  if result["accuracy"]:
    score = result["accuracy"]
    parts.append(f"accuracy {score['accuracy']:.4f} ({score['correct']}/"
                 f"{score['labelled']} labelled images)")
  if result["true_labels"]["unmatched"]:
    parts.append(_unmatched_line(result["true_labels"]["unmatched"],
                                 result["true_labels"]))
  parts.append(format_table(result["classes"], "\npredictions per class"))
  parts.append(format_table(result["confidence_histogram"],
                            "\nconfidence histogram"))
  parts.append(format_table(result["error_summary"]["top_reasons"],
                            "\nerrors by stage and reason"))
  parts.append(format_table(result["least_confident"],
                            "\nleast confident images"))
  return "\n".join(parts)


def _unmatched_line(count: int, labels: dict) -> str:
  return (f"{count} true labels match no class of the model and are not "
          f"scored (most common: {_examples(labels)})")


def render_accuracy(result: dict) -> str:
  header = [f"accuracy {result['accuracy']:.4f} ({result['correct']}/"
            f"{result['labelled']}), expected calibration error "
            f"{result['expected_calibration_error']:.4f}"]
  if result["unmatched_labels"]:
    header.append(_unmatched_line(
        result["unmatched_labels"],
        {"unmatched_examples": result["unmatched_examples"]}))
  confusion = [dict({"true \\ predicted": name},
                    **dict(zip(result["classes"], row)))
               for name, row in zip(result["classes"],
                                    result["confusion_matrix"])]
  return "\n".join(header + [
      format_table(result["per_class"], "\nper class"),
      format_table(confusion, "\nconfusion matrix (rows: true class, "
                   "columns: predicted class)"),
  ])


def render_compare(result: dict) -> str:
  head = (f"{result['common_ids']} common ids, {result['disagreements']} "
          f"disagree; {result['only_here']} only here, "
          f"{result['only_other']} only in the other run")
  return "\n".join([head, format_table(result["label_pairs"], "\nlabel pairs"),
                    format_table(result["examples"], "\nexamples")])


_LIMIT = ("--limit", {"type": int, "default": DEFAULT_LIMIT,
                      "help": "rows to show"})


@dataclasses.dataclass(frozen=True)
class Command:
  """A sub-command: its help, its own arguments, what it runs and shows."""
  help: str
  run: Callable  # (connection, parsed arguments) -> result
  arguments: tuple = ()  # (name, argparse keyword arguments) pairs
  render: Callable = format_table
  # (output folder) -> commands worth running next, shown after the tables.
  next: Callable = lambda output_dir: []


def _report_command(output_dir: str) -> str:
  return cli.command("python", "-m", "tools.report", output_dir, "--out",
                     outputs.report_dir_for(output_dir))


COMMANDS = {
    "summary": Command(
        "counts, classes, confidence and errors (the default)",
        lambda connection, args: summary(connection, args.output_dir),
        render=render_summary,
        next=lambda output_dir: [
            cli.command("python", "-m", "tools.query", output_dir,
                        "accuracy"),
            cli.command("python", "-m", "tools.query", output_dir, "errors"),
            _report_command(output_dir)]),
    "sql": Command(
        "one read-only SQL statement over the views predictions and errors",
        lambda connection, args: run_sql(connection, args.statement),
        (("statement", {"help": "e.g. \"SELECT label, count(*) FROM "
                                "predictions GROUP BY 1\""}),)),
    "accuracy": Command(
        "accuracy, per-class precision/recall/F1, confusion matrix and "
        "calibration (needs true labels)",
        lambda connection, args: accuracy(connection,
                                          class_names_of(args.output_dir)),
        render=render_accuracy,
        next=lambda output_dir: [
            cli.command("python", "-m", "tools.query", output_dir,
                        "misclassified"),
            _report_command(output_dir)]),
    "low-confidence": Command(
        "the least confident predictions",
        lambda connection, args: low_confidence(connection, args.below,
                                                args.limit),
        (("--below", {"type": float, "default": 0.6,
                      "help": "show predictions below this confidence"}),
         _LIMIT)),
    "misclassified": Command(
        "the most confident predictions that disagree with the true label",
        lambda connection, args: misclassified(connection, args.limit),
        (_LIMIT,)),
    "errors": Command(
        "inputs that could not be classified, with their stage and reason",
        lambda connection, args: error_rows(connection, args.limit),
        (_LIMIT,)),
    "compare": Command(
        "where two runs disagree on the same ids",
        lambda connection, args: compare(connection, args.limit),
        (("other_dir", {"help": "the --output folder of the other run"}),
         _LIMIT),
        render=render_compare),
}
DEFAULT_COMMAND = "summary"


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="python -m tools.query",
      description="Query the outputs of python -m beam_jobs.predict.")
  parser.add_argument("output_dir", help="the --output folder of a run")
  parser.add_argument("--json", action="store_true",
                      help="print JSON instead of tables")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                   help=f"default: {DEFAULT_COMMAND}")
  for name, command in COMMANDS.items():
    sub = commands.add_parser(name, help=command.help,
                              description=command.help)
    for argument, options in command.arguments:
      sub.add_argument(argument, **options)
    sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                     help="print JSON instead of tables")
  return parser


def answer(args) -> object:
  command = COMMANDS[args.command or DEFAULT_COMMAND]
  connection = connect(args.output_dir, getattr(args, "other_dir", None))
  return command.run(connection, args)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    result = answer(args)
  except QueryError as error:
    print(f"tools.query: error: {error}", file=sys.stderr)
    return 2
  command = COMMANDS[args.command or DEFAULT_COMMAND]
  if args.json:
    print(json.dumps(result, indent=2, default=str))
  else:
    print(command.render(result))
    cli.print_next(None, command.next(args.output_dir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
