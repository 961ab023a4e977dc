"""Levers for realistic photos (W4), each timed and checked for agreement.

Usage:
  python -m benchmarks.levers --model DIR [--images 512] [--repeats 3]
      [--flowers ../shared/data/flowers]

DIR is W4's adopted MobileNetV2 (benchmarks/workloads.py makes it under
--work as mobilenet_v2-tensorflow). Photos: the flowers enlarged to 500x375
(W4's) and to 1000x750, JPEG quality 90, made in memory. Per image, on one
core (the process is pinned; TensorFlow and TFLite on one thread):

  decode  the card's two decoders as the pipeline calls them (BatchDecoder):
          pillow (full decode, antialiased bilinear resize) and tensorflow
          (Keras' recipe); and pillow with DCT-domain downscaling (Pillow's
          `draft`), which only acts when the photo is at least twice the
          model input on both sides;
  model   TFLite on one thread, per image at batch 256;
  overlap one worker decoding batch k+1 in a thread while the model runs
          batch k, against doing the two in turn; this needs a second core.

Agreement is the card's: the share of images whose top-1 class is the same
as with the full decode of the same decoder (export.MIN_TFLITE_AGREEMENT,
99.9%, is the bar a conversion must pass), and the largest probability gap.
"""

import argparse
import concurrent.futures
import os
import statistics
import time

import numpy as np

from benchmarks import decoders
from model import card as card_lib
from model import engines
from model import export
from model import image_limits
from model import preprocessing

BATCH = 256


class DraftDecoder:
  """The pipeline's Pillow decoder with one change: right after the header is
  read, Pillow's `draft` lets the JPEG decoder drop the detail of a 1/2, 1/4
  or 1/8 scale that still covers the model input (it never goes below it, so
  it acts only on photos at least twice the input on both sides)."""

  def __init__(self, height, width, color_mode):
    self._size = (width, height)
    self._mode = {"grayscale": "L", "rgb": "RGB"}[color_mode]
    self._decoder = preprocessing.BatchDecoder("pillow", height, width,
                                               color_mode)
    self.drafted = self.seen = 0

  def decode(self, payloads):
    original = image_limits.open_checked

    def drafted(data, max_pixels):
      image = original(data, max_pixels)
      size = image.size
      image.draft(self._mode, self._size)
      self.seen += 1
      self.drafted += image.size != size
      return image

    # decode_image looks open_checked up at call time: only the draft differs.
    image_limits.open_checked = drafted
    try:
      return self._decoder.decode(payloads)
    finally:
      image_limits.open_checked = original


def _per_image_us(function, payloads, repeats):
  """Median over `repeats` passes of CPU microseconds per image."""
  function(payloads[:8])
  passes = []
  for _ in range(repeats):
    started = time.process_time()
    for start in range(0, len(payloads), BATCH):
      function(payloads[start:start + BATCH])
    passes.append((time.process_time() - started) / len(payloads) * 1e6)
  return statistics.median(passes)


def _decode_all(decoder, payloads):
  return np.concatenate([decoder.decode(payloads[i:i + BATCH])[0]
                         for i in range(0, len(payloads), BATCH)])


def _agreement(engine, reference, other):
  a, b = engine.probabilities(reference), engine.probabilities(other)
  return (float((a.argmax(1) == b.argmax(1)).mean()),
          float(np.abs(a - b).max()))


def overlap(decoder, engine, payloads, repeats):
  """(in turns, overlapped) wall microseconds per image for one worker."""

  def in_turns():
    for start in range(0, len(payloads), BATCH):
      engine.probabilities(decoder.decode(payloads[start:start + BATCH])[0])

  def overlapped():
    starts = range(0, len(payloads), BATCH)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = pool.submit(decoder.decode, payloads[:BATCH])
      for start in starts:
        pixels = pending.result()[0]
        if start + BATCH < len(payloads):
          pending = pool.submit(decoder.decode,
                                payloads[start + BATCH:start + 2 * BATCH])
        engine.probabilities(pixels)

  figures = []
  for run in (in_turns, overlapped):
    walls = []
    for _ in range(repeats):
      started = time.perf_counter()
      run()
      walls.append((time.perf_counter() - started) / len(payloads) * 1e6)
    figures.append(statistics.median(walls))
  return figures


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m benchmarks.levers",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True,
                      help="W4's adopted model folder")
  parser.add_argument("--flowers", default=decoders.FLOWERS)
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  cores = sorted(os.sched_getaffinity(0))
  decoders.one_thread_tensorflow()

  card = card_lib.load_card(args.model)
  engine = engines.TFLiteEngine(
      card, os.path.join(args.model, card_lib.TFLITE_FILE), threads=1)
  size = (card.height, card.width, card.color_mode)
  photos = decoders._photos(args.flowers, args.images)  # pylint: disable=protected-access
  sets = {"500x375": decoders.enlarged(photos),
          "1000x750": decoders.enlarged(photos, (1000, 750))}
  kinds = {"pillow": preprocessing.BatchDecoder("pillow", *size),
           "pillow + draft": DraftDecoder(*size),
           "tensorflow": preprocessing.BatchDecoder("tensorflow", *size)}
  load = os.getloadavg()[0]
  print(f"{args.images} photos per size, model input {card.width}x"
        f"{card.height}, {args.repeats} passes; load average {load:.2f} on "
        f"{os.cpu_count()} cores\n")
  os.sched_setaffinity(0, {cores[0]})
  print("| photos | decoder | decode µs/image (1 core) | top-1 agreement with "
        "the full decode | largest probability gap |")
  print("| --- | --- | --- | --- | --- |")
  for name, payloads in sets.items():
    full = {kind: _decode_all(decoder, payloads)
            for kind, decoder in kinds.items()}
    for kind, decoder in kinds.items():
      cost = _per_image_us(decoder.decode, payloads, args.repeats)
      reference = "tensorflow" if kind == "tensorflow" else "pillow"
      agree, gap = _agreement(engine, full[reference], full[kind])
      against = ""
      if kind == "pillow + draft":
        against = (f" (vs pillow; draft acted on "
                   f"{decoder.drafted / max(1, decoder.seen):.0%})")
        decoder.drafted = decoder.seen = 0
      print(f"| {name} | {kind} | {cost:.0f} | {agree:.2%}{against} | "
            f"{gap:.2e} |")
    agree, gap = _agreement(engine, full["pillow"], full["tensorflow"])
    print(f"| {name} | tensorflow vs pillow | | {agree:.2%} | {gap:.2e} |")
  model_us = _per_image_us(
      lambda batch: engine.probabilities(np.zeros(
          (len(batch),) + tuple(card.input_shape), np.float32)),
      sets["500x375"], args.repeats)
  print(f"\nmodel (TFLite, 1 thread, batch {BATCH}): {model_us:.0f} µs/image "
        f"on one core; the agreement bar is {export.MIN_TFLITE_AGREEMENT:.1%}")
  os.sched_setaffinity(0, set(cores))
  print(f"\nOverlap, one worker with {len(cores)} cores (wall µs per image, "
        "500x375):\n")
  print("| decoder | decode then model | decode next batch while the model "
        "runs | gain |")
  print("| --- | --- | --- | --- |")
  for kind in ("pillow", "tensorflow"):
    turns, overlapped = overlap(kinds[kind], engine, sets["500x375"],
                                args.repeats)
    print(f"| {kind} | {turns:.0f} | {overlapped:.0f} | "
          f"{turns / overlapped:.2f}x |")
  print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
