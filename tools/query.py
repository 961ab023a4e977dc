"""Answers from the prediction outputs, with SQL over the Parquet files.

Usage:
  python -m tools.query OUTPUT_DIR [summary]         # the default
  python -m tools.query OUTPUT_DIR sql "SELECT label, count(*) FROM predictions GROUP BY 1"
  python -m tools.query OUTPUT_DIR accuracy
  python -m tools.query OUTPUT_DIR low-confidence --below 0.6
  python -m tools.query OUTPUT_DIR misclassified | errors | duplicates
  python -m tools.query OUTPUT_DIR compare OTHER_OUTPUT_DIR
  python -m tools.query OUTPUT_DIR neighbours ID --k 10      # --write_embeddings runs
  python -m tools.query OUTPUT_DIR near-duplicates --min_similarity 0.97
Every command takes --json for scripts.

The views `predictions` and `errors` cover exactly the shards the folder's
manifest lists, read in place by pyarrow (no server, no copy); a damaged
shard is named in a warning and left out. SQL runs on a DuckDB connection
that can reach nothing but those views (see ResultViews).
"""

import argparse
import dataclasses
import json
import math
import sys
from typing import Callable

from beam_jobs import outputs
from imagebatch import cli
from tools import answers
from tools import embedding_queries
from tools import limits
from tools import sandbox
from tools.answers import DEFAULT_LIMIT
from tools.sandbox import QueryError


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


# Rows of a class table shown in the terminal at most; --json has them all.
MAX_TABLE_CLASSES = 30
# Classes of the confusion table in the terminal at most, the commonest.
MAX_CONFUSION_CLASSES = 12


def _bounded(rows: list, limit: int, title: str, what: str) -> str:
  """A table of the first `limit` rows, saying how many more --json has."""
  text = format_table(rows[:limit], title)
  if len(rows) > limit:
    text += f"\n  ... and {len(rows) - limit} more {what} (--json lists all)"
  return text


def render_summary(result: dict) -> str:
  run = result.get("run") or answers.run_facts(result["manifest"])
  counts = run["counts"]
  parts = [f"model {run['model_id'] or '?'}: "
           f"{result['predictions']} predictions, {result['errors']} errors"
           + (f", {counts.get('inputs', '?')} inputs, "
              f"{run['images_per_second']} images/s"
              if counts else "")]
  if result["duplicate_ids"]:
    parts.append(f"{result['duplicate_ids']} rows repeat an id an earlier row "
                 "had (the `duplicates` command lists them)")
  if result["accuracy"]:
    score = result["accuracy"]
    parts.append(f"accuracy {score['accuracy']:.4f} ({score['correct']}/"
                 f"{score['labelled']} labelled images)")
  if result["true_labels"]["unmatched"]:
    parts.append(_unmatched_line(result["true_labels"]["unmatched"],
                                 result["true_labels"]))
  parts.append(_bounded(result["classes"], MAX_TABLE_CLASSES,
                        "\npredictions per class (the commonest first)",
                        "classes"))
  parts.append(format_table(result["confidence_histogram"],
                            "\nconfidence histogram"))
  parts.append(format_table(result["error_summary"]["top_reasons"],
                            "\nerrors by stage and reason"))
  parts.append(format_table(result["least_confident"],
                            "\nleast confident images"))
  return "\n".join(parts)


def _unmatched_line(count: int, labels: dict) -> str:
  return (f"{count} true labels match no class of the model and are not "
          f"scored (most common: {answers.unmatched_text(labels)})")


def render_accuracy(result: dict) -> str:
  header = [f"accuracy {result['accuracy']:.4f} ({result['correct']}/"
            f"{result['labelled']}), expected calibration error "
            f"{result['expected_calibration_error']:.4f}"]
  if result["unmatched_labels"]:
    header.append(_unmatched_line(
        result["unmatched_labels"],
        {"unmatched_examples": result["unmatched_examples"]}))
  table = answers.confusion_matrix(result, MAX_CONFUSION_CLASSES)
  other = "(other)"
  confusion = [dict({"true \\ predicted": name},
                    **dict(zip(table["classes"], row)),
                    **({other: rest} if table["left_out"] else {}))
               for name, row, rest in zip(table["classes"], table["matrix"],
                                          table["other_predicted"])]
  title = "\nconfusion matrix (rows: true class, columns: predicted class)"
  if table["left_out"]:
    title = (f"\nconfusion matrix of the {len(table['classes'])} commonest of "
             f"{len(result['classes'])} classes (rows: true class, columns: "
             f"predicted class; {other}: any other class)")
  per_class = result["per_class"]
  per_class_title = "\nper class"
  if len(per_class) > MAX_TABLE_CLASSES:
    per_class = sorted(per_class, key=lambda row: -row["support"])
    per_class_title = "\nper class (the most supported first)"
  return "\n".join(header + [
      _bounded(per_class, MAX_TABLE_CLASSES, per_class_title, "classes"),
      format_table(confusion, title),
  ])


def render_compare(result: dict) -> str:
  head = (f"{result['common_ids']} common ids, {result['disagreements']} "
          f"disagree; {result['only_here']} only here, "
          f"{result['only_other']} only in the other run")
  cosine = result.get("embeddings")
  if cosine and cosine["ids"]:
    head += (f"\nembeddings of the same ids: mean cosine "
             f"{cosine['mean_cosine']:.4f} (lowest {cosine['min_cosine']:.4f}, "
             f"{cosine['ids']} ids)")
  return "\n".join([head, format_table(result["label_pairs"], "\nlabel pairs"),
                    format_table(result["examples"], "\nexamples")])


_LIMIT = ("--limit", {"type": limits.positive_count,
                      "default": DEFAULT_LIMIT, "help": "rows to show"})


def render_neighbours(result: dict) -> str:
  head = (f"{len(result['neighbours'])} nearest of {result['rows']} rows to "
          f"{result['id']!r} by cosine similarity of their embeddings")
  if result["repeated_id"]:
    head += " (the id has several rows; the first one's embedding is used)"
  return format_table(result["neighbours"], head)


def render_near_duplicates(result: dict) -> str:
  head = (f"{result['pairs']} pairs of {result['rows']} rows at cosine "
          f"similarity >= {result['min_similarity']:g}"
          + (f" ({result['zero_rows']} all-zero embeddings left out)"
             if result["zero_rows"] else "")
          + f"; {result['method']}; {result['seconds']:.1f}s")
  shown = (f"the {len(result['shown'])} most similar"
           if len(result["shown"]) < result["pairs"] else "every pair")
  return format_table(result["shown"], f"{head}\n\n{shown}")


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
  return cli.program("report", output_dir, "--out",
                     outputs.report_dir_for(output_dir))


COMMANDS = {
    "summary": Command(
        "counts, classes, confidence and errors (the default)",
        lambda connection, args: answers.summary(connection, args.output_dir),
        render=render_summary,
        next=lambda output_dir: [
            cli.program("query", output_dir,
                        "accuracy"),
            cli.program("query", output_dir, "errors"),
            _report_command(output_dir)]),
    "sql": Command(
        "one read-only SQL statement over the views predictions and errors",
        lambda connection, args: sandbox.run_sql(connection, args.statement,
                                         args.max_rows),
        (("statement", {"help": "e.g. \"SELECT label, count(*) FROM "
                                "predictions GROUP BY 1\""}),
         ("--max_rows", {"type": limits.positive_count,
                         "default": sandbox.DEFAULT_MAX_ROWS,
                         "help": "rows to return at most"}))),
    "accuracy": Command(
        "accuracy, per-class precision/recall/F1, confusion matrix and "
        "calibration (needs true labels)",
        lambda connection, args: answers.accuracy(
            connection, answers.class_names_in(connection.manifest)),
        render=render_accuracy,
        next=lambda output_dir: [
            cli.program("query", output_dir,
                        "misclassified"),
            _report_command(output_dir)]),
    "low-confidence": Command(
        "the least confident predictions",
        lambda connection, args: answers.low_confidence(connection, args.below,
                                                args.limit),
        (("--below", {"type": limits.finite_number, "default": 0.6,
                      "help": "show predictions below this confidence"}),
         _LIMIT)),
    "misclassified": Command(
        "the most confident predictions that disagree with the true label",
        lambda connection, args: answers.misclassified(connection, args.limit),
        (_LIMIT,)),
    "errors": Command(
        "inputs that could not be classified, with their stage and reason",
        lambda connection, args: answers.error_rows(connection, args.limit),
        (_LIMIT,)),
    "duplicates": Command(
        "ids that more than one row has, with their row counts",
        lambda connection, args: answers.duplicates(connection, args.limit),
        (_LIMIT,)),
    "compare": Command(
        "where two runs disagree on the same ids",
        lambda connection, args: answers.compare(connection, args.limit),
        (("other_dir", {"help": "the --output folder of the other run"}),
         _LIMIT),
        render=render_compare),
    "neighbours": Command(
        "the rows whose embeddings are nearest an id's (cosine; needs a "
        "--write_embeddings run)",
        lambda connection, args: embedding_queries.neighbours(
            connection, args.id, args.k),
        (("id", {"help": "the id of a prediction row"}),
         ("--k", {"type": int, "default": embedding_queries.DEFAULT_K,
                  "help": "neighbours to list"})),
        render=render_neighbours),
    "near-duplicates": Command(
        "every pair of rows whose embeddings' cosine similarity is at least "
        "--min_similarity (exact, in blocks of bounded memory)",
        lambda connection, args: embedding_queries.near_duplicates(
            connection, args.min_similarity, args.limit),
        (("--min_similarity", {
            "type": float, "default": embedding_queries.DEFAULT_MIN_SIMILARITY,
            "help": "the cosine similarity a pair needs"}),
         ("--limit", {"type": int,
                      "default": embedding_queries.DEFAULT_PAIRS_SHOWN,
                      "help": "pairs to list, most similar first (all are "
                      "counted); 0 lists every pair"})),
        render=render_near_duplicates),
}
DEFAULT_COMMAND = "summary"


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="python -m tools.query",
      description="Query the outputs of python -m beam_jobs.predict.")
  parser.add_argument("output_dir", help="the --output folder of a run")
  parser.add_argument("--json", action="store_true",
                      help="print JSON instead of tables")
  limits.add_query_limits(parser)
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
  connection = sandbox.connect(args.output_dir,
                               getattr(args, "other_dir", None), args.timeout,
                               args.memory_limit)
  return command.run(connection, args)


def _memory_message(args) -> str:
  return ("tools.query: error: the answer needed more memory than "
          f"{limits.format_bytes(args.memory_limit)} (--memory_limit) and "
          f"{limits.format_bytes(limits.HEADROOM_BYTES)} for the rest allow; "
          "it was stopped")


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  command = COMMANDS[args.command or DEFAULT_COMMAND]
  try:
    with limits.MemoryWatch(args.memory_limit, _memory_message(args)):
      result = answer(args)
      text = (json.dumps(result, indent=2, default=str) if args.json else
              command.render(result))
  except QueryError as error:
    print(f"tools.query: error: {error}", file=sys.stderr)
    return 2
  except MemoryError:
    print(_memory_message(args), file=sys.stderr)
    return 1
  except Exception as error:  # pylint: disable=broad-except
    # A folder or statement this tool did not foresee: one line, never a
    # traceback.
    print(f"tools.query: error: {sandbox.one_line(error)}", file=sys.stderr)
    return 1
  print(text)
  if not args.json:
    cli.print_next(None, command.next(args.output_dir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
