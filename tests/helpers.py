"""Helpers shared by the test modules; the fixtures are in conftest.py.

`run_predict` is the one way a test runs the pipeline in-process to success:
it checks the accounting every run promises and hands back this run's rows.
"""

import contextlib
import dataclasses
import glob
import io
import os
import signal
import subprocess
import sys
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from beam_jobs import config as config_lib
from beam_jobs import outputs
from beam_jobs import predict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(REPO, "sample_data", "fashion-mnist")
RUNNER = ("--runner", "DirectRunner")
# A Dataflow job built offline, never submitted.
DATAFLOW_ARGS = [
    "--runner", "DataflowRunner", "--dry_run=True", "--project",
    "fake-project", "--region", "us-central1", "--temp_location",
    "gs://fake-bucket/tmp", "--setup_file", os.path.join(REPO, "setup.py")
]
# .venv-slim holds the base install alone (scripts/ensure_venv.sh makes it).
SLIM_PYTHON = os.path.join(
    os.environ.get("SLIM_VENV", os.path.join(REPO, ".venv-slim")), "bin",
    "python")
# A sitecustomize that refuses TensorFlow and Keras in every process it is
# loaded into (on PYTHONPATH: the launcher and the DirectRunner's workers).
TENSORFLOW_BLOCKER = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
      raise ImportError(f"{name} is blocked: serving must not import it")
sys.meta_path.insert(0, Blocker())
"""
# A regression that opened a FIFO or waited on a worker would hang the
# suite; a run that takes longer than this fails instead.
HANG_SECONDS = 240


@contextlib.contextmanager
def no_hang(seconds: int = HANG_SECONDS):
  """Raises TimeoutError in the main thread after `seconds`."""
  def expire(signum, frame):
    raise TimeoutError(f"still running after {seconds}s: something blocked")
  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# Running the pipeline ---------------------------------------------------------


@dataclasses.dataclass
class Run:
  """One committed run: its manifest and the rows of its own shards."""
  output: str
  manifest: dict
  predictions: list
  errors: list

  @property
  def predictions_by_id(self) -> dict:
    return {row["id"]: row for row in self.predictions}

  @property
  def errors_by_id(self) -> dict:
    return {row["id"]: row for row in self.errors}


def listed_rows(output, kind: str, run_id: Optional[str] = None) -> list:
  """The rows of the shards of `kind` the manifest lists, and only those
  (with `run_id`, only the shards that run wrote); each shard must hold the
  rows the manifest says."""
  manifest = outputs.read_manifest(str(output))
  rows = []
  for entry in manifest["files"][kind]:
    if run_id is not None and run_id not in entry["name"]:
      continue
    table = pq.read_table(os.path.join(str(output), entry["name"]))
    assert table.num_rows == entry["rows"], entry
    rows.extend(table.to_pylist())
  return rows


def run_predict(output, *, beam_args=RUNNER, progress=None,
                **config_fields) -> Run:
  """Runs predict in this process to success, and checks what every run
  promises: each input is a prediction or an error, the manifest says so,
  and this run's shards hold exactly the rows it says it wrote. Earlier
  shards kept by --skip_existing are listed too, but are not this run's."""
  config = config_lib.PredictConfig(output=str(output), **config_fields)
  with no_hang():
    manifest = predict.run(config, list(beam_args), progress)
  run_id = manifest["run_id"]
  run = Run(str(output), manifest,
            listed_rows(output, outputs.PREDICTIONS_PREFIX, run_id),
            listed_rows(output, outputs.ERRORS_PREFIX, run_id))
  counts = manifest["counts"]
  assert counts["inputs"] == counts["predictions"] + counts["errors"], counts
  assert manifest["accounted"], manifest
  assert manifest["written"] == {
      outputs.PREDICTIONS_PREFIX: len(run.predictions),
      outputs.ERRORS_PREFIX: len(run.errors)}, manifest["written"]
  return run


def predict_cli(args, *, kill_at=None, python=sys.executable, env=None,
                timeout=300) -> subprocess.CompletedProcess:
  """Runs `python -m beam_jobs.predict ARGS` in a child process. `kill_at`
  (TARGET, CALLS) kills it with SIGKILL at the CALLS-th call of TARGET
  (tests/kill_at.py); `env` defaults to this one with the repository on
  PYTHONPATH."""
  entry = (["-m", "beam_jobs.predict"] if kill_at is None else
           [os.path.join(REPO, "tests", "kill_at.py"), kill_at[0],
            str(kill_at[1]), "--"])
  if env is None:
    env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([python, *entry, *args], capture_output=True,
                        text=True, cwd=REPO, timeout=timeout, check=False,
                        env=env)


def files_below(output) -> list:
  """The paths of every file below a folder, relative to it, sorted."""
  root = str(output)
  return sorted(os.path.relpath(os.path.join(folder, name), root)
                for folder, _, names in os.walk(root) for name in names)


def committed_files(manifest: dict) -> list:
  """What a folder holds after a clean commit: the manifest and the shards
  it lists, sorted."""
  return sorted([outputs.MANIFEST_FILE] + [
      entry["name"] for kind in manifest["files"].values() for entry in kind])


def skip_unless_offline():
  """Skips the calling test where Cloud Storage's host resolves: it checks
  what happens without a network (this machine has none)."""
  import pytest  # pylint: disable=import-outside-toplevel
  import socket  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  resolved = []

  def look():
    try:
      socket.getaddrinfo("storage.googleapis.com", 443)
      resolved.append(True)
    except OSError:
      resolved.append(False)

  thread = threading.Thread(target=look, daemon=True)
  thread.start()
  thread.join(10)
  if resolved and resolved[0]:
    pytest.skip("this machine reaches Cloud Storage; the test is of the "
                "offline path")


def needs_the_gcp_extra():
  """Skips the calling test without apache-beam[gcp]: the Dataflow runner's
  client and the BigQuery sink need google-apitools and google-cloud-*."""
  import pytest  # pylint: disable=import-outside-toplevel
  for module in ("apitools", "google.cloud.storage"):
    pytest.importorskip(module)


def read_parquet_rows(pattern: str) -> list:
  """Every row of the Parquet files the glob `pattern` matches, in name
  order."""
  rows = []
  for path in sorted(glob.glob(pattern)):
    rows.extend(pq.read_table(path).to_pylist())
  return rows


def ids(rows) -> list:
  return [row["id"] for row in rows]


def beam_match(pattern: str) -> list:
  """Beam's own FileSystems.match: the reference for what a pattern means."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


# Inputs -----------------------------------------------------------------------


def image_bytes(image, fmt: str, **kwargs) -> bytes:
  """A Pillow image encoded as `fmt` (PNG, JPEG, ...)."""
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def photo_folder(root, per_class=6, size=(24, 20)):
  """Red and green JPEG photos of noise in two class folders under root."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  for name, colour in (("red", 0), ("green", 1)):
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      pixels = rng.integers(0, 60, size + (3,), dtype=np.uint8)
      pixels[..., colour] += 180
      Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)


def png_ids(png_dir, sample) -> list:
  """The ids write_png_folder gives each test image, in order."""
  return [os.path.join(png_dir, sample.class_names[label], f"{i:06d}.png")
          for i, label in enumerate(sample.test.labels)]


# Expectations -----------------------------------------------------------------


def engine_probabilities(model_dir: str, images: np.ndarray,
                         engine: str = "keras") -> np.ndarray:
  from model import engines  # pylint: disable=import-outside-toplevel
  return engines.load_engine(model_dir, engine).probabilities(
      images.astype(np.float32))


def expected_labels(model_dir, sample, engine="keras") -> list:
  """The label each engine gives the sample's test images, in order."""
  probabilities = engine_probabilities(model_dir, sample.test.images, engine)
  return [sample.class_names[i] for i in probabilities.argmax(1)]
