"""ONNX models from PyTorch against their authors' own predictions.

Usage:
  python -m benchmarks.onnx_parity [--models DIR (make_models.py's --out)]
      [--data ../shared/data] [--work DIR] [--serve_python PYTHON]
      [--only fashion|efficientnet]

Takes the models benchmarks/pytorch/make_models.py makes the way PyTorch
authors make them (in its own torch venv) and the authors' predictions it
writes beside them (PyTorch through torchvision transforms), adopts each
export with model.adopt as a user would (the flags or the author's own
preprocessing file), serves it with beam_jobs.predict from its files
(--serve_python: the slim install, where TensorFlow cannot be imported),
and prints one table row per export: images, top-1 agreement with the
author, the same on rows that are not near ties (the author's top two
probabilities more than NEAR_TIE apart), the largest confidence difference,
and how the batch axis was served.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Rows whose author's top two probabilities are closer than this are near
# ties, where the last bits of a sum may pick either.
NEAR_TIE = 0.01
# (model folder, export, model.adopt flags; {folder} is the model folder).
EXPORTS = [
    ("fashion_mnist_cnn", name, ["--input_scale", "symmetric"])
    for name in ("cnn_b1", "cnn_b1_torchscript", "cnn_dynamic_torchscript",
                 "cnn_dynamic_dynamo", "cnn_softmax_dynamic", "cnn_nhwc_b1",
                 "cnn_nhwc_dynamic_torchscript")
] + [
    ("efficientnet_lite0", "efficientnet_lite0_b1",
     ["--preprocessing_config", "{folder}/config.json"]),
    ("efficientnet_lite0", "efficientnet_lite0_b1_torchscript",
     ["--preprocessing_config", "{folder}/preprocessor_config.json"]),
    ("efficientnet_lite0", "efficientnet_lite0_dynamic",
     ["--input_scale", "symmetric", "--resize", "256", "--center_crop",
      "224", "--interpolation", "bicubic"]),
]
# Where each model folder's images and class names are.
IMAGES = {"fashion_mnist_cnn": ("{folder}/test_images",
                                "{folder}/class_names.txt"),
          "efficientnet_lite0": ("{data}/flowers",
                                 "{folder}/imagenet_classes.txt")}


def adopt(source, flags, class_names, model_dir):
  """model.adopt as a user runs it: the finished process, its output
  captured (a refusal is its last line on stderr)."""
  return subprocess.run([sys.executable, "-m", "model.adopt", source,
                         "--output", model_dir, "--class_names",
                         class_names] + flags,
                        cwd=REPO, capture_output=True, text=True, check=False)


def serve(source, flags, images, class_names, work, name, serve_python):
  """model.adopt, then beam_jobs.predict, as a user runs them; the card
  and the rows by id. A refusal or a failed run ends with its last line."""
  model_dir = os.path.join(work, name + "_model")
  out = os.path.join(work, name + "_out")
  runs = [lambda: adopt(source, flags, class_names, model_dir),
          lambda: subprocess.run(
              [serve_python, "-m", "beam_jobs.predict", "--input", images,
               "--model", model_dir, "--output", out, "--overwrite",
               "--write_probabilities", "--inference_threads", "1",
               "--progress_seconds", "0"],
              cwd=REPO, capture_output=True, text=True, check=False)]
  for run in runs:
    done = run()
    if done.returncode != 0:
      lines = done.stderr.strip().splitlines() or ["(no output)"]
      raise RuntimeError(f"{done.args[2]} exit {done.returncode}: "
                         f"{lines[-1]}")
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  table = pq.read_table(os.path.join(out, "predictions"),
                        columns=["id", "probabilities"])
  rows = {row["id"]: row for row in table.to_pylist()}
  with open(os.path.join(model_dir, "model_card.json"),
            encoding="utf-8") as handle:
    return json.load(handle), rows


def _row(export, flags, card, rows, images, author):
  """One table row: the served probabilities against the author's."""
  ids = [os.path.join(images, path) for path in author["paths"]]
  missing = [i for i in ids if i not in rows]
  if missing:
    raise SystemExit(f"{export}: {len(missing)} of the author's images were "
                     f"not served, e.g. {missing[0]}")
  served = np.array([rows[i]["probabilities"] for i in ids], np.float64)
  expected = author["probabilities"].astype(np.float64)
  agree = served.argmax(1) == expected.argmax(1)
  top_two = np.sort(expected, axis=1)[:, -2:]
  clear = top_two[:, 1] - top_two[:, 0] > NEAR_TIE
  confidence = np.abs(served.max(1) - expected.max(1)).max()
  print(f"| {export} | {' '.join(flags)} | {len(ids)} | {agree.mean():.4f} | "
        f"{agree[clear].mean():.4f} ({clear.sum()}) | {confidence:.2g} | "
        f"{card['adopted']['onnx']['batch']} |", flush=True)
  return agree.mean()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=os.environ.get(
      "ONNX_MODELS_DIR", "/work/bench/onnx_models"),
                      help="the folder benchmarks/pytorch/make_models.py "
                      "wrote (its --out)")
  parser.add_argument("--data", default=os.path.join(REPO, "..", "shared",
                                                     "data"))
  parser.add_argument("--work", default=None,
                      help="where the model folders and outputs go (default: "
                      "a temporary folder)")
  parser.add_argument("--serve_python", default=sys.executable,
                      help="the Python that runs beam_jobs.predict, e.g. "
                      ".venv-slim/bin/python")
  parser.add_argument("--only", choices=("fashion", "efficientnet"))
  args = parser.parse_args(argv)
  work = args.work or tempfile.mkdtemp(prefix="onnx-parity-")
  print(f"load average before: {os.getloadavg()[0]:.1f}; serving with "
        f"{args.serve_python}")
  print("| export | adopted with | images | top-1 agreement | not near "
        "ties (rows) | max confidence difference | batch |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  worst = 1.0
  for folder_name, export, flags in EXPORTS:
    if args.only and not folder_name.startswith(args.only):
      continue
    folder = os.path.join(args.models, folder_name)
    source = os.path.join(folder, export + ".onnx")
    if not os.path.exists(source):
      print(f"| {export} | missing: {source} | | | | | |")
      continue
    images, class_names = (value.format(folder=folder, data=args.data)
                           for value in IMAGES[folder_name])
    flags = [flag.format(folder=folder) for flag in flags]
    card, rows = serve(source, flags, images, class_names, work, export,
                        args.serve_python)
    author = np.load(os.path.join(folder, "predictions.npz"))
    shown = [os.path.basename(f) if f.startswith(folder) else f
             for f in flags]
    worst = min(worst, _row(export, shown, card, rows,
                            os.path.abspath(images), author))
  print(f"load average after: {os.getloadavg()[0]:.1f}; work in {work}")
  return 0 if worst >= 0.99 else 1


if __name__ == "__main__":
  sys.exit(main())
