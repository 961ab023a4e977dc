"""The pipeline off the DirectRunner: a Dataflow job built offline, the Flex
Template's files checked against the real flags, and a run through Beam's
portable job API on separate worker processes."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs import config as config_lib
from beam_jobs import predict
from beam_jobs import preflight
from model import card as card_lib
from tools import make_shards
from beam_jobs import outputs
from beam_jobs.pipeline import build_pipeline
from tests.helpers import DATAFLOW_ARGS
from tests.helpers import REPO
from tests.helpers import SLIM_PYTHON
from tests.helpers import TENSORFLOW_BLOCKER
from tests.helpers import needs_the_gcp_extra
from tests.helpers import expected_labels
from tests.helpers import png_ids
from tests.helpers import predict_cli
from tests.helpers import read_parquet_rows


TEMPLATE_DIR = os.path.join(REPO, "dataflow")
# The Dockerfile's ENV lines naming what the launcher runs; its WORKDIR holds
# the repository's layout.
TEMPLATE_ENV = re.compile(
    r'^ENV (FLEX_TEMPLATE_PYTHON_\w+)="\$\{WORKDIR\}/(.+)"$', re.MULTILINE)

# Bounds, so a worker that never connects fails the test instead of hanging
# it: Beam's job server waits for a worker with no timeout of its own.
POOL_START_SECONDS = 30
LAUNCH_SECONDS = 60
# The handler's own log line; its pid says which process loaded the model.
MODEL_LOAD_LINE = re.compile(r"loading tflite model from \S+ \(pid (\d+)\)")
# Turns on INFO logging in the pool's workers, which configure none, so that
# the handler's model-load line reaches the pool's log.
SITECUSTOMIZE = "import logging\nlogging.basicConfig(level=logging.INFO)\n"


def _dataflow_job(config):
  plan = preflight.check(config)
  pipeline = beam.Pipeline(options=PipelineOptions(DATAFLOW_ARGS))
  build_pipeline(pipeline, plan.config, plan.card, "dryrun")
  result = pipeline.run()
  transforms = result.job.proto_pipeline.components.transforms.values()
  return {t.unique_name for t in transforms}


@pytest.mark.slow
@pytest.mark.parametrize("form", ["images", "parquet"])
def test_dataflow_dry_run_builds_the_whole_job(tmp_path, png_dir, tiny_model,
                                               form):
  needs_the_gcp_extra()
  source = png_dir
  if form == "parquet":
    make_shards.make_shards(png_dir, str(tmp_path / "shards"), 100)
    source = str(tmp_path / "shards" / "*.parquet")
  names = _dataflow_job(config_lib.PredictConfig(
      source, tiny_model, str(tmp_path / "out"), label_column=(
          "label" if form == "parquet" else None),
      bigquery_table="fake-project:dataset.predictions"))
  reader = "ReadParquetImages" if form == "parquet" else "ReadImageFiles"
  for stage in (reader, "Preprocess", "RunInference", "FormatPredictions",
                "WritePredictions", "CollectErrors", "WriteErrors",
                "WritePredictionsToBigQuery", "WriteErrorsToBigQuery"):
    assert stage in names, (stage, sorted(n for n in names if "/" not in n))
  assert any(n.startswith("WritePredictionsToBigQuery/WriteToBigQuery")
             for n in names)


def _template_parameters() -> list:
  with open(os.path.join(TEMPLATE_DIR, "metadata.json"),
            encoding="utf-8") as handle:
    return json.load(handle)["parameters"]


def _predict_flags() -> dict:
  parser = config_lib.build_parser()
  return {action.dest: action for action in parser._actions}  # pylint: disable=protected-access


def test_flex_template_parameters_are_flags_of_predict():
  parameters = _template_parameters()
  flags = _predict_flags()
  for parameter in parameters:
    name = parameter["name"]
    assert name in flags, f"{name} is not a flag of beam_jobs.predict"
    flag = flags[name]
    # The launcher passes each parameter as --name=value, which an on/off
    # (store_true) flag refuses.
    assert flag.nargs != 0, f"--{name} takes no value"
    assert parameter.get("isOptional", False) != flag.required, name
    allowed = list(flag.choices or []) + (
        [flag.default] if flag.default is not None else [])
    for pattern in parameter.get("regexes", []):
      for value in allowed:
        assert re.match(pattern, str(value)), (name, value, pattern)
  named = {parameter["name"] for parameter in parameters}
  required = {name for name, flag in flags.items() if flag.required}
  assert required <= named, required - named

  # Parsed the way the launcher passes them, each one reaches the config.
  values = {name: "gs://bucket/x" if flags[name].required else
            str(flags[name].default or 1) for name in named}
  config, beam_args = config_lib.parse_args(
      [f"--{name}={value}" for name, value in sorted(values.items())])
  assert beam_args == []
  for name, value in values.items():
    parse = flags[name].type or str
    assert getattr(config, name) == parse(value), name


@pytest.mark.slow
def test_flex_template_entry_point_runs_predict():
  with open(os.path.join(TEMPLATE_DIR, "Dockerfile"),
            encoding="utf-8") as handle:
    env = dict(TEMPLATE_ENV.findall(handle.read()))
  assert set(env) == {"FLEX_TEMPLATE_PYTHON_PY_FILE",
                      "FLEX_TEMPLATE_PYTHON_SETUP_FILE"}
  assert all(os.path.isfile(os.path.join(REPO, path))
             for path in env.values()), env
  result = subprocess.run(
      [sys.executable, env["FLEX_TEMPLATE_PYTHON_PY_FILE"], "--help"],
      cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("usage: python -m beam_jobs.predict")


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def _read(path) -> str:
  with open(path, encoding="utf-8", errors="replace") as handle:
    return handle.read()


def _wait_for_port(port: int, pool: subprocess.Popen, log_path) -> None:
  deadline = time.monotonic() + POOL_START_SECONDS
  while time.monotonic() < deadline:
    if pool.poll() is not None:
      pytest.fail(f"worker pool exited with {pool.returncode}:\n"
                  f"{_read(log_path)}")
    try:
      socket.create_connection(("localhost", port), timeout=1).close()
      return
    except OSError:
      time.sleep(0.2)
  pytest.fail(f"worker pool not listening on {port} after "
              f"{POOL_START_SECONDS}s:\n{_read(log_path)}")


@contextlib.contextmanager
def _worker_pool(tmp_path):
  """Starts Beam's worker pool; yields (process, port, log path); kills it."""
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
  env = dict(os.environ)
  # The pool starts each worker as a bare `python` from PATH. Unless this
  # interpreter's folder comes first, that can be a Python without Beam: the
  # worker dies on import, and the job waits for it forever.
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
  env["PYTHONPATH"] = os.pathsep.join(
      filter(None, [str(site), env.get("PYTHONPATH")]))
  port = _free_port()
  log_path = tmp_path / "worker_pool.log"
  with open(log_path, "wb") as log:
    # A file, not a pipe: nobody would read a pipe, and a full one blocks.
    # The workers inherit it as their stderr, so their logs land there too.
    # Its own session makes the pool and its workers one process group.
    pool = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
         "--service_port", str(port)],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
  try:
    _wait_for_port(port, pool, log_path)
    yield pool, port, log_path
  finally:
    # The whole group: the pool and any worker it started.
    with contextlib.suppress(ProcessLookupError):
      os.killpg(pool.pid, signal.SIGTERM)
    try:
      pool.wait(timeout=10)
    except subprocess.TimeoutExpired:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(pool.pid, signal.SIGKILL)
      pool.wait()


@pytest.mark.slow
def test_portable_runner_runs_on_external_worker_processes(
    tmp_path, png_dir, tiny_model, sample):
  output = tmp_path / "out"
  with _worker_pool(tmp_path) as (pool, port, log_path):
    launcher = subprocess.Popen(
        [sys.executable, "-m", "beam_jobs.predict", "--input", png_dir,
         "--model", tiny_model, "--output", str(output), "--runner",
         "PortableRunner", "--job_endpoint", "embed", "--environment_type",
         "EXTERNAL", "--environment_config", f"localhost:{port}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
      _, stderr = launcher.communicate(timeout=LAUNCH_SECONDS)
    except subprocess.TimeoutExpired:
      launcher.kill()
      _, stderr = launcher.communicate()
      pytest.fail(f"no result after {LAUNCH_SECONDS}s: {stderr}\n"
                  f"worker pool log:\n{_read(log_path)}")
    finally:
      # Never leave the launcher behind, even on Ctrl-C.
      if launcher.poll() is None:
        launcher.kill()
        launcher.wait()
    pool_log = _read(log_path)
  details = f"{stderr}\nworker pool log:\n{pool_log}"
  assert launcher.returncode == 0, details

  # The model was loaded once, in a worker the pool started: its log line is
  # in the pool's log, from a process that is neither the pool nor the
  # launcher.
  loads = [int(pid) for pid in MODEL_LOAD_LINE.findall(pool_log)]
  assert len(loads) == 1, details
  assert loads[0] not in (pool.pid, launcher.pid), details
  _assert_served_the_sample(output, png_dir, tiny_model, sample)


def _assert_served_the_sample(output, png_dir, tiny_model, sample):
  """One model load, and every sample image with the label TFLite gives."""
  manifest = outputs.read_manifest(str(output))
  assert manifest["counts"] == {"inputs": 200, "predictions": 200,
                                "errors": 0, "skipped": 0, "model_loads": 1}
  rows = read_parquet_rows(str(output / "predictions" / "*.parquet"))
  expected = dict(zip(png_ids(png_dir, sample),
                      expected_labels(tiny_model, sample, "tflite")))
  assert {row["id"]: row["label"] for row in rows} == expected
  assert read_parquet_rows(str(output / "errors" / "*.parquet")) == []


# Records every attempt at a network call (a name lookup or a connection)
# in the file NETWORK_LOG names, and refuses it.
NETWORK_BLOCKER = """
import os, socket
def _refuse(*args, **kwargs):
  with open(os.environ["NETWORK_LOG"], "a") as log:
    log.write(repr(args[:2]) + "\\n")
  raise OSError("network blocked by the test")
socket.getaddrinfo = _refuse
socket.create_connection = _refuse
socket.socket.connect = _refuse
"""


@pytest.mark.slow
def test_dataflow_dry_run_through_the_cli(tmp_path, tiny_model):
  """Offline (this machine has no network, and every network call is
  refused and recorded): exit 0, one line, nothing written, nothing
  uploaded; the output is locked and checked only by a real run, and the
  local model folder would be staged to --temp_location."""
  needs_the_gcp_extra()
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(NETWORK_BLOCKER)
  network = tmp_path / "network.log"
  env = dict(os.environ, PYTHONPATH=f"{site}:{REPO}",
             NETWORK_LOG=str(network))
  args = ["--input", "gs://fake-bucket/images/", "--model", tiny_model,
          "--output", "gs://fake-bucket/out", "--skip_existing"] + (
              DATAFLOW_ARGS)
  result = predict_cli(args, env=env)
  assert result.returncode == 0, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "dry run: the Dataflow job was built"), result.stdout
  assert ("not checked offline: --input gs://fake-bucket/images/, --output "
          "gs://fake-bucket/out") in lines[0]
  card = card_lib.load_card(tiny_model)
  assert (f"--model would be staged to gs://fake-bucket/tmp/beam_jobs-models/"
          f"{card.model_id}, and was not") in lines[0]
  assert not network.exists(), network.read_text()

  # A model that needs TensorFlow is refused: the workers' install is slim.
  keras = predict_cli(args + ["--engine", "keras"])
  assert keras.returncode == 2
  assert keras.stderr.count("\n") == 1 and "--sdk_container_image" in (
      keras.stderr), keras.stderr
  with_image = predict_cli(args + [
      "--engine", "keras", "--sdk_container_image", "example.com/worker:1"])
  assert with_image.returncode == 0, with_image.stderr
  # A requirements file is staged, never downloaded (Beam would pip-download
  # it): a package no index has passes.
  requirements = tmp_path / "requirements.txt"
  requirements.write_text("no-such-package-anywhere==0.0.1\n")
  with_requirements = predict_cli(args + [
      "--engine", "keras", "--requirements_file", str(requirements)])
  assert with_requirements.returncode == 0, with_requirements.stderr


@pytest.mark.parametrize("change, message", [
    ({"input": "LOCAL"}, "--input LOCAL is on this machine"),
    ({"input": None, "input_list": "LOCAL/list.txt"},
     "--input_list LOCAL/list.txt is on this machine"),
    ({"output": "LOCAL/out"}, "--output LOCAL/out is on this machine"),
    ({"args": ["--setup_file"]}, "would not have this package"),
    ({"args": ["--temp_location"]}, "pass --temp_location"),
])
def test_dataflow_refuses_what_its_workers_could_not_reach(tmp_path,
                                                           tiny_model, change,
                                                           message, capsys):
  """Fails on the code before the fix: the dry run passed, and the job
  would have failed on the workers (paths on the launcher's disk, no way
  to install the package, a local model they cannot read)."""
  needs_the_gcp_extra()
  local = str(tmp_path)
  flags = {"input": "gs://fake-bucket/images/", "input_list": None,
           "output": "gs://fake-bucket/out"}
  flags.update({name: value.replace("LOCAL", local) if value else value
                for name, value in change.items() if name != "args"})
  args = list(DATAFLOW_ARGS)
  for dropped in change.get("args", []):
    at = args.index(dropped)
    del args[at:at + 2]
  argv = ["--model", tiny_model]
  for name, value in flags.items():
    if value:
      argv += [f"--{name}", value]
  assert predict.main(argv + args) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1, err
  assert message.replace("LOCAL", local) in err, err


def test_a_staged_model_folder_serves_as_the_local_one(tmp_path, tiny_model):
  """What a real Dataflow run copies before it submits the job: the card
  and the model files it lists, a model folder in its own right."""
  from beam_jobs import model_staging  # pylint: disable=import-outside-toplevel
  card = card_lib.load_card(tiny_model)
  staging = model_staging.plan(tiny_model, card, str(tmp_path))
  assert staging.destination == str(
      tmp_path / "beam_jobs-models" / card.model_id)
  model_staging.stage(staging)
  staged = card_lib.load_card(staging.destination)
  assert staged.model_id == card.model_id
  card_lib.check_model_files(staging.destination, staged, "tflite")
  assert sorted(os.listdir(staging.destination)) == sorted(staging.files)


@pytest.mark.slow
def test_tflite_serving_imports_no_tensorflow(tmp_path, png_dir, tiny_model):
  """In the full install, with TensorFlow blocked in the launcher and in
  the DirectRunner's worker processes (sitecustomize runs in each)."""
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(TENSORFLOW_BLOCKER)
  env = dict(os.environ, PYTHONPATH=str(site))
  result = predict_cli([
      "--input", png_dir, "--model", tiny_model, "--output",
      str(tmp_path / "out"), "--direct_num_workers", "2",
      "--direct_running_mode", "multi_processing"], env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  manifest = outputs.read_manifest(str(tmp_path / "out"))
  assert manifest["counts"]["predictions"] == 200 and manifest["accounted"]




@pytest.mark.slow
def test_tflite_model_served_from_the_slim_install(tmp_path, png_dir,
                                                   tiny_model, sample):
  """.venv-slim holds the base install alone (scripts/ensure_venv.sh makes
  it, as ./run_tests.sh runs): no TensorFlow there to import."""
  if not os.path.exists(SLIM_PYTHON):
    pytest.fail(f"{SLIM_PYTHON} is missing: ./run_tests.sh creates it "
                "(scripts/ensure_venv.sh)")
  probe = subprocess.run([SLIM_PYTHON, "-c", "import tensorflow"],
                         capture_output=True, text=True, check=False)
  assert "No module named 'tensorflow'" in probe.stderr
  output = tmp_path / "out"
  result = predict_cli(python=SLIM_PYTHON, args=[
      "--input", png_dir, "--model", tiny_model, "--output", str(output)])
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_served_the_sample(output, png_dir, tiny_model, sample)
