"""The flags of `python -m beam_jobs.predict`: our own, and Beam's.

`parse_args` refuses a flag that is neither ours nor a Beam pipeline option;
beam_jobs/preflight.py then checks the values and what they name, once,
before any work.
"""

import argparse
import dataclasses
import sys
from typing import Optional

from apache_beam.options import pipeline_options as beam_options

from beam_jobs.contracts import DEFAULT_BATCH_SIZE
from imagebatch import cli
from model import engines
from model import image_limits

DEFAULT_TOP_K = 3
ENGINE_CHOICES = ("auto",) + engines.ENGINES
INPUT_FORMATS = ("auto", "images", "parquet")
DEFAULT_PROGRESS_SECONDS = 5.0
# Runners that learn extra pipeline options from their job server at
# submission; flags unknown to Beam's Python options may be theirs.
JOB_SERVER_RUNNERS = ("PortableRunner", "FlinkRunner", "SparkRunner",
                      "PrismRunner")
DATAFLOW_RUNNERS = ("DataflowRunner", "TestDataflowRunner")
# Without --runner a run is local, on Beam's Python FnApiRunner: what every
# figure and test here ran on. Beam 2.77's DirectRunner would first try the
# Prism runner (downloading it from GitHub), then fall back to the same
# FnApiRunner after building the pipeline twice: about 1 s more per run,
# measured (benchmarks/README.md, "Start-up").
DEFAULT_RUNNER = "FnApiRunner"
# What input_format becomes with --input_list.
LIST_FORMAT = "list"


class ConfigError(ValueError):
  """A flag, path or model that is not as expected."""


@dataclasses.dataclass(frozen=True)
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
  # Also write the card's embedding (fixed_size_list<float32>[D]).
  write_embeddings: bool = False
  image_column: str = "image"
  id_column: Optional[str] = "id"
  # Rows whose id an earlier row had are counted for the manifest; off, the
  # run holds no ids (the local runner keeps every shuffled id in the
  # launcher) and tools.query's `duplicates` counts them from the results.
  count_duplicate_ids: bool = True
  # None: `label` where a shard or list has it (contracts.
  # DEFAULT_LABEL_COLUMN); '': no labels.
  label_column: Optional[str] = None
  max_image_pixels: Optional[int] = image_limits.DEFAULT_MAX_IMAGE_PIXELS
  inference_threads: int = 0
  overwrite: bool = False
  skip_existing: bool = False
  # A run whose share of failed inputs is above this exits 1 (after
  # committing); None: only a run where every input failed does.
  max_error_rate: Optional[float] = None
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


def is_dataflow_dry_run(options) -> bool:
  """Whether Dataflow will build the job and submit nothing (--dry_run, as
  the DataflowRunner reads it: any value but none)."""
  return runner_name(options.view_as(
      beam_options.StandardOptions)) in DATAFLOW_RUNNERS and bool(
      options.view_as(beam_options.TestOptions).dry_run)


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
  parser.add_argument("--write_embeddings", action="store_true",
                      help="also write the embedding, the vector that feeds "
                      "the classifier, as the column embedding "
                      "(fixed_size_list<float32>[D])")
  parser.add_argument("--image_column", default="image",
                      help="Parquet column with image bytes or raw pixels")
  parser.add_argument("--id_column", default="id",
                      help="Parquet (or list) column with ids; empty for "
                      "none: ids become SHARD#ROW (a list's: the URI)")
  parser.add_argument("--no_duplicate_count", action="store_true",
                      help="do not count repeated ids (the manifest's "
                      "duplicate_ids is then null; `query OUTPUT duplicates` "
                      "finds them in the results)")
  parser.add_argument("--label_column", default=None,
                      help="Parquet (or list) column with the true label: a "
                      "class name or a class index; by default `label` "
                      "where a shard or list has it, '' for none")
  parser.add_argument("--max_image_pixels", type=int,
                      default=image_limits.DEFAULT_MAX_IMAGE_PIXELS,
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
  parser.add_argument("--max_error_rate", type=float, default=None,
                      help="exit 1 (after writing the results) when more "
                      "than this share of inputs failed, 0 to 1; by default "
                      "only when every input failed")
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


def with_default_runner(beam_args) -> list:
  """Beam's arguments, with --runner DEFAULT_RUNNER unless they name one."""
  beam_args = list(beam_args or [])
  if any(arg == "--runner" or arg.startswith("--runner=") for arg in beam_args):
    return beam_args
  return beam_args + ["--runner", DEFAULT_RUNNER]


def runner_name(beam_options_namespace) -> str:
  runner = getattr(beam_options_namespace, "runner", None) or DEFAULT_RUNNER
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
      if runner_name(known) not in JOB_SERVER_RUNNERS:
        raise ConfigError(f"{message}; our flags are in --help, and any "
                          "Beam pipeline option is accepted")
      # A job server adds its runner's own options only when the job is
      # submitted, so they cannot be checked here.
      print(f"beam_jobs.predict: warning: {message}: passed to the "
            f"{runner_name(known)} job server unchecked", file=sys.stderr)
  fields = vars(args)
  fields["id_column"] = fields["id_column"] or None
  fields["count_duplicate_ids"] = not fields.pop("no_duplicate_count")
  return PredictConfig(**fields), rest
