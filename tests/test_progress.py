"""Progress lines on local runs: counted where inputs end, summed across
worker processes, printed by the launcher while the pipeline runs."""

import io
import os
import re

import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs import progress as progress_lib
from beam_jobs.contracts import ERROR_ROWS
from beam_jobs.contracts import PREDICTIONS
from model import datasets
from tests.helpers import run_predict

LINE = re.compile(r"^\[ *\d+s\] ([\d,]+) inputs done, ([\d,]+) images/s, "
                  r"([\d,]+) errors so far$")


def test_counts_from_several_workers_add_up():
  reporter = progress_lib.ProgressReporter(seconds=60)
  workers = [reporter.counter(PREDICTIONS) for _ in range(2)]
  errors = reporter.counter(ERROR_ROWS)
  for worker in workers + [errors]:
    worker.setup()
  table = pa.table({"id": ["a", "b", "c"]})
  for _ in range(4):
    workers[0].process(table)
  workers[1].process(table)
  errors.process({"id": "bad"})
  errors.process({"id": "worse"})
  # Within `seconds` only the first element was written; a bundle's end
  # writes the rest.
  assert reporter.totals() == {PREDICTIONS: 6, ERROR_ROWS: 1}
  for worker in workers + [errors]:
    worker.finish_bundle()
  assert reporter.totals() == {PREDICTIONS: 15, ERROR_ROWS: 2}


def test_only_local_runners_get_progress():
  for runner in (None, "DirectRunner", "FnApiRunner", "PrismRunner",
                 "apache_beam.runners.direct.direct_runner.DirectRunner"):
    args = ["--runner", runner] if runner else []
    assert progress_lib.runs_locally(PipelineOptions(args)), runner
  for runner in ("DataflowRunner", "PortableRunner", "FlinkRunner"):
    assert not progress_lib.runs_locally(
        PipelineOptions(["--runner", runner])), runner


def _mixed_folder(tmp_path, sample):
  folder = tmp_path / "images"
  split = datasets.Split(sample.test.images[:120], sample.test.labels[:120])
  datasets.write_png_folder(split, sample.class_names, str(folder))
  for i in range(5):
    (folder / "Bag" / f"broken{i}.png").write_bytes(b"not a png")
  return str(folder)


def _check_lines(text: str, total: int) -> None:
  lines = text.splitlines()
  assert lines, "no progress line"
  done = []
  for line in lines:
    match = LINE.match(line)
    assert match, line
    done.append(int(match.group(1).replace(",", "")))
  assert done == sorted(done) and done[-1] <= total, done


def test_progress_lines_on_a_local_run(tmp_path, sample, tiny_model):
  stream = io.StringIO()
  reporter = progress_lib.ProgressReporter(seconds=0.02, stream=stream)
  run = run_predict(tmp_path / "out", input=_mixed_folder(tmp_path, sample),
                    model=tiny_model, batch_size=16, progress=reporter)
  counts = run.manifest["counts"]
  assert counts["predictions"] == 120 and counts["errors"] == 5
  # Every input that ended was counted, and the folder is gone.
  assert reporter.final == {PREDICTIONS: 120, ERROR_ROWS: 5}
  assert not os.path.exists(reporter.folder)
  _check_lines(stream.getvalue(), 125)


@pytest.mark.slow
def test_progress_counts_reach_the_launcher_from_worker_processes(
    tmp_path, sample, tiny_model):
  stream = io.StringIO()
  reporter = progress_lib.ProgressReporter(seconds=0.1, stream=stream)
  run = run_predict(
      tmp_path / "out", input=_mixed_folder(tmp_path, sample),
      model=tiny_model, batch_size=16, progress=reporter, beam_args=[
          "--runner", "DirectRunner", "--direct_num_workers", "2",
          "--direct_running_mode", "multi_processing"])
  # Two worker processes.
  assert run.manifest["counts"]["model_loads"] == 2
  assert reporter.final == {PREDICTIONS: 120, ERROR_ROWS: 5}
  _check_lines(stream.getvalue(), 125)
