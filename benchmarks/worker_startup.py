"""What a worker pays before its first batch: install size and import time.

Usage:
  python -m benchmarks.worker_startup --model MODEL_DIR [--model DIR ...] \
      [--repeats 5] [--venv .venv-slim] [--venv .venv] ... \
      [--first_batch IMAGE] [--code CHECKOUT]

For each virtual environment: its size on disk (du), then, in a fresh
interpreter each time, the wall seconds to import what a worker imports to
serve (the pipeline's modules) and load each model folder with each engine
its card lists that the environment can run (keras and savedmodel need
TensorFlow), plus the modules that brought in and whether TensorFlow was
among them. With --first_batch IMAGE the probe also decodes that image with
the card's decoder, as a worker's first batch does (the card's decoder may
import what the model load did not). --code runs another checkout's
pipeline, for a before/after. Medians of --repeats. Prints a Markdown
table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the measured interpreter: imports what a worker imports, loads the
# model, and reports the time and the modules.
PROBE = """
import sys, time
started = time.perf_counter()
import beam_jobs.pipeline, beam_jobs.sources.images, beam_jobs.preprocess
from beam_jobs.inference import ImageClassifierHandler
engine = ImageClassifierHandler(sys.argv[1], sys.argv[2], 1).load_model()
if len(sys.argv) > 3:
  # The first batch's decode: the card's decoder on one image (code from
  # before card_decoder builds a BatchDecoder the same way).
  from model import card as card_lib, preprocessing
  card = card_lib.load_card(sys.argv[1])
  if hasattr(preprocessing, "card_decoder"):
    decoder = preprocessing.card_decoder(card)
  else:
    decoder = preprocessing.BatchDecoder(card.decoder, card.height,
                                         card.width, card.color_mode)
  with open(sys.argv[3], "rb") as handle:
    pixels, good, _ = decoder.decode([handle.read()])
  assert good == [0]
seconds = time.perf_counter() - started
tensorflow = any(name.split(".")[0] in ("tensorflow", "keras")
                 for name in sys.modules)
print(f"{seconds:.3f} {len(sys.modules)} {int(tensorflow)}")
"""


def du_mib(path: str) -> float:
  output = subprocess.run(["du", "-sk", path], capture_output=True, text=True,
                          check=True).stdout
  return int(output.split()[0]) / 1024


def has_tensorflow(python: str) -> bool:
  return subprocess.run([python, "-c", "import tensorflow"],
                        capture_output=True, check=False).returncode == 0


def card_engines(model: str) -> list:
  """The engines a model folder's card lists, fastest first."""
  with open(os.path.join(model, "model_card.json"), encoding="utf-8") as handle:
    listed = json.load(handle)["engines"]
  return [engine for engine in ("tflite", "onnx", "keras", "savedmodel")
          if engine in listed]


def probe(python: str, model: str, engine: str, image: str = "",
          code: str = REPO) -> tuple:
  result = subprocess.run(
      [python, "-c", PROBE, model, engine] + ([image] if image else []),
      cwd=code, capture_output=True, text=True, check=True,
      env=dict(os.environ, PYTHONPATH=code, TF_CPP_MIN_LOG_LEVEL="2"))
  seconds, modules, tensorflow = result.stdout.split()
  return float(seconds), int(modules), bool(int(tensorflow))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, action="append",
                      help="a model folder (repeatable), measured with each "
                      "engine its card lists")
  parser.add_argument("--venv", action="append",
                      help="a virtual environment to measure (repeatable)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--first_batch", default="",
                      help="an image: also decode it with the card's decoder, "
                      "as a worker's first batch does")
  parser.add_argument("--code", default=REPO,
                      help="the checkout whose pipeline is imported (an "
                      "earlier commit's worktree, for a before/after)")
  args = parser.parse_args(argv)
  venvs = args.venv or [os.path.join(REPO, ".venv-slim"),
                        os.path.join(REPO, ".venv")]
  print(f"code: {args.code}; load average before: "
        f"{os.getloadavg()[0]:.1f}")
  print("| environment | size MiB | model | engine | import + load s "
        "(median) | modules | TensorFlow imported |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for venv in venvs:
    python = os.path.join(venv, "bin", "python")
    size = du_mib(venv)
    tensorflow = has_tensorflow(python)
    for model in args.model:
      for engine in card_engines(model):
        if engine in ("keras", "savedmodel") and not tensorflow:
          continue
        runs = [probe(python, model, engine, args.first_batch, args.code)
                for _ in range(args.repeats)]
        seconds = statistics.median(run[0] for run in runs)
        print(f"| {os.path.basename(venv.rstrip('/'))} | {size:.0f} | "
              f"{os.path.basename(model.rstrip('/'))} | {engine} | "
              f"{seconds:.2f} | {runs[-1][1]} | "
              f"{'yes' if runs[-1][2] else 'no'} |", flush=True)
  print(f"load average after: {os.getloadavg()[0]:.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
