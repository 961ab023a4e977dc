"""The `tensorflow` decoder recipe without TensorFlow, against TensorFlow.

Usage:
  python -m benchmarks.decoder_parity [--flowers ../shared/data/flowers]
      [--repeats 3] [--enlarged 512]

Every photo of the flowers folder goes through both decoders as the
pipeline calls them, in batches of 256: `ours` is model/keras_decoding.py
(what `BatchDecoder("tensorflow", ...)` runs), `tensorflow` is
tests/tf_reference.py (`tf.image.decode_image` and `tf.image.resize` in one
traced call per batch, what the recipe ran before). For each size (each
photo's own, 224x224 and 180x180) and colour mode the table gives the share
of output values that are equal, the largest absolute difference, and the
median over --repeats passes of microseconds per image for each decoder
(the two decoders' passes alternate, so both see the same load on a shared
machine). The process is pinned to one core and TensorFlow to one thread, so the
times are per-core costs. --enlarged adds that many photos re-encoded at
500x375 (JPEG quality 90, made in memory), the W4 workload's shape.
"""

import argparse
import collections
import os
import statistics
import time

import numpy as np

from benchmarks import decoders as decoders_benchmark

BATCH = decoders_benchmark.BATCH


class _Reference:
  """tests/tf_reference.TensorFlowDecoder per size, with BatchDecoder's
  `decode` contract (it raises on a bad image; these photos have none)."""

  def __init__(self, height, width, color_mode):
    from tests import tf_reference  # pylint: disable=import-outside-toplevel
    self._decoder = tf_reference.TensorFlowDecoder(height, width, color_mode)

  def decode(self, payloads):
    return (self._decoder.decode_batch(payloads), list(range(len(payloads))),
            [])


def _own_sizes(payloads):
  """Payloads grouped by their (height, width)."""
  import simplejpeg  # pylint: disable=import-outside-toplevel
  groups = collections.defaultdict(list)
  for data in payloads:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    groups[(height, width)].append(data)
  return groups


def _compare(ours, reference, payloads):
  """(values equal, values compared, largest absolute difference)."""
  equal = total = 0
  largest = 0.0
  for start in range(0, len(payloads), BATCH):
    batch = payloads[start:start + BATCH]
    mine, good, errors = ours.decode(batch)
    expected, _, _ = reference.decode(batch)
    assert not errors and len(good) == len(batch), errors[:1]
    equal += int(np.count_nonzero(mine == expected))
    total += mine.size
    largest = max(largest, float(np.abs(mine - expected).max()))
  return equal, total, largest


def _time_both(decoders: dict, payloads: list, repeats: int) -> dict:
  """Median seconds per image of each decoder, their passes interleaved so
  that both see the same load on a shared machine."""
  passes = {name: [] for name in decoders}
  for name, decoder in decoders.items():
    decoder.decode(payloads[:BATCH])  # Warm-up (tracing, caches).
  for _ in range(repeats):
    for name, decoder in decoders.items():
      started = time.perf_counter()
      for start in range(0, len(payloads), BATCH):
        decoder.decode(payloads[start:start + BATCH])
      passes[name].append((time.perf_counter() - started) / len(payloads))
  return {name: statistics.median(times) for name, times in passes.items()}


def _rows(groups, color_mode, size, repeats):
  """One table row: parity and timing over every group of payloads."""
  from model import preprocessing  # pylint: disable=import-outside-toplevel
  equal = total = 0
  largest = 0.0
  seconds = {"ours": 0.0, "tensorflow": 0.0}
  images = 0
  for (height, width), payloads in groups.items():
    target = (height, width) if size is None else (size, size)
    ours = preprocessing.BatchDecoder("tensorflow", *target, color_mode)
    reference = _Reference(*target, color_mode)
    same, compared, worst = _compare(ours, reference, payloads)
    equal, total, largest = equal + same, total + compared, max(largest,
                                                                 worst)
    for name, per_image in _time_both(
        {"ours": ours, "tensorflow": reference}, payloads, repeats).items():
      seconds[name] += per_image * len(payloads)
    images += len(payloads)
  return (images, equal, total, largest, seconds["ours"] / images,
          seconds["tensorflow"] / images)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.decoder_parity",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--flowers", default=decoders_benchmark.FLOWERS)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--enlarged", type=int, default=512,
                      help="photos re-encoded at 500x375 (0: none)")
  args = parser.parse_args(argv)
  core = decoders_benchmark._one_core()  # pylint: disable=protected-access
  decoders_benchmark.one_thread_tensorflow()
  photos = decoders_benchmark._photos(args.flowers, 1 << 30)  # pylint: disable=protected-access
  workloads = [("flowers", photos)]
  if args.enlarged:
    workloads.append(("flowers at 500x375 q90", decoders_benchmark.enlarged(
        photos[::max(1, len(photos) // args.enlarged)][:args.enlarged])))
  load = os.getloadavg()
  print(f"{len(photos)} flower photos; {args.repeats} timed passes (median);"
        f" core {core}, TensorFlow on 1 thread; load average at start "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} "
        "cores")
  print()
  print("| images | size | colour | values equal | max abs diff | "
        "ours us/image | tensorflow us/image | ours / tensorflow |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  started = time.perf_counter()
  for name, payloads in workloads:
    groups = _own_sizes(payloads)
    for size in (None, 224, 180):
      for color_mode in ("rgb", "grayscale"):
        images, equal, total, largest, ours, reference = _rows(
            groups, color_mode, size, args.repeats)
        shown = "own" if size is None else f"{size}x{size}"
        print(f"| {name} ({images}) | {shown} | {color_mode} | "
              f"{100 * equal / total:.4f}% of {total:,} | {largest:g} | "
              f"{ours * 1e6:.0f} | {reference * 1e6:.0f} | "
              f"{ours / reference:.2f} |", flush=True)
  load = os.getloadavg()
  print()
  print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f};"
        f" {time.perf_counter() - started:.0f} s")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
