"""Validated configuration for `python -m beam_jobs.predict`.

Every check that can fail before the pipeline starts does so here, once, with
one line naming what was expected.
"""

import argparse
import csv
import dataclasses
import io
import re
import sys
from typing import Optional

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options import pipeline_options as beam_options

from beam_jobs import output_folder
from beam_jobs import sources
from beam_jobs.contracts import DEFAULT_BATCH_SIZE
from model import card as card_lib
from model import cli
from model import engines
from model import paths
from model import preprocessing

DEFAULT_TOP_K = 3
ENGINE_CHOICES = ("auto",) + engines.ENGINES
INPUT_FORMATS = ("auto", "images", "parquet")
DEFAULT_PROGRESS_SECONDS = 5.0
# Runners that learn extra pipeline options from their job server at
# submission; flags unknown to Beam's Python options may be theirs.
JOB_SERVER_RUNNERS = ("PortableRunner", "FlinkRunner", "SparkRunner",
                      "PrismRunner")
DATAFLOW_RUNNERS = ("DataflowRunner", "TestDataflowRunner")
# What input_format becomes with --input_list.
LIST_FORMAT = "list"
_BIGQUERY_TABLE = re.compile(r"^[a-z][a-z0-9.:-]*[a-z0-9]:\w+\.[\w$-]+$")


class ConfigError(ValueError):
  """A flag, path or model that is not as expected."""


@dataclasses.dataclass
class PredictConfig:
  # One of `input` (a folder, glob or shards) and `input_list` (lists of
  # image URIs).
  input: Optional[str]
  model: str
  output: str
  input_format: str = "auto"
  # auto: the fastest engine the model folder holds.
  engine: str = "auto"
  batch_size: int = DEFAULT_BATCH_SIZE
  top_k: int = DEFAULT_TOP_K
  write_probabilities: bool = False
  image_column: str = "image"
  id_column: Optional[str] = "id"
  label_column: Optional[str] = None
  max_image_pixels: Optional[int] = preprocessing.DEFAULT_MAX_IMAGE_PIXELS
  inference_threads: int = 0
  overwrite: bool = False
  skip_existing: bool = False
  bigquery_table: Optional[str] = None
  progress_seconds: float = DEFAULT_PROGRESS_SECONDS
  verbose: bool = False
  input_list: Optional[str] = None
  uri_column: str = "uri"

  def resolved_format(self) -> str:
    if self.input_list:
      return LIST_FORMAT
    if self.input_format != "auto":
      return self.input_format
    return "parquet" if self.input.endswith(".parquet") else "images"

  def validate(self, offline: bool = False) -> card_lib.ModelCard:
    """Checks everything that can be checked before any work; returns the
    card. `offline` (a dry run) skips the checks of a remote input or
    output, which need the network."""
    if bool(self.input) == bool(self.input_list):
      raise ConfigError("pass one of --input (an image folder, a glob, or "
                        "Parquet shards) and --input_list (lists of image "
                        "URIs)")
    if self.input_list and self.input_format not in ("auto", LIST_FORMAT):
      raise ConfigError("--input_format is for --input; each list file's "
                        "format comes from its name (.parquet, .csv, else "
                        "text)")
    for name in ("input", "input_list", "model", "output"):
      if getattr(self, name):
        _check_scheme(name, getattr(self, name))
        setattr(self, name, paths.absolute(getattr(self, name)))
    if self.input_format not in INPUT_FORMATS + (LIST_FORMAT,):
      raise ConfigError(f"--input_format must be one of {INPUT_FORMATS}")
    self.input_format = self.resolved_format()
    if self.engine not in ENGINE_CHOICES:
      raise ConfigError(f"--engine must be one of {ENGINE_CHOICES}")
    for name in ("batch_size", "top_k"):
      if getattr(self, name) < 1:
        raise ConfigError(f"--{name} must be at least 1")
    if self.progress_seconds < 0:
      raise ConfigError("--progress_seconds must be 0 (no progress lines) or "
                        "more")
    if self.max_image_pixels is not None and not (
        1 <= self.max_image_pixels <= preprocessing.PILLOW_PIXEL_LIMIT):
      raise ConfigError(
          "--max_image_pixels must be between 1 and "
          f"{preprocessing.PILLOW_PIXEL_LIMIT}: Pillow refuses larger images "
          "itself")
    if self.bigquery_table and not _BIGQUERY_TABLE.match(self.bigquery_table):
      raise ConfigError(f"--bigquery_table {self.bigquery_table!r} must look "
                        "like PROJECT:DATASET.TABLE")
    if self.skip_existing and self.overwrite:
      raise ConfigError("--skip_existing keeps earlier results and --overwrite "
                        "replaces them; pass one of them")
    card = self._load_card()
    flag, pattern = ("input_list", self.input_list) if self.input_list else (
        "input", self.input if self.input_format == "parquet" else
        paths.expand_pattern(self.input))
    if offline and paths.is_remote(pattern):
      self._check_output(card, offline)
      return card
    # One match is enough to know the input is there; the pipeline lists all.
    matched = paths.match_paths(pattern, limit=1)
    if not matched:
      kind = {"parquet": "Parquet shards", "images": "image files",
              LIST_FORMAT: "text, CSV or Parquet lists of image URIs"}
      raise ConfigError(f"--{flag} {getattr(self, flag)} matches no files: "
                        f"expected {kind[self.input_format]}")
    if self.input_format == "parquet":
      self._check_columns(matched[0])
    elif self.input_format == LIST_FORMAT:
      self._check_list_columns(matched[0])
    self._check_output(card, offline)
    return card

  def _load_card(self) -> card_lib.ModelCard:
    if not FileSystems.exists(paths.join(self.model, card_lib.CARD_FILE)):
      adopt = adopt_command(self.model)
      if adopt:
        raise ConfigError(
            f"--model {self.model} is a model trained elsewhere, not a model "
            f"folder; make one first: {adopt}")
      raise ConfigError(
          f"--model {self.model} is not a model folder: missing "
          f"{card_lib.CARD_FILE} (expected the output of python -m "
          "model.train or python -m model.adopt)")
    try:
      card = card_lib.load_card(self.model)
    except (ValueError, OSError) as error:
      raise ConfigError(f"--model {self.model}: {error}") from None
    if self.engine == "auto":
      self.engine = card.default_engine
    elif self.engine not in card.engines:
      raise ConfigError(
          f"--engine {self.engine}: {self.model} holds no {self.engine} "
          f"model; it serves with {', '.join(card.engines)}")
    try:
      card_lib.check_model_files(self.model, card, self.engine)
      if "tflite" in card.engines:
        # Keras and SavedModel engines check their width when they load.
        engines.check_model_shapes(card, paths.read_bytes(
            paths.join(self.model, card_lib.TFLITE_FILE)))
    except (ValueError, OSError) as error:
      raise ConfigError(f"--model {self.model}: {error}") from None
    return card

  def _check_columns(self, shard_path: str) -> None:
    try:
      with paths.open_file(shard_path) as handle:
        schema = pq.ParquetFile(handle).schema_arrow
    except Exception:  # pylint: disable=broad-except
      # An unreadable shard is reported per shard by the pipeline itself.
      return
    for flag in ("image_column", "id_column", "label_column"):
      column = getattr(self, flag)
      if column and column not in schema.names:
        raise ConfigError(f"--{flag} {column!r} is not a column of "
                          f"{shard_path}; it has {schema.names}")
    problem = sources.image_column_problem(
        schema.field(self.image_column).type)
    if problem:
      raise ConfigError(f"--image_column {self.image_column!r} of "
                        f"{shard_path} {problem}")

  def _check_list_columns(self, list_path: str) -> None:
    """The --uri_column (and --label_column) of the first list file."""
    kind = sources.list_format(list_path)
    if kind == "text":
      if self.label_column:
        raise ConfigError(
            f"--label_column {self.label_column!r}: {list_path} is a text "
            "list, one URI per line with no columns; give labels in a CSV or "
            "Parquet list")
      return
    try:
      with paths.open_file(list_path) as handle:
        if kind == "parquet":
          names = pq.ParquetFile(handle).schema_arrow.names
        else:
          text = io.TextIOWrapper(handle, encoding="utf-8-sig",
                                  errors="replace", newline="")
          names = next(csv.reader(text), [])
    except Exception:  # pylint: disable=broad-except
      # An unreadable list is reported by the pipeline, as one error row.
      return
    for flag in ("uri_column", "label_column"):
      column = getattr(self, flag)
      if column and column not in names:
        raise ConfigError(f"--{flag} {column!r} is not a column of "
                          f"{list_path}; it has {names}")

  def _check_output(self, card: card_lib.ModelCard,
                    offline: bool = False) -> None:
    """What the folder holds: beam_jobs/output_folder.py decides."""
    if offline and paths.is_remote(self.output):
      return
    try:
      output_folder.check(output_folder.inspect(self.output), card.model_id,
                          self.overwrite, self.skip_existing)
      if not offline:  # a dry run writes nothing, not even the folder
        output_folder.check_writable(self.output)
    except output_folder.FolderError as error:
      raise ConfigError(str(error)) from None


def is_dataflow_dry_run(options) -> bool:
  """Whether Dataflow will build the job and submit nothing (--dry_run, as
  the DataflowRunner reads it: any value but none)."""
  return _runner_name(options.view_as(
      beam_options.StandardOptions)) in DATAFLOW_RUNNERS and bool(
      options.view_as(beam_options.TestOptions).dry_run)


def check_workers(config: PredictConfig, card: card_lib.ModelCard,
                  options) -> None:
  """Refuses a Dataflow job whose workers would lack TensorFlow.

  --setup_file installs the slim serving package on each worker (LiteRT,
  Pillow, Beam: no TensorFlow); the Keras and SavedModel engines need
  TensorFlow, which a worker image or a requirements file must bring. Both
  decoders, the `tensorflow` recipe included, run without it.
  """
  if _runner_name(options.view_as(
      beam_options.StandardOptions)) not in DATAFLOW_RUNNERS or (
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


def adopt_command(model: str) -> Optional[str]:
  """The model.adopt command for a model file or SavedModel folder, if
  `model` is one."""
  is_file = model.lower().endswith((".keras", ".h5", ".hdf5", ".tflite"))
  if not ((is_file and FileSystems.exists(model)) or
          FileSystems.exists(paths.join(model, "saved_model.pb"))):
    return None
  name = model.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
  output = paths.join(model.rstrip("/").rsplit("/", 1)[0], name + "_model")
  return (f"python -m model.adopt {model.rstrip('/')} --output {output} "
          "--class_names NAME,NAME,... [--input_scale raw|unit|symmetric|"
          "caffe|torch]")


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="python -m beam_jobs.predict",
      description="Classify images from a directory, Parquet shards or lists\n"
      "of image URIs.\n\n"
      "Beam's pipeline options (--runner, --direct_num_workers, --project,\n"
      "--region, --temp_location, ...) are accepted too; any other flag is\n"
      "refused.")
  parser.add_argument("--input", default=None,
                      help="image directory or glob, or a glob of .parquet "
                      "shards (local or gs://)")
  parser.add_argument("--input_list", default=None,
                      help="instead of --input: a glob of list files of "
                      "image URIs, by name .txt (one per line), .csv or "
                      ".parquet (columns --uri_column, --id_column, "
                      "--label_column)")
  parser.add_argument("--uri_column", default="uri",
                      help="CSV or Parquet list column with the image URIs")
  parser.add_argument("--model", required=True,
                      help="model folder written by python -m model.train or "
                      "python -m model.adopt")
  parser.add_argument("--output", required=True, help="output folder")
  parser.add_argument("--input_format", default="auto", choices=INPUT_FORMATS,
                      help="auto: parquet when --input ends in .parquet")
  parser.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                      help="auto: the fastest the model folder holds "
                      "(tflite when present)")
  parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                      help="images per read, decode and inference batch")
  parser.add_argument("--top_k", type=int, default=DEFAULT_TOP_K,
                      help="best classes kept in the top_k column")
  parser.add_argument("--write_probabilities", action="store_true",
                      help="also write the full probability vector")
  parser.add_argument("--image_column", default="image",
                      help="Parquet column with image bytes or raw pixels")
  parser.add_argument("--id_column", default="id",
                      help="Parquet (or list) column with ids; empty for "
                      "none: ids become SHARD#ROW (a list's: the URI)")
  parser.add_argument("--label_column", default=None,
                      help="Parquet (or list) column with the true label: a "
                      "class name or a class index")
  parser.add_argument("--max_image_pixels", type=int,
                      default=preprocessing.DEFAULT_MAX_IMAGE_PIXELS,
                      help="images declaring more pixels are refused "
                      "undecoded")
  parser.add_argument("--inference_threads", type=int, default=0,
                      help="threads per model; 0 picks the engine default")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the results in --output (this model's, "
                      "another model's, or a folder with files this tool did "
                      "not write); deletes only this tool's own kinds of file")
  parser.add_argument("--bigquery_table", default=None,
                      help="also write predictions to PROJECT:DATASET.TABLE "
                      "and errors to PROJECT:DATASET.TABLE_errors")
  parser.add_argument("--skip_existing", action="store_true",
                      help="keep --output's predictions by this model and "
                      "classify only inputs whose ids it lacks")
  parser.add_argument("--progress_seconds", type=float,
                      default=DEFAULT_PROGRESS_SECONDS,
                      help="seconds between progress lines on local runners; "
                      "0 for none")
  parser.add_argument("--verbose", action="store_true",
                      help="also TensorFlow's, LiteRT's and Beam's own log "
                      "lines")
  return parser


def beam_option_parser() -> argparse.ArgumentParser:
  """The parser Beam builds for its pipeline options, as Beam builds it.

  `PipelineOptions.get_all_options` parses with every loaded subclass of
  PipelineOptions (standard, Google Cloud, worker, setup, direct, portable,
  Flink, Spark, Prism, ...), abbreviations off; an argument none of them
  knows is dropped there with a warning. Building the same parser lets us
  refuse it instead, before any work.
  """
  parser = beam_options._BeamArgumentParser(allow_abbrev=False)  # pylint: disable=protected-access
  classes = {}
  for cls in beam_options.PipelineOptions.__subclasses__():
    classes.setdefault(str(cls), cls)
  for cls in classes.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access

  def error(message):
    # Beam ignores ambiguity; any other parse error fails the run there too.
    if not message.startswith("ambiguous option: "):
      raise ConfigError(f"Beam pipeline option: {message}")

  parser.error = error
  return parser


def _runner_name(beam_options_namespace) -> str:
  runner = getattr(beam_options_namespace, "runner", None) or "DirectRunner"
  return runner.rsplit(".", 1)[-1] if isinstance(runner, str) else (
      type(runner).__name__)


def parse_args(argv=None):
  """Returns (PredictConfig, Beam's pipeline arguments).

  Raises ConfigError for a flag that is neither ours nor a Beam pipeline
  option, naming the nearest known flag.
  """
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  if rest:
    beam_parser = beam_option_parser()
    known, unknown = beam_parser.parse_known_args(rest)
    if unknown:
      message = cli.unknown_arguments_message(
          unknown, cli.option_names(parser) + cli.option_names(beam_parser))
      if _runner_name(known) not in JOB_SERVER_RUNNERS:
        raise ConfigError(f"{message}; our flags are in --help, and any "
                          "Beam pipeline option is accepted")
      # A job server adds its runner's own options only when the job is
      # submitted, so they cannot be checked here.
      print(f"beam_jobs.predict: warning: {message}: passed to the "
            f"{_runner_name(known)} job server unchecked", file=sys.stderr)
  fields = vars(args)
  fields["id_column"] = fields["id_column"] or None
  return PredictConfig(**fields), rest
