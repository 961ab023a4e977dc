"""What a worker pays before its first batch: install size and import time.

Usage:
  python -m benchmarks.worker_startup --model MODEL_DIR [--repeats 5] \
      [--venv .venv-slim] [--venv .venv] ...

For each virtual environment: its size on disk (du), then, in a fresh
interpreter each time, the wall seconds to import what a worker imports to
serve (the pipeline's modules) and load the model folder with each engine
the environment can run, plus the modules that brought in and whether
TensorFlow was among them. Medians of --repeats. Prints a Markdown table.
"""

import argparse
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


def probe(python: str, model: str, engine: str) -> tuple:
  result = subprocess.run(
      [python, "-c", PROBE, model, engine], cwd=REPO, capture_output=True,
      text=True, check=True,
      env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2"))
  seconds, modules, tensorflow = result.stdout.split()
  return float(seconds), int(modules), bool(int(tensorflow))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True,
                      help="a model folder with model.tflite and model.keras")
  parser.add_argument("--venv", action="append",
                      help="a virtual environment to measure (repeatable)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  venvs = args.venv or [os.path.join(REPO, ".venv-slim"),
                        os.path.join(REPO, ".venv")]
  print(f"load average before: {os.getloadavg()[0]:.1f}")
  print("| environment | size MiB | engine | import + load s (median) | "
        "modules | TensorFlow imported |")
  print("| --- | --- | --- | --- | --- | --- |")
  for venv in venvs:
    python = os.path.join(venv, "bin", "python")
    size = du_mib(venv)
    engines = ["tflite"] + (["keras"] if has_tensorflow(python) else [])
    for engine in engines:
      runs = [probe(python, args.model, engine) for _ in range(args.repeats)]
      seconds = statistics.median(run[0] for run in runs)
      print(f"| {os.path.basename(venv.rstrip('/'))} | {size:.0f} | {engine} "
            f"| {seconds:.2f} | {runs[-1][1]} | "
            f"{'yes' if runs[-1][2] else 'no'} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
