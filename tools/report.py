"""Pictures of a run's results, for those who would rather look than read.

Usage:
  python -m tools.report OUTPUT_DIR --out REPORT_DIR [--samples 15]

Writes PNG plots and an index.html that shows them with the summary table:
a grid of sample images with their predictions and probability bars (the
Keras basic-classification tutorial's two plots), the most confident
mistakes, a confusion-matrix heat map, a confidence histogram split by
correct and wrong, a reliability diagram, and for a --write_embeddings run
a 2-D map of the embeddings (PCA of a bounded sample, coloured by label).
All numbers come from `tools.query`.
"""

import html
import io
import os
import sys

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from PIL import Image  # pylint: disable=wrong-import-position

from imagebatch import cli  # pylint: disable=wrong-import-position
from tools import answers  # pylint: disable=wrong-import-position
from tools import embedding_queries  # pylint: disable=wrong-import-position
from tools import sandbox  # pylint: disable=wrong-import-position

DEFAULT_SAMPLES = 15
GRID_COLUMNS = 3
CORRECT, WRONG, UNKNOWN = "blue", "red", "black"
# The predicted class's bar when there is no true label to judge it by.
PREDICTED = "#333333"
OTHER_BARS = "#bbbbbb"
DPI = 100
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
# Labels drawn in colours of their own on the map; the rest are grey.
MAP_LABELS = 20


def _open(data: bytes) -> np.ndarray:
  image = Image.open(io.BytesIO(data))
  return np.asarray(image if image.mode in ("L", "RGB") else
                    image.convert("RGB"))


def _read_image(row: dict, manifest: dict):
  """The input image for a prediction row, or None when it can't be had."""
  from imagebatch import paths  # pylint: disable=import-outside-toplevel
  arguments = (manifest or {}).get("arguments", {})
  try:
    # Ids are data: paths.open_file never opens a FIFO or device they name.
    if arguments.get("input_format") != "parquet":
      with paths.open_file(row["id"]) as handle:
        return _open(handle.read())
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    id_column, image_column = arguments["id_column"], arguments["image_column"]
    with paths.open_file(row["source"]) as handle:
      table = pq.read_table(handle, columns=[c for c in (id_column,
                                                         image_column) if c])
    if id_column:
      position = table.column(id_column).to_pylist().index(row["id"])
    else:
      position = int(row["id"].rsplit("#", 1)[1])
    cell = table.column(image_column)[position].as_py()
    if isinstance(cell, bytes):
      return _open(cell)
    shape = manifest["model"]["input_shape"]
    return np.asarray(cell, dtype=np.uint8).reshape(shape)
  except Exception:  # pylint: disable=broad-except
    # A source that moved or can't be read leaves a blank tile.
    return None


def _colour(row: dict) -> str:
  if row.get("true_label") is None:
    return UNKNOWN
  return CORRECT if row["label"] == row["true_label"] else WRONG


def _probability_pairs(row: dict, class_names: list):
  """(class names, probabilities) to draw: all classes, else the top k."""
  if row.get("probabilities") is not None and len(class_names) == len(
      row["probabilities"]):
    return class_names, list(row["probabilities"])
  return ([entry["label"] for entry in row["top_k"]],
          [entry["confidence"] for entry in row["top_k"]])


def plot_grid(rows: list, class_names: list, manifest: dict, path: str,
              title: str) -> None:
  """Image with its prediction, and the probability bars beside it."""
  count = max(1, len(rows))
  grid_rows = -(-count // GRID_COLUMNS)
  figure = plt.figure(figsize=(4 * GRID_COLUMNS, 2.4 * grid_rows + 0.6))
  figure.suptitle(title)
  for index, row in enumerate(rows):
    image_axis = figure.add_subplot(grid_rows, 2 * GRID_COLUMNS, 2 * index + 1)
    image = _read_image(row, manifest)
    if image is None:
      image = np.full((8, 8), 255, dtype=np.uint8)
    # Greyscale is drawn as it is, not inverted, so tiles look like the files.
    image_axis.imshow(image.squeeze(), cmap="gray", vmin=0, vmax=255)
    image_axis.set_xticks([])
    image_axis.set_yticks([])
    truth = row.get("true_label")
    image_axis.set_xlabel(
        f"{row['label']} {100 * row['confidence']:2.0f}% "
        f"({truth if truth is not None else '?'})", color=_colour(row),
        fontsize=8)
    bar_axis = figure.add_subplot(grid_rows, 2 * GRID_COLUMNS, 2 * index + 2)
    names, values = _probability_pairs(row, class_names)
    bars = bar_axis.bar(range(len(values)), values, color=OTHER_BARS)
    bar_axis.set_ylim([0, 1])
    bar_axis.set_xticks(range(len(names)))
    bar_axis.set_xticklabels(names, rotation=90, fontsize=6)
    bar_axis.tick_params(axis="y", labelsize=6)
    # As in the Keras tutorial: the true class blue, a wrong prediction red.
    # Without a true label nothing is known to be wrong.
    if row["label"] in names:
      bars[names.index(row["label"])].set_color(
          PREDICTED if truth is None else WRONG)
    if truth in names:
      bars[names.index(truth)].set_color(CORRECT)
  figure.tight_layout()
  figure.savefig(path, dpi=DPI)
  plt.close(figure)


def plot_confusion(scores: dict, path: str) -> None:
  classes, matrix = scores["classes"], np.array(scores["confusion_matrix"])
  size = max(5, 0.6 * len(classes) + 2)
  figure, axis = plt.subplots(figsize=(size, size))
  image = axis.imshow(matrix, cmap="Blues")
  figure.colorbar(image, ax=axis, fraction=0.046)
  axis.set_xticks(range(len(classes)))
  axis.set_xticklabels(classes, rotation=90)
  axis.set_yticks(range(len(classes)))
  axis.set_yticklabels(classes)
  axis.set_xlabel("predicted")
  axis.set_ylabel("true")
  axis.set_title(f"Confusion matrix, accuracy {scores['accuracy']:.4f}")
  threshold = matrix.max() / 2 if matrix.size else 0
  for (i, j), value in np.ndenumerate(matrix):
    if value:
      axis.text(j, i, str(value), ha="center", va="center", fontsize=7,
                color="white" if value > threshold else "black")
  figure.tight_layout()
  figure.savefig(path, dpi=DPI)
  plt.close(figure)


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


def plot_confidence(connection, path: str) -> None:
  rows = sandbox.rows(connection, """
      SELECT confidence, true_label IS NULL AS unknown,
             label = true_label AS correct FROM predictions""")
  bins = np.linspace(0, 1, answers.ECE_BINS + 1)
  figure, axis = plt.subplots(figsize=(7, 4))
  groups = [("correct", CORRECT, lambda r: r["correct"]),
            ("wrong", WRONG, lambda r: r["correct"] is False),
            ("no true label", "#999999", lambda r: r["unknown"])]
  data = [[r["confidence"] for r in rows if keep(r)] for _, _, keep in groups]
  labelled = bool(data[0] or data[1])
  # Only the groups this run has, so an unlabelled run shows no empty
  # "correct" and "wrong" entries.
  drawn = [(name, colour, values) for (name, colour, _), values in
           zip(groups, data) if values]
  # Side by side on a log scale: the few mistakes stay visible next to the
  # many confident right answers.
  axis.hist([values for _, _, values in drawn], bins=bins, log=True,
            label=[f"{name} ({len(values)})" for name, _, values in drawn],
            color=[colour for _, colour, _ in drawn])
  axis.set_xlabel("confidence of the predicted label")
  axis.set_ylabel("images (log scale)")
  axis.set_title("Confidence, correct vs wrong" if labelled else
                 "Confidence (no true labels)")
  axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=DPI)
  plt.close(figure)


def plot_reliability(scores: dict, path: str) -> None:
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
  figure.savefig(path, dpi=DPI)
  plt.close(figure)


def pca_2d(values: np.ndarray) -> tuple:
  """(N, 2) coordinates on the first two principal axes (numpy's SVD of
  the centred rows), and the share of variance each explains."""
  centred = np.asarray(values, np.float64) - np.mean(values, axis=0)
  _, singular, axes = np.linalg.svd(centred, full_matrices=False)
  share = singular ** 2 / max(float((singular ** 2).sum()), 1e-300)
  return centred @ axes[:2].T, share[:2]


def plot_embedding_map(sample: dict, path: str) -> None:
  """The sample's embeddings on their first two principal axes, coloured
  by true label where the rows have one, else by predicted label."""
  coordinates, share = pca_2d(sample["embeddings"])
  by_truth = sum(t is not None for t in sample["true_labels"]) > len(
      sample["true_labels"]) / 2
  labels = [str(t if by_truth else p) for t, p in zip(sample["true_labels"],
                                                       sample["labels"])]
  names, counts = np.unique(labels, return_counts=True)
  shown = list(names[np.argsort(-counts, kind="stable")][:MAP_LABELS])
  colours = plt.get_cmap("tab20")
  figure, axis = plt.subplots(figsize=(7, 6))
  labels = np.array(labels)
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
  figure.tight_layout()
  figure.savefig(path, dpi=DPI)
  plt.close(figure)


def _class_names(connection, manifest) -> list:
  """The card's class names from the manifest, else the predicted ones."""
  if (manifest or {}).get("class_names"):
    return list(manifest["class_names"])
  return [r["label"] for r in sandbox.rows(
      connection, "SELECT label FROM predictions GROUP BY label "
      "ORDER BY min(label_index)")]


def _sample_rows(connection, samples: int, where: str, order: str) -> list:
  return sandbox.rows(
      connection, f"SELECT * FROM predictions WHERE {where} ORDER BY {order} "
      "LIMIT ?", [samples])


def clear_report(out: str) -> None:
  """Removes an earlier report's files, and only those, from `out`."""
  for name in list(FILES.values()) + [INDEX]:
    path = os.path.join(out, name)
    if os.path.isfile(path):
      os.remove(path)


class ReportFiles(dict):
  """{name: path} of the files a report wrote; `skipped` holds {name:
  reason} for the plots it could not draw."""

  def __init__(self):
    super().__init__()
    self.skipped = {}


def write_report(output_dir: str, out: str,
                 samples: int = DEFAULT_SAMPLES) -> ReportFiles:
  """Draws every plot it can, and index.html, which also lists the plots it
  could not draw and why."""
  connection = sandbox.connect(output_dir)
  os.makedirs(out, exist_ok=True)
  clear_report(out)
  summary = answers.summary(connection, output_dir)
  manifest = summary["manifest"]
  names = _class_names(connection, manifest)
  written = ReportFiles()
  skipped = written.skipped
  sample_rows = _sample_rows(connection, samples, "TRUE", "hash(id), id")
  path = os.path.join(out, FILES["samples"])
  plot_grid(sample_rows, names, manifest, path, grid_title(sample_rows))
  written["samples"] = path
  try:
    scores = answers.accuracy(connection, (manifest or {}).get("class_names"))
  except sandbox.QueryError as error:
    scores = None
    for name in ("mistakes", "confusion", "reliability"):
      skipped[name] = str(error)
  if scores:
    mistakes = _sample_rows(connection, samples,
                            "true_label IS NOT NULL AND label <> true_label",
                            "confidence DESC, id")
    if mistakes:
      path = os.path.join(out, FILES["mistakes"])
      plot_grid(mistakes, names, manifest, path, "Most confident mistakes")
      written["mistakes"] = path
    else:
      skipped["mistakes"] = "every labelled prediction is right"
    for name, plot in (("confusion", plot_confusion),
                       ("reliability", plot_reliability)):
      path = os.path.join(out, FILES[name])
      plot(scores, path)
      written[name] = path
  path = os.path.join(out, FILES["confidence"])
  plot_confidence(connection, path)
  written["confidence"] = path
  sample = embedding_queries.map_sample(connection)
  if sample is None:
    skipped["embedding_map"] = ("the run has no embeddings (predict "
                                "--write_embeddings writes them)")
  elif len(sample["embeddings"]) < 3:
    skipped["embedding_map"] = "fewer than 3 rows have an embedding"
  else:
    path = os.path.join(out, FILES["embedding_map"])
    plot_embedding_map(sample, path)
    written["embedding_map"] = path
  written["index"] = _write_index(out, summary, scores, written, skipped)
  return written


def skipped_by_reason(skipped: dict) -> dict:
  """{reason: [plot titles]}, so one reason is said once."""
  grouped = {}
  for name, reason in skipped.items():
    grouped.setdefault(reason, []).append(TITLES[name])
  return grouped


def _write_index(out: str, summary: dict, scores, written: dict,
                 skipped: dict) -> str:
  manifest = summary["manifest"] or {}
  counts = manifest.get("counts", {})
  facts = [("model", manifest.get("model_id", "?")),
           ("inputs", counts.get("inputs", "?")),
           ("predictions", summary["predictions"]),
           ("errors", summary["errors"]),
           ("images/s", manifest.get("images_per_second", "?"))]
  if scores:
    facts += [("accuracy", f"{scores['accuracy']:.4f} "
                           f"({scores['correct']}/{scores['labelled']})"),
              ("expected calibration error",
               f"{scores['expected_calibration_error']:.4f}")]
  if summary["true_labels"]["unmatched"]:
    facts.append(("true labels matching no class",
                  summary["true_labels"]["unmatched"]))
  table = "".join(f"<tr><th>{html.escape(str(k))}</th>"
                  f"<td>{html.escape(str(v))}</td></tr>" for k, v in facts)
  classes = "".join(
      f"<tr><td>{html.escape(str(r['label']))}</td><td>{r['images']}</td>"
      f"<td>{r['share']}</td><td>{r['mean_confidence']}</td></tr>"
      for r in summary["classes"])
  images = "".join(
      f'<h2>{html.escape(TITLES[name])}</h2>'
      f'<img src="{html.escape(os.path.basename(path))}" alt="{name}">'
      for name, path in written.items())
  if skipped:
    images += "<h2>not drawn</h2><ul>" + "".join(
        f"<li>{html.escape(', '.join(names))}: {html.escape(reason)}</li>"
        for reason, names in skipped_by_reason(skipped).items()) + "</ul>"
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Run report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}}img{{max-width:100%}}</style>
</head><body><h1>Run report</h1><table>{table}</table>
<h2>predictions per class</h2><table><tr><th>label</th><th>images</th>
<th>share</th><th>mean confidence</th></tr>{classes}</table>{images}</body></html>
"""
  path = os.path.join(out, INDEX)
  with open(path, "w") as handle:
    handle.write(page)
  return path


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m tools.report",
                              description=__doc__.split("\n\n")[0])
  parser.add_argument("output_dir", help="the --output folder of a run")
  parser.add_argument("--out", required=True,
                      help="folder for the report; its earlier plots are "
                      "replaced, nothing else in it is touched")
  parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                      help="images per grid")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    written = write_report(args.output_dir, args.out, args.samples)
  except sandbox.QueryError as error:
    print(f"tools.report: error: {error}", file=sys.stderr)
    return 2
  index = written.pop("index")
  print(f"wrote {index} with {len(written)} plots")
  for reason, names in skipped_by_reason(written.skipped).items():
    print(f"  not drawn: {', '.join(names)}: {reason}")
  cli.print_next(
      f"{os.path.abspath(index)} (open it in a browser)",
      [cli.program("query", args.output_dir,
                   "misclassified")] if "mistakes" in written else [])
  return 0


if __name__ == "__main__":
  sys.exit(main())
