"""Issue 28's acceptance pass: ONNX files a new PyTorch user makes, adopted
and served as they would, against PyTorch's own forward.

Usage:
  python -m benchmarks.onnx_acceptance [--torch_python TORCH_VENV/bin/python]
      [--data ../shared/data] [--per_class 8] [--work DIR]
      [--serve_python .venv-slim/bin/python] [--models resnet18,...]

Copies a few dozen flower photos (--per_class of each class), has
benchmarks/pytorch/acceptance_models.py make the exports in the torch venv
(random-weight torchvision nets, BatchNorm measured on the photos; the
default torch.onnx.export call, dynamic batch, TorchScript opsets, fp16,
QDQ int8, and hostile files), then adopts each with model.adopt and serves
it with beam_jobs.predict (onnx_parity.serve), and prints one row per
export: top-1 agreement with PyTorch's float32 forward through
torchvision's transforms, the largest probability difference from it and
from ONNX Runtime's forward of the same file on the same tensors, and the
result. A hostile file passes when it is refused in one line (exit 2, no
traceback) or, where it can be, served like the others. Exit 1 if any row
fails.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks import onnx_parity

REPO = onnx_parity.REPO
MAKER = os.path.join(REPO, "benchmarks", "pytorch", "acceptance_models.py")
# Served probabilities within this of ONNX Runtime's on the same tensors
# are the same answer (the decoders' float32 sums differ in the last bits).
SAME_FILE = 1e-3


def copy_images(data: str, per_class: int, dest: str) -> str:
  """The first `per_class` photos of each flower class, copied."""
  source = os.path.join(data, "flowers")
  for name in sorted(os.listdir(source)):
    os.makedirs(os.path.join(dest, name))
    for photo in sorted(os.listdir(os.path.join(source, name)))[:per_class]:
      shutil.copy(os.path.join(source, name, photo),
                  os.path.join(dest, name, photo))
  return dest


def refused_row(record: dict, work: str) -> tuple:
  """(agreement cells, passed) for a file that must be refused."""
  done = onnx_parity.adopt(record["path"], record["flags"],
                           os.path.join(work, "classes.txt"),
                           os.path.join(work, record["export"] + "_model"))
  lines = done.stderr.strip().splitlines()
  passed = (done.returncode == 2 and len(lines) == 1 and
            "Traceback" not in done.stderr)
  said = (lines[-1].replace("model.adopt: error: ", "")[:200] if lines
          else "(nothing said)")
  return ["", "", "", "", f"refused, exit {done.returncode}: {said}"], passed


def served_row(record: dict, work: str, images: str,
               serve_python: str) -> tuple:
  """(agreement cells, passed) for a file adopted and served."""
  folder = os.path.dirname(record["path"])
  name = f"{record['model']}_{record['export']}"
  try:
    card, rows = onnx_parity.serve(record["path"], record["flags"], images,
                                   os.path.join(work, "classes.txt"), work,
                                   name, serve_python)
  except RuntimeError as error:
    return ["", "", "", "", f"FAILED: {error}"[:200]], False
  author = np.load(os.path.join(folder, "author.npz"))
  ids = [os.path.join(images, path) for path in author["paths"]]
  missing = [i for i in ids if i not in rows]
  if missing:
    return ["", "", "", "", f"FAILED: {len(missing)} not served"], False
  served = np.array([rows[i]["probabilities"] for i in ids], np.float64)
  torch_p, ort_p = author["torch"], author["ort"]
  agree = served.argmax(1) == torch_p.argmax(1)
  top_two = np.sort(torch_p, axis=1)[:, -2:]
  clear = top_two[:, 1] - top_two[:, 0] > onnx_parity.NEAR_TIE
  versus_torch = np.abs(served - torch_p).max()
  versus_file = np.abs(served - ort_p).max()
  file_agree = (served.argmax(1) == ort_p.argmax(1)).mean()
  passed = versus_file <= SAME_FILE and file_agree == 1.0
  batch = card["adopted"]["onnx"]["batch"]
  return [f"{agree.mean():.3f} ({len(ids)}); {agree[clear].mean():.3f} "
          f"({clear.sum()})", f"{versus_torch:.1e}",
          f"{versus_file:.1e}", batch,
          "ok" if passed else "FAILED: differs from its own file"], passed


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--torch_python", default=os.environ.get(
      "TORCH_VENV", "/work/bench/torch-venv") + "/bin/python")
  parser.add_argument("--data", default=os.path.join(REPO, "..", "shared",
                                                     "data"))
  parser.add_argument("--per_class", type=int, default=8)
  parser.add_argument("--work", default=None)
  parser.add_argument("--serve_python", default=sys.executable)
  parser.add_argument("--models", default=None,
                      help="architectures, comma-separated (default: all "
                      "but vit_b_16)")
  args = parser.parse_args(argv)
  work = args.work or tempfile.mkdtemp(prefix="onnx-acceptance-")
  shutil.rmtree(os.path.join(work, "images"), ignore_errors=True)
  images = copy_images(args.data, args.per_class,
                       os.path.join(work, "images"))
  with open(os.path.join(work, "classes.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(f"class_{i}" for i in range(10)) + "\n")
  subprocess.run([args.torch_python, MAKER, "--images", images, "--out",
                  os.path.join(work, "models")] +
                 (["--models", args.models] if args.models else []),
                 check=True)
  with open(os.path.join(work, "models", "exports.json"),
            encoding="utf-8") as handle:
    records = json.load(handle)
  print(f"serving with {args.serve_python}; work in {work}")
  print("| model | export | top-1 vs PyTorch (images); not near ties "
        "(images) | max prob diff vs PyTorch | vs ONNX Runtime, same file | "
        "batch | result |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  failed = 0
  for record in records:
    if record.get("expect") == "refused":
      cells, passed = refused_row(record, work)
    else:
      cells, passed = served_row(record, work, images, args.serve_python)
    failed += not passed
    print(f"| {record['model']} | {record['export']} | "
          + " | ".join(str(c) for c in cells) + " |", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
