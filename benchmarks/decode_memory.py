"""Peak memory of decoding one large image, in a fresh process per case.

Each case decodes one image with model.preprocessing.decode_image to the
model size and reports the process's peak RSS above its RSS once everything
is imported and the file read (Linux: the peak is reset through
/proc/self/clear_refs, then read as VmHWM), median over --repeats.

  python -m benchmarks.decode_memory --repeats 3
"""

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

SIDE = 9400  # 88.4 MP: under Pillow's and the pipeline's default pixel limit


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def make_cases(folder: str) -> dict:
  """Large images that compress to little: gradients and flat colours."""
  ramp = np.linspace(0, 65535, SIDE, dtype=np.uint32).astype(np.uint16)
  wide = np.broadcast_to(ramp, (SIDE, SIDE))
  cases = {
      "16-bit grey PNG": _save(Image.fromarray(np.ascontiguousarray(wide)),
                               "PNG"),
      "RGBA PNG": _save(Image.new("RGBA", (SIDE, SIDE), (10, 200, 30, 128)),
                        "PNG"),
      "RGB JPEG": _save(Image.new("RGB", (SIDE, SIDE), (10, 200, 30)), "JPEG"),
      "palette PNG": _save(Image.new("P", (SIDE, SIDE), 3), "PNG"),
  }
  paths = {}
  for name, data in cases.items():
    path = os.path.join(folder, name.replace(" ", "_"))
    with open(path, "wb") as handle:
      handle.write(data)
    paths[name] = (path, len(data))
  return paths


def measure(path: str, size: int, mode: str) -> None:
  """Runs in the child: prints the peak RSS added by one decode, in MB."""
  from model import preprocessing  # pylint: disable=import-outside-toplevel
  with open(path, "rb") as handle:
    data = handle.read()
  with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # The peak RSS starts again from the current RSS.
  base = _status_kb("VmRSS")
  preprocessing.decode_image(data, size, size, mode)
  print((_status_kb("VmHWM") - base) / 1024)


def _status_kb(field: str) -> int:
  with open("/proc/self/status") as handle:
    for line in handle:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  folder = tempfile.mkdtemp(prefix="decode-memory-")
  print(f"{SIDE}x{SIDE} images, peak RSS added by one decode (MB), "
        f"median of {args.repeats}")
  print(f"{'image':18} {'file KB':>8} {'to 28x28 grey':>14} {'to 64x64 RGB':>13}")
  for name, (path, length) in make_cases(folder).items():
    cells = []
    for size, mode in ((28, "grayscale"), (64, "rgb")):
      runs = [float(subprocess.run(
          [sys.executable, "-m", "benchmarks.decode_memory", "--child", path,
           str(size), mode], capture_output=True, text=True, check=True,
          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
      ).stdout.split()[-1]) for _ in range(args.repeats)]
      cells.append(statistics.median(runs))
    print(f"{name:18} {length / 1024:8.0f} {cells[0]:14.0f} {cells[1]:13.0f}")


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    measure(sys.argv[2], int(sys.argv[3]), sys.argv[4])
  else:
    main()
