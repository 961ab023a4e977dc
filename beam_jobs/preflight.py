"""Preflight: every check `python -m beam_jobs.predict` can make before any
work, once, each failing in one line that names what was expected.

`check` takes the user's flags and returns a `Plan`: the flags resolved
(absolute paths, the input format and the engine decided), the model's card
and the output folder as it stands. It changes nothing it is given and
writes nothing but, for a real run, the output folder itself (made to learn
that it can be written).
"""

import dataclasses
import re
from typing import Optional

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options import pipeline_options as beam_options

from beam_jobs import model_staging
from beam_jobs import output_folder
from beam_jobs import outputs
from beam_jobs.config import ConfigError
from beam_jobs.config import DATAFLOW_RUNNERS
from beam_jobs.config import ENGINE_CHOICES
from beam_jobs.config import INPUT_FORMATS
from beam_jobs.config import LIST_FORMAT
from beam_jobs.config import PredictConfig
from beam_jobs.config import is_dataflow_dry_run
from beam_jobs.config import runner_name
from beam_jobs.sources import lists
from beam_jobs.sources import parquet
from imagebatch import cli
from imagebatch import paths
from model import card as card_lib
from model import embeddings
from model import engines
from model import image_limits
from model import output_shapes

_BIGQUERY_TABLE = re.compile(r"^[a-z][a-z0-9.:-]*[a-z0-9]:\w+\.[\w$-]+$")
_INPUT_KINDS = {"parquet": "Parquet shards", "images": "image files",
                LIST_FORMAT: "text, CSV or Parquet lists of image URIs"}


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run was checked to do."""
  # Resolved: absolute paths, format and engine; on Dataflow, a local model
  # folder's staged place (see `model_staging`).
  config: PredictConfig
  card: card_lib.ModelCard
  # The output folder as it stood; None where a dry run cannot list it.
  folder: Optional[output_folder.FolderState]
  dry_run: bool = False  # Dataflow's --dry_run: build the job, submit none
  # A local model folder to copy where Dataflow's workers read it, before
  # the job is submitted (not for a dry run).
  staging: Optional[model_staging.ModelStaging] = None


def check(config: PredictConfig, options=None) -> Plan:
  """Checks the flags, the model, the input and the output; returns the
  Plan, or raises ConfigError. With Dataflow's --dry_run in `options`, what
  needs the network (a remote input or output) is not checked."""
  options = options or beam_options.PipelineOptions([])
  dry_run = is_dataflow_dry_run(options)
  config = resolve_flags(config)
  check_dataflow_paths(config, options)
  check_reachable(config, dry_run)
  card = load_card(config.model, config.engine)
  config = dataclasses.replace(config, engine=auto_engine(config, card))
  check_embeddings(config, card)
  check_input(config, offline=dry_run)
  folder = check_output(config, card, offline=dry_run)
  check_workers(config, card, options)
  staging = plan_model_staging(config, card, options)
  if staging:
    config = dataclasses.replace(config, model=staging.destination)
  return Plan(config, card, folder, dry_run, staging)


def resolve_flags(config: PredictConfig) -> PredictConfig:
  """The flags checked against each other, with absolute paths and the
  input format decided; nothing is read yet."""
  if bool(config.input) == bool(config.input_list):
    raise ConfigError("pass one of --input (an image folder, a glob, or "
                      "Parquet shards) and --input_list (lists of image "
                      "URIs)")
  if config.input_list and config.input_format not in ("auto", LIST_FORMAT):
    raise ConfigError("--input_format is for --input; each list file's "
                      "format comes from its name (.parquet, .csv, else "
                      "text)")
  if config.input_format not in INPUT_FORMATS + (LIST_FORMAT,):
    raise ConfigError(f"--input_format must be one of {INPUT_FORMATS}")
  if config.engine not in ENGINE_CHOICES:
    raise ConfigError(f"--engine must be one of {ENGINE_CHOICES}")
  for name in ("batch_size", "top_k"):
    if getattr(config, name) < 1:
      raise ConfigError(f"--{name} must be at least 1")
  if config.progress_seconds < 0:
    raise ConfigError("--progress_seconds must be 0 (no progress lines) or "
                      "more")
  if config.max_image_pixels is not None and not (
      1 <= config.max_image_pixels <= image_limits.PILLOW_PIXEL_LIMIT):
    raise ConfigError(
        "--max_image_pixels must be between 1 and "
        f"{image_limits.PILLOW_PIXEL_LIMIT}: Pillow refuses larger images "
        "itself")
  if config.bigquery_table and not _BIGQUERY_TABLE.match(
      config.bigquery_table):
    raise ConfigError(f"--bigquery_table {config.bigquery_table!r} must look "
                      "like PROJECT:DATASET.TABLE")
  if config.max_error_rate is not None and not (
      0 <= config.max_error_rate <= 1):
    raise ConfigError(f"--max_error_rate must be between 0 and 1, got "
                      f"{config.max_error_rate}")
  if config.skip_existing and config.overwrite:
    raise ConfigError("--skip_existing keeps earlier results and --overwrite "
                      "replaces them; pass one of them")
  absolute = {}
  for name in ("input", "input_list", "model", "output"):
    if getattr(config, name):
      _check_scheme(name, getattr(config, name))
      absolute[name] = paths.absolute(getattr(config, name))
  config = dataclasses.replace(config, **absolute)
  config = dataclasses.replace(config, input_format=config.resolved_format())
  _check_output_outside_input(config)
  return config


def check_reachable(config: PredictConfig, dry_run: bool) -> None:
  """Refuses, in one line and at once, a gs:// path the launcher is about
  to read or write when Cloud Storage cannot be reached from here (Google's
  client would retry for minutes first). A dry run reads the model alone:
  its card shapes the job."""
  flags = ("model",) if dry_run else ("model", "input", "input_list",
                                      "output")
  for flag in flags:
    value = getattr(config, flag)
    if value:
      try:
        paths.check_reachable(value)
      except paths.Unreachable as error:
        raise ConfigError(f"--{flag} {value}: {error}") from None


def load_card(model: str, engine: str) -> card_lib.ModelCard:
  """The model folder's card, checked against its files; `engine` (or
  auto) must be one the folder serves with."""
  try:
    found = FileSystems.exists(paths.join(model, card_lib.CARD_FILE))
  except Exception as error:  # pylint: disable=broad-except
    # A remote store that refuses us (no credentials, no access), say.
    raise ConfigError(f"--model {model} cannot be read: "
                      f"{_first_line(error)}") from None
  if not found:
    adopt = adopt_command(model)
    if adopt:
      raise ConfigError(
          f"--model {model} is a model trained elsewhere, not a model "
          f"folder; make one first: {adopt}")
    raise ConfigError(
        f"--model {model} is not a model folder: missing "
        f"{card_lib.CARD_FILE} (expected the output of python -m "
        "model.train or python -m model.adopt)")
  try:
    card = card_lib.load_card(model)
  except (ValueError, OSError) as error:
    raise ConfigError(f"--model {model}: {error}") from None
  if engine == "auto":
    engine = card.default_engine
  elif engine not in card.engines:
    raise ConfigError(
        f"--engine {engine}: {model} holds no {engine} model; it serves "
        f"with {', '.join(card.engines)}")
  try:
    card_lib.check_model_files(model, card, engine)
    # Keras and SavedModel engines check their width when they load.
    if "tflite" in card.engines:
      output_shapes.check_model_shapes(card, paths.read_bytes(
          paths.join(model, card_lib.TFLITE_FILE)))
    if "onnx" in card.engines:
      engines.check_onnx_model_shapes(card, paths.read_bytes(
          paths.join(model, card_lib.ONNX_FILE)))
  except (ValueError, OSError) as error:
    raise ConfigError(f"--model {model}: {error}") from None
  return card


def auto_engine(config: PredictConfig, card: card_lib.ModelCard) -> str:
  """The engine --engine names, or for auto the fastest the folder holds
  (with --write_embeddings, the fastest that serves the embedding)."""
  if config.engine != "auto":
    return config.engine
  if config.write_embeddings and card.embedding_engines:
    return card.embedding_engines[0]
  return card.default_engine


def check_embeddings(config: PredictConfig, card: card_lib.ModelCard) -> None:
  """With --write_embeddings, the engine must serve the card's embedding."""
  if not config.write_embeddings:
    return
  if not card.embedding:
    raise ConfigError("--write_embeddings: " +
                      embeddings.refusal(config.model, card))
  if config.engine not in card.embedding_engines:
    raise ConfigError(
        f"--write_embeddings: the {config.engine} engine of {config.model} "
        f"serves no embedding; pass --engine "
        f"{' or '.join(card.embedding_engines)}, which do")


def input_pattern(config: PredictConfig) -> tuple:
  """(flag, pattern) of the input as the pipeline lists it."""
  if config.input_list:
    return "input_list", config.input_list
  return "input", (config.input if config.input_format == "parquet" else
                   paths.expand_pattern(config.input))


def _check_output_outside_input(config: PredictConfig) -> None:
  """An --output inside the input is left out of its listing; one that
  holds the input (or is its folder) would have its own files read as
  inputs, and is refused."""
  flag, pattern = input_pattern(config)
  if paths.is_below(paths.pattern_base(pattern), config.output):
    raise ConfigError(
        f"--{flag} {getattr(config, flag)} is inside --output "
        f"{config.output}: the run's own files would be read as inputs; "
        "choose an --output outside the input (or a folder inside it, "
        "which the input's listing leaves out)")


def check_input(config: PredictConfig, offline: bool = False) -> None:
  """The input matches a file, and its first file has the columns the flags
  name. `offline`: a remote input is not listed."""
  flag, pattern = input_pattern(config)
  if offline and paths.is_remote(pattern):
    return
  # One match is enough to know the input is there; the pipeline lists all.
  # The run's own output is no input (pipeline.read_inputs leaves it out).
  matched = paths.match_paths(pattern, limit=1, exclude=config.output)
  if not matched:
    raise ConfigError(f"--{flag} {getattr(config, flag)} matches no files: "
                      f"expected {_INPUT_KINDS[config.input_format]}")
  if config.input_format == "parquet":
    _check_columns(config, matched[0])
  elif config.input_format == LIST_FORMAT:
    _check_list_columns(config, matched[0])


def _check_columns(config: PredictConfig, shard_path: str) -> None:
  try:
    with paths.open_file(shard_path) as handle:
      schema = pq.ParquetFile(handle).schema_arrow
  except Exception:  # pylint: disable=broad-except
    # An unreadable shard is reported per shard by the pipeline itself.
    return
  for flag in ("image_column", "id_column", "label_column"):
    column = getattr(config, flag)
    if column and column not in schema.names:
      raise ConfigError(f"--{flag} {column!r} is not a column of "
                        f"{shard_path}; it has {schema.names}")
  problem = parquet.image_column_problem(
      schema.field(config.image_column).type)
  if problem:
    raise ConfigError(f"--image_column {config.image_column!r} of "
                      f"{shard_path} {problem}")


def _check_list_columns(config: PredictConfig, list_path: str) -> None:
  """The --uri_column (and --label_column) of the first list file."""
  kind = lists.list_format(list_path)
  if kind == "text":
    # A glob may mix text lists with CSV or Parquet ones that hold labels;
    # only a --input_list naming text lists alone cannot.
    if config.label_column and not paths.has_glob(config.input_list):
      raise ConfigError(
          f"--label_column {config.label_column!r}: {list_path} is a text "
          "list, one URI per line with no columns; give labels in a CSV or "
          "Parquet list")
    return
  try:
    with paths.open_file(list_path) as handle:
      if kind == "parquet":
        names = pq.ParquetFile(handle).schema_arrow.names
      else:
        names = next(lists.csv_records(handle), [])
  except Exception:  # pylint: disable=broad-except
    # An unreadable list is reported by the pipeline, as one error row.
    return
  for flag in ("uri_column", "label_column"):
    column = getattr(config, flag)
    if column and column not in names:
      raise ConfigError(f"--{flag} {column!r} is not a column of "
                        f"{list_path}; it has {names}")


def predictions_schema(config: PredictConfig, card: card_lib.ModelCard):
  """The columns this run's prediction shards will have."""
  return outputs.predictions_schema(
      config.write_probabilities,
      card.embedding_dimension if config.write_embeddings else None)


def check_output(config: PredictConfig, card: card_lib.ModelCard,
                 offline: bool = False
                 ) -> Optional[output_folder.FolderState]:
  """What the output folder holds, which beam_jobs/output_folder.py
  judges; returns it as it stands (None for a remote one offline)."""
  if offline and paths.is_remote(config.output):
    return None
  try:
    state = output_folder.inspect(config.output)
    output_folder.check(state, card.model_id, config.overwrite,
                        config.skip_existing,
                        predictions_schema(config, card))
    if not offline:  # a dry run writes nothing, not even the folder
      output_folder.check_writable(config.output)
  except output_folder.FolderError as error:
    raise ConfigError(str(error)) from None
  return state


def _on_dataflow(options) -> bool:
  return runner_name(options.view_as(
      beam_options.StandardOptions)) in DATAFLOW_RUNNERS


def check_dataflow_paths(config: PredictConfig, options) -> None:
  """Refuses a Dataflow job whose workers could not read its input or
  write its output (a path on the launcher's disk), or could not install
  this package at all."""
  if not _on_dataflow(options):
    return
  for flag in ("input", "input_list", "output"):
    value = getattr(config, flag)
    if value and not paths.is_remote(value):
      fix = ("pass a gs://BUCKET/... folder" if flag == "output" else
             "copy it to gs://BUCKET/... (gcloud storage cp -r) and pass that")
      raise ConfigError(
          f"--{flag} {value} is on this machine, which Dataflow's workers "
          f"cannot {'write' if flag == 'output' else 'read'}: {fix}")
  setup = options.view_as(beam_options.SetupOptions)
  if not (setup.setup_file or setup.requirements_file or setup.extra_packages
          or options.view_as(beam_options.WorkerOptions).sdk_container_image):
    raise ConfigError(
        "Dataflow's workers would not have this package: pass --setup_file "
        "./setup.py (installs it on each worker), --sdk_container_image (an "
        "image built from dataflow/worker.Dockerfile), --extra_package (a "
        "built wheel) or --requirements_file naming it")


def plan_model_staging(config: PredictConfig, card: card_lib.ModelCard,
                       options) -> Optional[model_staging.ModelStaging]:
  """Where a local --model folder goes for Dataflow's workers (nothing
  for a gs:// one, or another runner)."""
  if not _on_dataflow(options) or paths.is_remote(config.model):
    return None
  cloud = options.view_as(beam_options.GoogleCloudOptions)
  temp_location = cloud.temp_location or cloud.staging_location
  if not temp_location or not temp_location.startswith("gs://"):
    raise ConfigError(
        f"--model {config.model} is on this machine: it is copied to "
        "--temp_location for Dataflow's workers, so pass --temp_location "
        "gs://BUCKET/tmp (or a gs:// --model)")
  return model_staging.plan(config.model, card, temp_location)


def check_workers(config: PredictConfig, card: card_lib.ModelCard,
                  options) -> None:
  """Refuses a Dataflow job whose workers would lack TensorFlow.

  --setup_file installs the slim serving package on each worker (LiteRT,
  ONNX Runtime, Pillow, Beam: no TensorFlow); the Keras and SavedModel
  engines need TensorFlow, which a worker image or a requirements file must
  bring. Every decoder, the `tensorflow` recipe included, runs without it.
  """
  if not _on_dataflow(options) or (
      not engines.needs_tensorflow(card, config.engine)):
    return
  if (options.view_as(beam_options.WorkerOptions).sdk_container_image or
      options.view_as(beam_options.SetupOptions).requirements_file):
    return
  raise ConfigError(
      f"--engine {config.engine} needs TensorFlow on the Dataflow workers, "
      "and --setup_file installs the package without it: pass "
      "--sdk_container_image with an image built from "
      "dataflow/worker.Dockerfile with EXTRAS=tensorflow (docs/dataflow.md), "
      "or --requirements_file naming tensorflow")


def _check_scheme(flag: str, path: str) -> None:
  """Refuses a URL Beam has no file system for (http://, file://, ...), and
  for --output one the lock cannot be taken on (only local and gs://)."""
  if not paths.is_remote(path):
    return
  hint = (f" (for a local path, drop the file://: {path[len('file://'):]})"
          if path.startswith("file://") else "")
  try:
    FileSystems.get_filesystem(path)
  except Exception:  # pylint: disable=broad-except
    raise ConfigError(f"--{flag} {path}: expected a local path or "
                      f"gs://BUCKET/...{hint}") from None
  if flag == "output" and not path.startswith("gs://"):
    raise ConfigError(f"--output {path}: expected a local folder or "
                      "gs://BUCKET/..., where a second run can be locked out")


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def adopt_command(model: str) -> Optional[str]:
  """The model.adopt command for a model file or SavedModel folder, if
  `model` is one."""
  is_file = model.lower().endswith((".keras", ".h5", ".hdf5", ".tflite",
                                    ".onnx"))
  if not ((is_file and FileSystems.exists(model)) or
          FileSystems.exists(paths.join(model, "saved_model.pb"))):
    return None
  name = model.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
  output = paths.join(model.rstrip("/").rsplit("/", 1)[0], name + "_model")
  command = cli.program("adopt", model.rstrip("/"), "--output", output,
                        "--class_names", "NAME,NAME,...")
  if model.lower().endswith(".onnx"):
    return command + (" --input_scale torch|symmetric|unit|... [--resize N "
                      "--center_crop M | --preprocessing_config FILE]")
  return command + " [--input_scale raw|unit|symmetric|caffe|torch]"
