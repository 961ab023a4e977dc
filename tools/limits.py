"""The limits a query runs under (time, rows, memory, threads), their
defaults, and the flag types that check them.

Every limit flag of tools.query and tools.report is checked as it is parsed,
so a value that would turn a limit off (`--timeout 0`, `inf`, `nan`) or
means nothing (`--max_rows -2`) is refused in one line with exit 2.
"""

import argparse
import math
import os
import re
import sys
import threading

DEFAULT_TIMEOUT_SECONDS = 300
DEFAULT_MAX_ROWS = 10000
# DuckDB's memory by default: a quarter of the machine's (or the container's)
# memory, at most 4 GB.
MAX_DEFAULT_MEMORY_BYTES = 4 * 1000**3
_MEMORY_UNITS = {"": None, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
                 "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
                 "tib": 1024**4}
_MEMORY = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
# What a command may use besides DuckDB's own memory: Python, Arrow, the
# rows it prints, and the report's images and figures.
HEADROOM_BYTES = 1000**3
# DuckDB cannot run a query in less.
MIN_MEMORY_BYTES = 16 * 1024**2
# cgroup v2 and v1: a container's memory, when it has a limit of its own.
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max",
                  "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_memory_bytes() -> int:
  """The memory this process may use: the machine's, or its container's
  limit when that is smaller."""
  try:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    total = 4 * MAX_DEFAULT_MEMORY_BYTES
  for path in _CGROUP_LIMITS:
    try:
      with open(path, encoding="ascii") as handle:
        text = handle.read(64).strip()
    except OSError:
      continue
    if text.isdigit() and 0 < int(text) < total:
      total = int(text)
  return total


def default_memory_limit() -> int:
  return max(MIN_MEMORY_BYTES,
             min(machine_memory_bytes() // 4, MAX_DEFAULT_MEMORY_BYTES))


def default_threads() -> int:
  """The cores this process may run on."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except (AttributeError, OSError):
    return max(1, os.cpu_count() or 1)


def positive_seconds(text: str) -> float:
  """A --timeout: a finite number of seconds above 0."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not math.isfinite(value) or value <= 0:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a finite number of seconds above 0")
  return value


def finite_number(text: str) -> float:
  """A finite number, such as --below."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
  return value


def positive_count(text: str) -> int:
  """A whole number of at least 1, such as --max_rows or --limit."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a whole number") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text!r} is below 1")
  return value


def memory_size(text: str) -> int:
  """A --memory_limit such as 4GB, 512MB or 2GiB, in bytes."""
  match = _MEMORY.fullmatch(text)
  unit = _MEMORY_UNITS.get(match.group(2).lower()) if match else None
  if unit is None:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a size with a unit, such as 4GB, 512MB or 2GiB")
  value = float(match.group(1)) * unit
  if not math.isfinite(value) or value < MIN_MEMORY_BYTES:
    raise argparse.ArgumentTypeError(
        f"{text!r} is below {MIN_MEMORY_BYTES // 1024**2}MiB, too little "
        "for DuckDB to run a query")
  return int(value)


def format_bytes(size: int) -> str:
  for unit, scale in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
    if size >= scale:
      return f"{size / scale:.3g}{unit}"
  return f"{size}B"


def add_query_limits(parser: argparse.ArgumentParser) -> None:
  """--timeout and --memory_limit, the limits every query runs under."""
  parser.add_argument("--timeout", type=positive_seconds,
                      default=DEFAULT_TIMEOUT_SECONDS,
                      help="seconds a query may run before it is stopped")
  parser.add_argument(
      "--memory_limit", type=memory_size, default=default_memory_limit(),
      help="memory DuckDB may use for a query, such as 4GB or 512MB; the "
      "command stops when its own memory grows by this and "
      f"{format_bytes(HEADROOM_BYTES)} more "
      "(default: a quarter of this machine's memory, at most 4GB: "
      f"{format_bytes(default_memory_limit())} here)")


def resident_bytes() -> int:
  """This process's resident memory now (0 where /proc is missing)."""
  try:
    with open("/proc/self/statm", encoding="ascii") as handle:
      return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return 0


class MemoryWatch:
  """Stops the command, in one line, when its memory passes a ceiling.

  DuckDB's memory_limit bounds its buffers, but a few functions (repeat,
  lpad, range as a list) build one value outside them, and no interrupt
  reaches a function while it runs. So while a command runs, a thread reads
  its resident memory every INTERVAL seconds; past the ceiling (what it held
  at the start, plus `memory_limit`, plus HEADROOM_BYTES) it prints `message`
  and ends the process with exit 1. A command, not a library, starts one.
  Where /proc is missing it does nothing.
  """

  INTERVAL = 0.02

  def __init__(self, memory_limit: int, message: str):
    self.ceiling = resident_bytes() + memory_limit + HEADROOM_BYTES
    self._message = message
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name="memory-watch")

  def __enter__(self) -> "MemoryWatch":
    if resident_bytes():
      self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join()

  def _watch(self) -> None:
    while not self._stop.wait(self.INTERVAL):
      if resident_bytes() > self.ceiling:
        try:
          sys.stdout.flush()
        except (OSError, ValueError):
          pass
        os.write(2, (self._message + "\n").encode("utf-8", "replace"))
        os._exit(1)  # pylint: disable=protected-access
