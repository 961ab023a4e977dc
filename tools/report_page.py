"""The report's page: index.html, with every value escaped and every table
bounded (the manifest and the shards come from shared folders)."""

import html
import os

from tools import answers
from tools import report_images

# Rows of the page's class tables, and failing files, at most.
MAX_PAGE_CLASSES = 50
MAX_FAILING_FILES = 20
MAX_ERROR_CHARACTERS = 300


def skipped_by_reason(skipped: dict, titles: dict) -> dict:
  """{reason: [plot titles]}, so one reason is said once."""
  grouped = {}
  for name, reason in skipped.items():
    grouped.setdefault(reason, []).append(titles[name])
  return grouped


def _e(value) -> str:
  return html.escape("" if value is None else str(value))


def _table(headers: list, rows: list) -> str:
  head = "".join(f"<th>{_e(h)}</th>" for h in headers)
  body = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) +
                 "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _more(total: int, shown: int, what: str) -> str:
  if total <= shown:
    return ""
  return (f"<p>{total - shown} more {_e(what)} are not shown; "
          "<code>python -m tools.query</code> lists them all.</p>")


def page(summary: dict, scores, written: dict, skipped: dict, failing: list,
         policy: report_images.ImagePolicy, titles: dict) -> str:
  """The report's index.html: the header, the class tables, the failing
  files, the plots in `written` (by their file names) and those `skipped`,
  with why."""
  run = summary["run"]
  counts = run["counts"]
  facts = [("run finished", run["finished_at"] or "?"),
           ("run id", run["run_id"] or "?"),
           ("input", run["input"] or "?"),
           ("model source", run["model_source"] or "?"),
           ("model id", run["model_id"] or "?"),
           ("engine", ", ".join(map(str, summary["engines"])) or
            run["engine"] or "?"),
           ("inputs", counts.get("inputs", "?")),
           ("predictions", summary["predictions"]),
           ("errors", summary["errors"]),
           ("images/s", run["images_per_second"] or "?")]
  if scores:
    facts += [("accuracy", f"{scores['accuracy']:.4f} "
                           f"({scores['correct']}/{scores['labelled']})"),
              ("expected calibration error",
               f"{scores['expected_calibration_error']:.4f}")]
  if summary["true_labels"]["unmatched"]:
    facts.append(("true labels matching no class",
                  summary["true_labels"]["unmatched"]))
  header = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>"
                   for k, v in facts)
  classes = summary["classes"]
  sections = [
      "<h2>predictions per class</h2>" + _table(
          ["label", "images", "share", "mean confidence"],
          [(r["label"], r["images"], r["share"], r["mean_confidence"])
           for r in classes[:MAX_PAGE_CLASSES]]) +
      _more(len(classes), MAX_PAGE_CLASSES, "classes")]
  if scores:
    per_class = scores["per_class"]
    title = "precision, recall and F1 per class"
    if len(per_class) > MAX_PAGE_CLASSES:
      per_class = sorted(per_class, key=lambda r: -r["support"])
      title += " (the most supported first)"
    sections.append(f"<h2>{_e(title)}</h2>" + _table(
        ["class", "precision", "recall", "F1", "support", "predicted"],
        [(r["class"], f"{r['precision']:.4f}", f"{r['recall']:.4f}",
          f"{r['f1']:.4f}", r["support"], r["predicted"])
         for r in per_class[:MAX_PAGE_CLASSES]]) +
                    _more(len(per_class), MAX_PAGE_CLASSES, "classes"))
  if failing:
    sections.append("<h2>failing files</h2>" + _table(
        ["id", "stage", "reason"],
        [(r["id"], r["stage"], answers.shorten(r["error"],
                                               MAX_ERROR_CHARACTERS))
         for r in failing]) + _more(summary["errors"], len(failing),
                                    "failing files"))
  images = "".join(
      f'<h2>{_e(titles[name])}</h2>'
      f'<img src="{_e(os.path.basename(path))}" alt="{_e(name)}">'
      for name, path in written.items())
  if skipped:
    images += "<h2>not drawn</h2><ul>" + "".join(
        f"<li>{_e(', '.join(names))}: {_e(reason)}</li>"
        for reason, names in skipped_by_reason(skipped, titles).items()) + "</ul>"
  where = (f"read from their sources under {', '.join(policy.roots)}"
           if policy.roots else "not read (no local input folder)")
  return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Run report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}}img{{max-width:100%}}</style>
</head><body><h1>Run report</h1><table>{header}</table>
{"".join(sections)}{images}
<p>Images are {_e(where)}.</p></body></html>
"""
