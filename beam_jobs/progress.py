"""Progress lines while a local run works: inputs done, images/s, errors.

On the local runners `pipeline.run()` gives no live numbers: the in-process
FnApiRunner returns only when the job is done, and Beam's metrics are read
from its result. So the two stages where an input ends (a batch of
predictions formatted, an error row collected) count what passes through
them, and each worker writes its totals to a small file in a private folder
every few seconds. The launcher sums the files on a timer and prints a line.
Files serve alike the FnApiRunner in one process, its worker processes
(`--direct_running_mode multi_processing`) and Prism's loopback workers;
the counting costs one clock read per batch.

Progress is best effort: a worker that cannot write (a container without
the launcher's temp folder) just stays silent. The figures the run reports
at the end come from Beam's metrics, not from here.
"""

import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions

from beam_jobs.config import runner_name
from beam_jobs.contracts import ERROR_ROWS
from beam_jobs.contracts import PREDICTIONS

# Runners whose workers share the launcher's machine and temp folder.
LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner", "FnApiRunner",
                 "BundleBasedDirectRunner", "PrismRunner")


def runs_locally(options) -> bool:
  """Whether the pipeline's workers run on this machine."""
  return runner_name(options.view_as(StandardOptions)) in LOCAL_RUNNERS


class CountFinished(beam.DoFn):
  """Counts inputs that ended here; writes this worker's total every few
  seconds. Emits nothing."""

  def __init__(self, folder: str, kind: str, seconds: float):
    if kind not in (PREDICTIONS, ERROR_ROWS):
      raise ValueError(f"kind must be {PREDICTIONS!r} or {ERROR_ROWS!r}")
    self._folder = folder
    self._kind = kind
    self._seconds = seconds

  def setup(self):
    self._count = 0
    self._next_write = 0.0
    self._path = os.path.join(
        self._folder, f"{self._kind}-{os.getpid()}-{uuid.uuid4().hex}.json")
    self._writable = True

  def process(self, element):
    # A predictions element is an Arrow table of rows; an error is one row.
    self._count += element.num_rows if self._kind == PREDICTIONS else 1
    now = time.monotonic()
    if now >= self._next_write:
      self._next_write = now + self._seconds
      self._write()

  def finish_bundle(self):
    self._write()

  def _write(self):
    if not self._writable:
      return
    temporary = self._path + ".tmp"
    try:
      with open(temporary, "w") as handle:
        json.dump({"kind": self._kind, "count": self._count}, handle)
      os.replace(temporary, self._path)
    except OSError:
      self._writable = False


class ProgressReporter:
  """Prints a progress line every `seconds` while the pipeline runs.

  Use it as a context manager around `pipeline.run()`; `counter(kind)` gives
  the DoFn the pipeline's stages feed.
  """

  def __init__(self, seconds: float, stream=None):
    if seconds <= 0:
      raise ValueError("seconds must be positive")
    self.seconds = seconds
    self._stream = stream
    self.folder = None
    self._stop = threading.Event()
    self._thread = None
    self.lines = 0
    self.final = None

  def counter(self, kind: str) -> CountFinished:
    if self.folder is None:
      self.folder = tempfile.mkdtemp(prefix="beam_jobs-progress-")
    return CountFinished(self.folder, kind, self.seconds)

  def totals(self) -> dict:
    """{predictions, errors} summed over every worker's latest file."""
    totals = {PREDICTIONS: 0, ERROR_ROWS: 0}
    if self.folder is None:
      return totals
    for name in os.listdir(self.folder):
      if not name.endswith(".json"):
        continue
      try:
        with open(os.path.join(self.folder, name)) as handle:
          entry = json.load(handle)
        totals[entry["kind"]] += int(entry["count"])
      except (OSError, ValueError, KeyError):
        continue  # Replaced while we read it; the next tick has it.
    return totals

  def __enter__(self):
    self._started = time.monotonic()
    self._thread = threading.Thread(target=self._loop, daemon=True,
                                    name="progress")
    self._thread.start()
    return self

  def __exit__(self, *exc_info):
    self._stop.set()
    self._thread.join()
    self.final = self.totals()
    if self.folder:
      shutil.rmtree(self.folder, ignore_errors=True)
    return False

  def _loop(self):
    last_done, last_time = 0, self._started
    while not self._stop.wait(self.seconds):
      totals = self.totals()
      now = time.monotonic()
      done = totals[PREDICTIONS] + totals[ERROR_ROWS]
      rate = (done - last_done) / max(now - last_time, 1e-9)
      print(f"[{now - self._started:5.0f}s] {done:,} inputs done, "
            f"{rate:,.0f} images/s, {totals[ERROR_ROWS]:,} errors so far",
            file=self._stream or sys.stderr, flush=True)
      self.lines += 1
      last_done, last_time = done, now
