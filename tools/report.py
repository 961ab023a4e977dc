"""Pictures of a run's results, for those who would rather look than read.

Usage:
  python -m tools.report OUTPUT_DIR --out REPORT_DIR [--samples 15]

Writes PNG plots and an index.html: a header (run date, input, model source
and id, engine, counts, accuracy), a grid of sample images with their
predictions and probability bars (the Keras basic-classification tutorial's
two plots), the most confident mistakes, a confusion-matrix heat map of the
commonest classes, a confidence histogram split by correct and wrong, a
reliability diagram, per-class precision/recall/F1, the first failing
files with their reasons, and for a --write_embeddings run a 2-D map of the
embeddings (PCA of a bounded sample, coloured by label). All numbers come
from `tools.answers` and `tools.embedding_queries`.

Images are read from each row's `source` under the run's input folder only
(tools/report_images.py says what may be opened); `--out` must be new, empty
or a report folder this tool made (tools/report_folder.py).
"""

import argparse
import io
import os
import sys
import textwrap

import duckdb
import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from imagebatch import cli  # pylint: disable=wrong-import-position
from tools import answers  # pylint: disable=wrong-import-position
from tools import embedding_queries  # pylint: disable=wrong-import-position
from tools import limits  # pylint: disable=wrong-import-position
from tools import report_folder  # pylint: disable=wrong-import-position
from tools import report_images  # pylint: disable=wrong-import-position
from tools import report_page  # pylint: disable=wrong-import-position
from tools import sandbox  # pylint: disable=wrong-import-position

DEFAULT_SAMPLES = 15
# Images per grid at most: the figure grows with them.
MAX_SAMPLES = 60
GRID_COLUMNS = 3
CORRECT, WRONG, UNKNOWN = "blue", "red", "black"
# The predicted class's bar when there is no true label to judge it by.
PREDICTED = "#333333"
OTHER_BARS = "#bbbbbb"
PLACEHOLDER = 235
DPI = 100
# Bars beside a sample at most: the likeliest classes (and the true one).
MAX_BARS = 10
# Classes of the confusion heat map at most, the commonest.
MAX_PLOT_CLASSES = 25
# A class name on an axis is cut to this many characters.
MAX_LABEL_CHARACTERS = 20
FILES = {
    "samples": "samples.png",
    "mistakes": "mistakes.png",
    "confusion": "confusion_matrix.png",
    "confidence": "confidence_histogram.png",
    "reliability": "reliability_diagram.png",
    "embedding_map": "embedding_map.png",
}
INDEX = "index.html"
TITLES = {
    "samples": "sample predictions",
    "mistakes": "most confident mistakes",
    "confusion": "confusion matrix",
    "confidence": "confidence histogram",
    "reliability": "reliability diagram",
    "embedding_map": "embedding map",
}
# Labels drawn in colours of their own on the embedding map; the rest grey.
MAP_LABELS = 20


def short(name, limit: int = MAX_LABEL_CHARACTERS) -> str:
  """A class name for an axis: one line of at most `limit` characters, cut
  in the middle so that both ends stay ("ankle boot (12)" and "ankle boot
  (13)" stay apart)."""
  text = " ".join(str(name).split())
  if len(text) <= limit:
    return text
  head = (limit - 1) - (limit - 1) // 2
  return text[:head] + "\u2026" + text[len(text) - (limit - 1) // 2:]


def _png(figure) -> bytes:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=DPI)
  plt.close(figure)
  return buffer.getvalue()


def _colour(row: dict) -> str:
  if row.get("true_label") is None:
    return UNKNOWN
  return CORRECT if row["label"] == row["true_label"] else WRONG


def probability_bars(row: dict, class_names) -> tuple:
  """(class names, probabilities) to draw beside a sample: every class of a
  small model, else the MAX_BARS likeliest (from `probabilities` or
  `top_k`), with the true class added when it is not among them."""
  probabilities = row.get("probabilities")
  if probabilities is not None and class_names and len(
      probabilities) == len(class_names):
    if len(class_names) <= MAX_BARS:
      return list(class_names), list(probabilities)
    values = np.nan_to_num(np.asarray(probabilities, dtype=np.float64),
                           nan=-1.0)
    order = list(np.argsort(-values, kind="stable")[:MAX_BARS])
    truth = row.get("true_label")
    if truth is not None:
      try:
        index = class_names.index(truth)
      except ValueError:
        index = None
      if index is not None and index not in order:
        order.append(index)
    return ([class_names[i] for i in order],
            [float(probabilities[i]) for i in order])
  entries = [entry for entry in (row.get("top_k") or [])[:MAX_BARS]
             if isinstance(entry, dict)]
  return ([entry.get("label") for entry in entries],
          [entry.get("confidence") or 0.0 for entry in entries])


def _show_tile(axis, tile, reason: str) -> None:
  """An image as it is (greyscale not inverted), or a placeholder saying
  why there is none."""
  if tile is not None and tile.ndim == 3 and tile.shape[2] in (1, 3):
    if tile.shape[2] == 1:
      axis.imshow(tile[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
      axis.imshow(tile)
    return
  axis.imshow(np.full((8, 8), PLACEHOLDER, dtype=np.uint8), cmap="gray",
              vmin=0, vmax=255)
  axis.text(3.5, 3.5, textwrap.fill(reason or "not drawn", 14), ha="center",
            va="center", fontsize=6, color="#555555")


def plot_grid(rows: list, class_names, policy: report_images.ImagePolicy,
              title: str) -> bytes:
  """Each image with its prediction, and the probability bars beside it."""
  count = max(1, len(rows))
  grid_rows = -(-count // GRID_COLUMNS)
  figure = plt.figure(figsize=(4 * GRID_COLUMNS, 2.4 * grid_rows + 0.6))
  figure.suptitle(title)
  for index, row in enumerate(rows):
    image_axis = figure.add_subplot(grid_rows, 2 * GRID_COLUMNS, 2 * index + 1)
    try:
      tile, reason = report_images.read_tile(row, policy), ""
    except report_images.NotDrawn as error:
      tile, reason = None, str(error)
    _show_tile(image_axis, tile, reason)
    image_axis.set_xticks([])
    image_axis.set_yticks([])
    truth = row.get("true_label")
    confidence = row.get("confidence")
    confidence = confidence if isinstance(confidence, float) and np.isfinite(
        confidence) else float("nan")
    image_axis.set_xlabel(
        f"{short(row['label'], 22)} {100 * confidence:2.0f}%\n"
        f"true: {short(truth, 22) if truth is not None else '?'}",
        color=_colour(row), fontsize=7)
    bar_axis = figure.add_subplot(grid_rows, 2 * GRID_COLUMNS, 2 * index + 2)
    names, values = probability_bars(row, class_names)
    bars = bar_axis.bar(range(len(values)), values, color=OTHER_BARS)
    bar_axis.set_ylim([0, 1])
    bar_axis.set_xticks(range(len(names)))
    bar_axis.set_xticklabels([short(name, 12) for name in names], rotation=90,
                             fontsize=6)
    bar_axis.tick_params(axis="y", labelsize=6)
    # As in the Keras tutorial: the true class blue, a wrong prediction red.
    # Without a true label nothing is known to be wrong.
    if row["label"] in names:
      bars[names.index(row["label"])].set_color(
          PREDICTED if truth is None else WRONG)
    if truth in names:
      bars[names.index(truth)].set_color(CORRECT)
  figure.tight_layout()
  return _png(figure)


def plot_confusion(scores: dict) -> bytes:
  """A heat map of the commonest classes (at most MAX_PLOT_CLASSES)."""
  table = answers.confusion_matrix(scores, MAX_PLOT_CLASSES)
  classes, matrix = table["classes"], np.array(table["matrix"], dtype=np.int64)
  count = len(classes)
  size = max(5.0, 0.32 * count + 3)
  figure, axis = plt.subplots(figsize=(size, size))
  image = axis.imshow(matrix.reshape(count, count), cmap="Blues")
  figure.colorbar(image, ax=axis, fraction=0.046)
  font = 8 if count <= 15 else 6
  labels = [short(name) for name in classes]
  axis.set_xticks(range(count))
  axis.set_xticklabels(labels, rotation=45, ha="right",
                       rotation_mode="anchor", fontsize=font)
  axis.set_yticks(range(count))
  axis.set_yticklabels(labels, fontsize=font)
  axis.set_xlabel("predicted")
  axis.set_ylabel("true")
  title = f"Confusion matrix, accuracy {scores['accuracy']:.4f}"
  if table["left_out"]:
    title += (f"\nthe {count} commonest of {len(scores['classes'])} classes "
              "that occur")
  axis.set_title(title)
  threshold = matrix.max() / 2 if matrix.size else 0
  for (i, j), value in np.ndenumerate(matrix):
    if value:
      axis.text(j, i, str(value), ha="center", va="center", fontsize=font - 1,
                color="white" if value > threshold else "black")
  figure.tight_layout()
  return _png(figure)


def grid_title(rows: list) -> str:
  """Says what the colours mean for the rows actually drawn."""
  labelled = sum(row.get("true_label") is not None for row in rows)
  if labelled == len(rows):
    return "Sample predictions (blue: right, red: wrong)"
  if not labelled:
    return ("Sample predictions (no true labels: the predicted class is the "
            "dark bar)")
  return ("Sample predictions (blue: right, red: wrong, black: no true "
          "label)")


_GROUPS = (("correct", CORRECT), ("wrong", WRONG),
           ("no true label", "#999999"))


def plot_confidence(connection) -> bytes:
  """Counts per confidence bin, from SQL (memory does not grow with the
  rows), side by side for right, wrong and unlabelled predictions."""
  counts = sandbox.rows(connection, f"""
      SELECT least(floor(confidence * {answers.ECE_BINS}),
                   {answers.ECE_BINS - 1})::INTEGER AS bin,
             CASE WHEN true_label IS NULL THEN 'no true label'
                  WHEN label = true_label THEN 'correct' ELSE 'wrong' END
               AS kind,
             count(*) AS images
      FROM predictions WHERE {answers.BINNABLE} GROUP BY ALL""")
  if not counts:
    raise ValueError("no prediction has a confidence between 0 and 1")
  totals = {name: sum(r["images"] for r in counts if r["kind"] == name)
            for name, _ in _GROUPS}
  # Only the groups this run has, so an unlabelled run shows no empty
  # "correct" and "wrong" entries.
  drawn = [(name, colour) for name, colour in _GROUPS if totals[name]]
  width = 1.0 / answers.ECE_BINS / len(drawn)
  figure, axis = plt.subplots(figsize=(7, 4))
  for offset, (name, colour) in enumerate(drawn):
    heights = [0] * answers.ECE_BINS
    for r in counts:
      if r["kind"] == name:
        heights[r["bin"]] = r["images"]
    # Side by side on a log scale: the few mistakes stay visible next to the
    # many confident right answers.
    axis.bar([b / answers.ECE_BINS + offset * width
              for b in range(answers.ECE_BINS)], heights, width=width,
             align="edge", log=True, color=colour,
             label=f"{name} ({totals[name]})")
  labelled = totals["correct"] or totals["wrong"]
  axis.set_xlim([0, 1])
  axis.set_xlabel("confidence of the predicted label")
  axis.set_ylabel("images (log scale)")
  axis.set_title("Confidence, correct vs wrong" if labelled else
                 "Confidence (no true labels)")
  axis.legend()
  figure.tight_layout()
  return _png(figure)


def plot_reliability(scores: dict) -> bytes:
  bins = scores["calibration_bins"]
  width = 1.0 / answers.ECE_BINS
  figure, axis = plt.subplots(figsize=(5, 5))
  axis.bar([b["bin"] * width for b in bins], [b["accuracy"] for b in bins],
           width=width, align="edge", edgecolor="black", color=CORRECT,
           alpha=0.7, label="accuracy")
  for b in bins:
    axis.text((b["bin"] + 0.5) * width, min(b["accuracy"], 0.9) + 0.02,
              f"n={b['images']}", ha="center", fontsize=7)
  axis.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
  axis.set_xlim([0, 1])
  axis.set_ylim([0, 1])
  axis.set_xlabel("confidence")
  axis.set_ylabel("accuracy")
  axis.set_title(f"Reliability, ECE {scores['expected_calibration_error']:.4f}")
  axis.legend(loc="upper left")
  figure.tight_layout()
  return _png(figure)


def pca_2d(values: np.ndarray) -> tuple:
  """(N, 2) coordinates on the first two principal axes (numpy's SVD of
  the centred rows), and the share of variance each explains."""
  centred = np.asarray(values, np.float64) - np.mean(values, axis=0)
  _, singular, axes = np.linalg.svd(centred, full_matrices=False)
  share = singular ** 2 / max(float((singular ** 2).sum()), 1e-300)
  return centred @ axes[:2].T, share[:2]


def plot_embedding_map(sample: dict) -> bytes:
  """The sample's embeddings on their first two principal axes, coloured
  by true label where most rows have one, else by predicted label."""
  if len(sample["embeddings"]) < 3:
    raise ValueError("fewer than 3 rows have an embedding")
  coordinates, share = pca_2d(sample["embeddings"])
  by_truth = sum(t is not None for t in sample["true_labels"]) > len(
      sample["true_labels"]) / 2
  labels = np.array([short(t if by_truth else p) for t, p in zip(
      sample["true_labels"], sample["labels"])])
  names, counts = np.unique(labels, return_counts=True)
  shown = list(names[np.argsort(-counts, kind="stable")][:MAP_LABELS])
  colours = plt.get_cmap("tab20")
  figure, axis = plt.subplots(figsize=(7, 6))
  others = ~np.isin(labels, shown)
  if others.any():
    axis.scatter(coordinates[others, 0], coordinates[others, 1], s=4,
                 color=OTHER_BARS, label=f"other ({int(others.sum())})")
  for index, name in enumerate(sorted(shown)):
    mask = labels == name
    axis.scatter(coordinates[mask, 0], coordinates[mask, 1], s=4,
                 color=colours(index % 20), label=f"{name} ({int(mask.sum())})")
  axis.set_xlabel(f"PC 1 ({share[0]:.0%} of variance)")
  axis.set_ylabel(f"PC 2 ({share[1]:.0%} of variance)" if len(share) > 1
                  else "PC 2")
  axis.set_title(f"Embeddings (D = {sample['dimension']}), "
                 f"{len(labels)} of {sample['rows']} rows, coloured by "
                 f"{'true' if by_truth else 'predicted'} label")
  axis.legend(fontsize=7, markerscale=3, loc="best")
  return _png(figure)


def _sample_rows(connection, samples: int, where: str, order: str) -> list:
  return sandbox.rows(
      connection, f"SELECT * FROM predictions WHERE {where} ORDER BY {order} "
      "LIMIT ?", [samples])


class ReportFiles(dict):
  """{name: path} of the files a report wrote; `skipped` holds {name:
  reason} for the plots it could not draw."""

  def __init__(self):
    super().__init__()
    self.skipped = {}


def _embedding_map(connection) -> bytes:
  return plot_embedding_map(embedding_queries.map_sample(connection))


def _draw(out: str, written: ReportFiles, name: str, plot, *args) -> None:
  """Draws one plot into `out`, or notes in `skipped` why it could not."""
  try:
    data = plot(*args)
  except (sandbox.QueryError, ValueError, ArithmeticError, TypeError,
          KeyError, IndexError, OverflowError) as error:
    written.skipped[name] = sandbox.one_line(error, 200)
    return
  except duckdb.Error as error:
    written.skipped[name] = sandbox.one_line(error, 200)
    return
  written[name] = report_folder.write(out, FILES[name], data)


def write_report(output_dir: str, out: str, samples: int = DEFAULT_SAMPLES,
                 images_roots=None, no_images: bool = False,
                 timeout_seconds: float = sandbox.DEFAULT_TIMEOUT_SECONDS,
                 memory_limit=None) -> ReportFiles:
  """Draws every plot it can, and index.html, which also lists the plots it
  could not draw and why. Raises QueryError for a folder with no results and
  report_folder.FolderError for an `out` it may not write into."""
  if not 1 <= samples <= MAX_SAMPLES:
    raise sandbox.QueryError(f"samples must be between 1 and {MAX_SAMPLES}")
  connection = sandbox.connect(output_dir, timeout_seconds=timeout_seconds,
                               memory_limit=memory_limit)
  report_folder.claim(out, list(FILES.values()) + [INDEX])
  summary = answers.summary(connection, output_dir)
  manifest = summary["manifest"]
  names = answers.class_names_in(manifest)
  policy = report_images.policy_for(manifest, images_roots, no_images)
  written = ReportFiles()
  skipped = written.skipped
  if summary["predictions"]:
    sample_rows = _sample_rows(connection, samples, "TRUE", "hash(id), id")
    _draw(out, written, "samples", plot_grid, sample_rows, names, policy,
          grid_title(sample_rows))
  else:
    skipped["samples"] = "no input was classified"
  try:
    scores = answers.accuracy(connection, names)
  except sandbox.QueryError as error:
    scores = None
    for name in ("mistakes", "confusion", "reliability"):
      skipped[name] = str(error)
  if scores:
    mistakes = _sample_rows(connection, samples,
                            "true_label IS NOT NULL AND label <> true_label",
                            "confidence DESC NULLS LAST, id")
    if mistakes:
      _draw(out, written, "mistakes", plot_grid, mistakes, names, policy,
            "Most confident mistakes")
    else:
      skipped["mistakes"] = "every labelled prediction is right"
    _draw(out, written, "confusion", plot_confusion, scores)
    _draw(out, written, "reliability", plot_reliability, scores)
  if summary["predictions"]:
    _draw(out, written, "confidence", plot_confidence, connection)
  else:
    skipped["confidence"] = "no input was classified"
  if embedding_queries.has_embeddings(connection):
    # Drawn like the others: a run whose every input failed has the column
    # and no embedding in it, which skips the map, not the report.
    _draw(out, written, "embedding_map", _embedding_map, connection)
  else:
    skipped["embedding_map"] = ("the run has no embeddings (predict "
                                "--write_embeddings writes them)")
  for name, file_name in FILES.items():
    if name not in written:
      # An earlier report's plot that this one could not draw.
      report_folder.remove(out, file_name)
  failing = answers.error_rows(connection, report_page.MAX_FAILING_FILES)
  page = report_page.page(summary, scores, written, skipped, failing,
                          policy, TITLES)
  written["index"] = report_folder.write(out, INDEX, page.encode("utf-8"))
  return written


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m tools.report",
                              description=__doc__.split("\n\n")[0])
  parser.add_argument("output_dir", help="the --output folder of a run")
  parser.add_argument("--out", required=True,
                      help="folder for the report: new, empty, or one this "
                      "tool made (it replaces its own files there and "
                      "nothing else)")
  parser.add_argument("--samples", type=_samples, default=DEFAULT_SAMPLES,
                      help=f"images per grid, 1 to {MAX_SAMPLES}")
  parser.add_argument("--images_root", action="append", metavar="DIR",
                      help="a local folder whose images the report may draw "
                      "(repeat for more); default: the run's input folder "
                      "as its manifest records it")
  parser.add_argument("--no_images", action="store_true",
                      help="draw no image, only the predictions")
  limits.add_query_limits(parser)
  return parser


def _samples(text: str) -> int:
  value = limits.positive_count(text)
  if value > MAX_SAMPLES:
    raise argparse.ArgumentTypeError(f"{text!r} is above {MAX_SAMPLES}")
  return value


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  message = ("tools.report: error: the report needed more memory than "
             f"{limits.format_bytes(args.memory_limit)} (--memory_limit) and "
             f"{limits.format_bytes(limits.HEADROOM_BYTES)} for the rest "
             "allow; it was stopped")
  try:
    with limits.MemoryWatch(args.memory_limit, message):
      written = write_report(args.output_dir, args.out, args.samples,
                             args.images_root, args.no_images, args.timeout,
                             args.memory_limit)
  except (sandbox.QueryError, report_folder.FolderError) as error:
    print(f"tools.report: error: {error}", file=sys.stderr)
    return 2
  except MemoryError:
    print(message, file=sys.stderr)
    return 1
  except Exception as error:  # pylint: disable=broad-except
    # A folder this tool did not foresee: one line, never a traceback.
    print(f"tools.report: error: {sandbox.one_line(error)}", file=sys.stderr)
    return 1
  index = written.pop("index")
  print(f"wrote {index} with {len(written)} plots")
  for reason, names in report_page.skipped_by_reason(written.skipped,
                                                     TITLES).items():
    print(f"  not drawn: {', '.join(names)}: {reason}")
  cli.print_next(
      f"{os.path.abspath(index)} (open it in a browser)",
      [cli.program("query", args.output_dir,
                   "misclassified")] if "mistakes" in written else [])
  return 0


if __name__ == "__main__":
  sys.exit(main())
