"""The card's two decoders, per image on one thread: Pillow against TensorFlow.

Usage:
  python -m benchmarks.decoders [--flowers ../shared/data/flowers]
      [--images 512] [--repeats 5]

Both run as the pipeline runs them, through `preprocessing.BatchDecoder` on
batches of 256: `pillow` (this project's decoder: Pillow, EXIF, antialiased
bilinear resize, uint8) and `tensorflow` (Keras' image_dataset_from_directory
recipe as model/keras_decoding.py gives it without TensorFlow; float32;
benchmarks/decoder_parity.py times it against TensorFlow's own). The
process is pinned to one core, so the figures are per-core costs. Workloads: the
flower photos (128x128 JPEGs) to 64x64, and the same photos enlarged to
500x375 and saved as JPEG quality 90 (made here, in memory) to 64x64 and to
224x224. Each figure is the median over --repeats passes of microseconds
per image.
"""

import argparse
import glob
import io
import os
import statistics
import time

from PIL import Image

BATCH = 256
FLOWERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "..", "shared", "data", "flowers")


def _one_core() -> int:
  core = min(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {core})
  return core


def _photos(folder: str, count: int) -> list:
  files = sorted(glob.glob(os.path.join(folder, "*", "*.jpg")))
  if not files:
    raise SystemExit(f"no JPEG files in class folders under {folder}")
  # Every class, not just the first: a stride over the sorted list.
  files = files[::max(1, len(files) // count)][:count]
  payloads = []
  for path in files:
    with open(path, "rb") as handle:
      payloads.append(handle.read())
  return payloads


def enlarged(payloads: list, size=(500, 375), quality=90) -> list:
  """Photos re-encoded as larger JPEGs (bicubic), like a camera's photos."""
  out = []
  for data in payloads:
    image = Image.open(io.BytesIO(data)).convert("RGB").resize(
        size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    out.append(buffer.getvalue())
  return out


def one_thread_tensorflow():
  """TensorFlow on one thread, so its figures are per-core costs."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)


def time_decoder(decoder, payloads: list, repeats: int) -> float:
  """Median microseconds per image over `repeats` passes (after a warm-up)."""
  decoder.decode(payloads[:BATCH])
  passes = []
  for _ in range(repeats):
    started = time.perf_counter()
    decoded = 0
    for start in range(0, len(payloads), BATCH):
      _, good, errors = decoder.decode(payloads[start:start + BATCH])
      assert not errors, errors[:1]
      decoded += len(good)
    passes.append((time.perf_counter() - started) / decoded * 1e6)
  return statistics.median(passes)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.decoders",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--flowers", default=FLOWERS)
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  core = _one_core()
  one_thread_tensorflow()
  from model import preprocessing  # pylint: disable=import-outside-toplevel

  photos = _photos(args.flowers, args.images)
  large = enlarged(photos)
  load = os.getloadavg()
  print(f"{len(photos)} images per workload, {args.repeats} passes, core "
        f"{core}, TensorFlow on 1 thread; load average at start "
        f"{load[0]:.2f} on {os.cpu_count()} cores")
  print()
  print("| workload | size | pillow us/image | tensorflow us/image | "
        "tensorflow / pillow |")
  print("| --- | --- | --- | --- | --- |")
  for name, payloads, size in (
      ("flowers, 128x128 JPEG", photos, 64),
      ("500x375 JPEG q90", large, 64),
      ("500x375 JPEG q90", large, 224)):
    figures = {}
    for decoder in preprocessing.DECODERS:
      figures[decoder] = time_decoder(
          preprocessing.BatchDecoder(decoder, size, size, "rgb"), payloads,
          args.repeats)
    print(f"| {name} | {size}x{size} | {figures['pillow']:.0f} | "
          f"{figures['tensorflow']:.0f} | "
          f"{figures['tensorflow'] / figures['pillow']:.2f} |")
  load = os.getloadavg()
  print()
  print(f"load average at the end {load[0]:.2f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
