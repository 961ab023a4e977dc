"""What a pretrained backbone costs here: training epochs and serving.

Usage:
  python -m benchmarks.backbones --data ../shared/data/flowers \\
      [--image_size 128] [--work /tmp/bench_backbones] [--backbones ...]

For each backbone, `python -m model.train --backbone NAME --weights none`
trains three head epochs and three fine-tuning epochs and exports the model,
as a user runs it. Each phase's figure is the median of its last two epochs
(the first also traces the graph). Random weights cost what ImageNet weights cost, but
they learn nothing: a random backbone's features vanish in inference mode,
so its accuracy is chance and is not printed. The exported TFLite
model is then timed on one thread, the way the pipeline serves it with
`--inference_threads 1`.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np

from model import backbones as backbones_lib
from model import card as card_lib
from model import engines

# Keras' per-epoch line at verbose=2: "86/86 - 45s - 523ms/step - ...".
EPOCH_LINE = re.compile(r"^(\d+)/\1 - (\d+)s - ")
EPOCHS = 3  # per phase


def train_and_time(name: str, data: str, image_size: int, out: str) -> list:
  """Runs the CLI and returns the seconds of each of its six epochs."""
  command = [sys.executable, "-m", "model.train", "--data", data, "--output",
             out, "--backbone", name, "--weights", "none", "--image_size",
             str(image_size), "--epochs", str(EPOCHS), "--fine_tune_epochs",
             str(EPOCHS)]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
  seconds = [int(match.group(2)) for match in
             map(EPOCH_LINE.match, (result.stdout + result.stderr).splitlines())
             if match]
  if len(seconds) != 2 * EPOCHS:
    raise RuntimeError(f"expected {2 * EPOCHS} epoch lines from {name}, got "
                       f"{seconds}")
  return seconds


def tflite_ms_per_image(model_dir: str, batch: int = 64,
                        repeats: int = 11) -> float:
  """Median milliseconds per image of the exported TFLite model, one thread."""
  card = card_lib.load_card(model_dir)
  engine = engines.load_engine(model_dir, "tflite", threads=1, card=card)
  images = np.random.default_rng(0).uniform(
      0, 255, (batch, card.height, card.width, card.channels)).astype(np.float32)
  engine.probabilities(images)  # allocate tensors
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    engine.probabilities(images)
    times.append(time.perf_counter() - started)
  return statistics.median(times) / batch * 1000


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--data", required=True, help="folder of class folders")
  parser.add_argument("--image_size", type=int, default=128)
  parser.add_argument("--work", default="/tmp/bench_backbones")
  parser.add_argument("--backbones", nargs="+",
                      default=list(backbones_lib.BACKBONES))
  args = parser.parse_args(argv)
  print(f"load average before: {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} cores")
  print("| backbone | input | head epoch s | fine-tune epoch s | "
        "TFLite ms/image (1 thread) | model.tflite MB | load average |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for name in args.backbones:
    out = os.path.join(args.work, name)
    seconds = train_and_time(name, args.data, args.image_size, out)
    size = os.path.getsize(os.path.join(out, card_lib.TFLITE_FILE)) / 2**20
    head = statistics.median(seconds[1:EPOCHS])
    fine_tune = statistics.median(seconds[EPOCHS + 1:])
    print(f"| {name} | {args.image_size}x{args.image_size} | {head:g} | "
          f"{fine_tune:g} | {tflite_ms_per_image(out):.2f} | {size:.1f} | "
          f"{os.getloadavg()[0]:.1f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
