"""The command lines as a new user meets them: strict flags, help with
defaults, README tables that match the parsers, and stderr kept free of
library noise."""

import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

# Without the tools extra (tools.query and tools.report build their parsers on import) these tests skip.
pytest.importorskip("duckdb")
pytest.importorskip("matplotlib")
# pylint: disable=wrong-import-position

from beam_jobs import config as config_lib
from model import adopt
from imagebatch import cli
from model import datasets
from model import train
from tests.helpers import REPO
from tools import make_shards
from tools import query
from tools import report

PARSERS = {
    "python -m model.train": train.build_parser,
    "python -m model.adopt": adopt.build_parser,
    "python -m model.datasets": datasets.build_parser,
    "python -m beam_jobs.predict": config_lib.build_parser,
    "python -m tools.query": query.build_parser,
    "python -m tools.report": report.build_parser,
    "python -m tools.make_shards": make_shards.build_parser,
}
# Every flag a Dataflow job of the README passes; Beam knows them all.
DATAFLOW_FLAGS = [
    "--runner", "DataflowRunner", "--project", "p", "--region", "r",
    "--temp_location", "gs://b/t", "--setup_file", "./setup.py",
    "--dry_run=True", "--number_of_worker_harness_threads", "2",
    "--experiments=no_use_multiple_sdk_containers", "--job_name", "j",
    "--machine_type", "n2-standard-4", "--max_num_workers", "20",
    "--sdk_container_image", "gcr.io/p/i", "--save_main_session",
    "--direct_num_workers", "2", "--direct_running_mode", "multi_processing",
]
REQUIRED = ["--input", "in", "--model", "m", "--output", "o"]


@pytest.mark.parametrize("flags, suggestion", [
    (["--write_probabilites"], "--write_probabilities"),
    (["--batchsize", "64"], "--batch_size"),
    (["--batch", "64"], "--batch_size"),  # No prefixes: argparse's default.
    (["--direct_num_worker", "2"], "--direct_num_workers"),
    (["--temp_locaton=gs://b/t"], "--temp_location"),
])
def test_predict_refuses_unknown_flags_with_a_suggestion(flags, suggestion):
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.parse_args(REQUIRED + flags)
  message = str(error.value)
  assert f"(did you mean {suggestion}?)" in message
  assert "\n" not in message


def test_predict_passes_every_beam_option_on():
  config, beam_args = config_lib.parse_args(REQUIRED + DATAFLOW_FLAGS)
  assert beam_args == DATAFLOW_FLAGS
  assert config.batch_size == 256
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
  options = PipelineOptions(beam_args).get_all_options()
  assert options["dry_run"] == "True"
  assert options["experiments"] == ["no_use_multiple_sdk_containers"]
  assert options["number_of_worker_harness_threads"] == 2


def test_our_flags_and_beams_do_not_overlap():
  ours = set(cli.option_names(config_lib.build_parser())) - {"--help"}
  beams = set(cli.option_names(config_lib.beam_option_parser()))
  assert not ours & beams
  # Beam's parser is the whole set Beam reads: every options class.
  for flag in ("--runner", "--project", "--region", "--temp_location",
               "--setup_file", "--dry_run", "--experiments",
               "--number_of_worker_harness_threads", "--direct_num_workers",
               "--job_endpoint", "--environment_type", "--flink_master",
               "--sdk_container_image", "--save_main_session"):
    assert flag in beams, flag


def test_a_bad_value_for_a_beam_option_is_one_line():
  with pytest.raises(config_lib.ConfigError, match="invalid int value"):
    config_lib.parse_args(REQUIRED + ["--direct_num_workers", "two"])


@pytest.mark.slow
@pytest.mark.parametrize("module, args, suggestion", [
    ("beam_jobs.predict", REQUIRED + ["--write_probabilites"],
     "--write_probabilities"),
    ("model.train", ["--output", "x", "--epoch", "3"], "--epochs"),
    ("tools.query", ["out", "low-confidence", "--bellow", "0.5"], "--below"),
    ("tools.report", ["out", "--out", "r", "--sample", "3"], "--samples"),
    ("tools.make_shards", ["in", "out", "--rows_per_shards", "5"],
     "--rows_per_shard"),
])
def test_misspelled_flag_exits_2_in_one_line(module, args, suggestion):
  result = subprocess.run([sys.executable, "-m", module, *args],
                          capture_output=True, text=True, cwd=REPO,
                          timeout=120, check=False)
  assert result.returncode == 2, result.stderr
  assert result.stderr.count("\n") == 1, result.stderr
  assert f"did you mean {suggestion}?" in result.stderr
  assert result.stdout == ""


def _help_actions(parser, name):
  """(command, action) for every flag, argument and sub-command."""
  import argparse  # pylint: disable=import-outside-toplevel
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._HelpAction):  # pylint: disable=protected-access
      continue
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      helps = {a.dest: a.help for a in action._choices_actions}  # pylint: disable=protected-access
      for command, sub in action.choices.items():
        yield f"{name} {command}", argparse.Namespace(
            option_strings=[command], help=helps.get(command), default=None,
            required=False)
        yield from _help_actions(sub, f"{name} {command}")
      continue
    yield name, action


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_explains_every_flag_and_shows_defaults(name):
  import argparse  # pylint: disable=import-outside-toplevel
  parser = PARSERS[name]()
  for command, action in _help_actions(parser, name):
    assert action.help and action.help.strip(), (command, action)
    if action.option_strings and action.default is not argparse.SUPPRESS and (
        not isinstance(action, argparse.Namespace)):
      shown = cli.HelpFormatter(name)._get_help_string(action)  # pylint: disable=protected-access
      assert "(default:" in shown or "(required)" in shown, (command, shown)
  assert "(default:" in parser.format_help()


# The README's flag tables: a marker names the command, the table follows.
_TABLE_MARKER = re.compile(r"<!-- flags: (python -m [\w.]+) -->\n+((?:\|.*\n)+)")


def _readme_tables() -> dict:
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
    text = handle.read()
  tables = {}
  for command, table in _TABLE_MARKER.findall(text):
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in table.strip().splitlines()]
    assert rows[0][:2] == ["flag", "default"], rows[0]
    tables[command] = rows[2:]
  return tables


def _readme_default(text: str):
  """A README default cell as the parser's value: empty (required), none and
  a default computed at run time (in italics) are None, off is False."""
  text = text.strip()
  if text.startswith("*"):
    return None
  text = text.replace("`", "").replace(",", "")
  return {"": None, "none": None, "off": False}.get(text, text)


def test_readme_flag_tables_match_the_parsers():
  tables = _readme_tables()
  assert {"python -m beam_jobs.predict", "python -m model.train"} <= set(
      tables), sorted(tables)
  for command, rows in tables.items():
    parser = PARSERS[command]()
    flags = {action.option_strings[0]: action for action in parser._actions  # pylint: disable=protected-access
             if action.option_strings and action.dest != "help"}
    documented = {}
    for row in rows:
      names = re.findall(r"`(--\w+)`", row[0])
      # One default per flag, or one shared by all the row's flags.
      defaults = [d.strip() for d in row[1].split(",")] if len(names) > 1 else [
          row[1]]
      if len(defaults) == 1:
        defaults = defaults * len(names)
      assert len(defaults) == len(names), (command, row)
      documented.update(zip(names, defaults))
    assert set(documented) == set(flags), (
        command, set(documented) ^ set(flags))
    for name, default in documented.items():
      action = flags[name]
      expected = None if action.required else action.default
      readme = _readme_default(default)
      if expected is None or isinstance(expected, bool):
        assert readme == expected, (command, name, default, expected)
      elif isinstance(expected, (int, float)):
        assert float(readme) == expected, (command, name, default, expected)
      else:
        assert readme == str(expected), (command, name, default, expected)


# Lines this machine's TensorFlow, LiteRT and Beam print on healthy runs.
NOISE_SAMPLES = [
    "WARNING: All log messages before absl::InitializeLog() is called are "
    "written to STDERR",
    "I0000 00:00:1795738564.342146    6641 port.cc:153] oneDNN custom "
    "operations are on. You may see slightly different numerical results due "
    "to floating-point round-off errors from different computation orders. "
    "To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "I0000 00:00:1795738564.342554    6641 cudart_stub.cc:31] Could not find "
    "cuda drivers on your machine, GPU will not be used.",
    "E0000 00:00:1795738568.862689    6641 cuda_platform.cc:52] failed call "
    "to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR "
    "(303)",
    "E0000 00:00:1795738692.299199    6641 node_def_util.cc:682] NodeDef "
    "mentions attribute use_unbounded_threadpool which is not in the op "
    "definition: Op<name=MapDataset; signature=input_dataset:variant> This "
    "may be expected if your graph generating binary is newer than this "
    "binary.",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "WARNING Resource module is not available for current platform, memory "
    "usage cannot be fetched.",
    "WARNING:root:Resource module is not available for current platform, "
    "memory usage cannot be fetched.",
]
REAL_LINES = [
    "E0000 00:00:1795738692.299199    6641 node_def_util.cc:682] NodeDef "
    "mentions attribute some_other_attribute which is not in the op "
    "definition",
    "F0000 00:00:1795738692.299199    6641 kernel.cc:12] Check failed: x",
    "E0000 00:00:1795738568.862689    6641 session.cc:52] OOM when allocating",
    "Traceback (most recent call last):",
    "WARNING some other warning",
    "beam_jobs.predict: error: --model x is not a model folder",
]


def test_noise_pattern_matches_the_noise_and_nothing_else():
  noise = re.compile(cli.noise_pattern())
  for line in NOISE_SAMPLES:
    assert noise.fullmatch(line), line
  for line in REAL_LINES:
    assert not noise.fullmatch(line), line
  # Where a GPU exists, a failed cuInit is a real driver problem.
  assert not re.compile(cli.noise_pattern(gpu=True)).fullmatch(
      NOISE_SAMPLES[3])


_FILTERED_PROCESS = textwrap.dedent("""
    import os, signal, sys
    from imagebatch import cli
    cli.quiet_libraries(verbose=sys.argv[1] == "verbose")
    # Written below Python, as C++ libraries write, and through Python.
    os.write(2, ({noise!r} + "\\n" + {real!r} + "\\n").encode())
    print("a Python warning", file=sys.stderr)
    if sys.argv[2] == "crash":
      os.write(2, b"F0000 last words before the crash\\n")
      os.kill(os.getpid(), signal.SIGKILL)
    """)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["quiet", "verbose", "crash"])
def test_stderr_filter_drops_noise_only_and_keeps_a_crashs_last_words(mode):
  script = _FILTERED_PROCESS.format(noise="\n".join(NOISE_SAMPLES[:3]),
                                    real=REAL_LINES[1])
  result = subprocess.run(
      [sys.executable, "-c", script, "verbose" if mode == "verbose" else "-",
       mode], capture_output=True, text=True, cwd=REPO, timeout=60,
      check=False)
  lines = result.stderr.splitlines()
  assert REAL_LINES[1] in lines and "a Python warning" in lines
  if mode == "verbose":
    assert all(line in lines for line in NOISE_SAMPLES[:3])
  else:
    assert not any(line in lines for line in NOISE_SAMPLES[:3]), lines
  if mode == "crash":
    assert result.returncode == -signal.SIGKILL
    assert "F0000 last words before the crash" in lines
  else:
    assert result.returncode == 0, result.stderr


# What a healthy CPU run must not print (the list), as substrings.
NOISE_MARKS = ("absl::InitializeLog", "cuInit", "use_unbounded_threadpool",
               "Resource module is not available", "oneDNN custom operations",
               "cudart_stub", "cpu_feature_guard", "XNNPACK",
               "Assets written to")


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True,
                        text=True, cwd=REPO, timeout=300, check=False,
                        env=env)


@pytest.mark.slow
def test_a_healthy_run_on_the_sample_prints_no_library_noise(tmp_path,
                                                            png_dir):
  from tests.helpers import SAMPLE_DIR  # pylint: disable=import-outside-toplevel
  # A fresh user's environment: nothing set to quieten TensorFlow.
  env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
  model = str(tmp_path / "model")
  trained = _cli("model.train", "--data", SAMPLE_DIR, "--output", model,
                 "--architecture", "tutorial_mlp", "--epochs", "2", env=env)
  assert trained.returncode == 0, trained.stderr
  # Keras' own per-epoch lines, then where the model is and what is next.
  assert "Epoch 2/2" in trained.stdout
  assert re.search(r"^\d+/\d+ - \d+s - .* - val_accuracy: ", trained.stdout,
                   re.MULTILINE), trained.stdout
  assert f"Results: {model}" in trained.stdout
  assert "python -m beam_jobs.predict" in trained.stdout

  shards = str(tmp_path / "shards")
  assert _cli("tools.make_shards", png_dir, shards, env=env).returncode == 0
  runs = {
      "tflite": _cli("beam_jobs.predict", "--input", png_dir, "--model", model,
                     "--output", str(tmp_path / "tflite"), env=env),
      # The Keras engine loads TensorFlow inside the pipeline.
      "keras": _cli("beam_jobs.predict", "--input",
                    os.path.join(shards, "*.parquet"), "--label_column",
                    "label", "--model", model, "--output",
                    str(tmp_path / "keras"), "--engine", "keras", env=env),
  }
  for name, result in runs.items():
    assert result.returncode == 0, (name, result.stderr)
    output = str(tmp_path / name)
    assert f"python -m tools.query {output}" in result.stdout, name
    assert f"python -m tools.report {output}" in result.stdout, name
    for stderr in (trained.stderr, result.stderr):
      for mark in NOISE_MARKS:
        assert mark not in stderr, (name, mark, stderr)

  verbose = _cli("beam_jobs.predict", "--input", png_dir, "--model", model,
                 "--output", str(tmp_path / "verbose"), "--verbose", env=env)
  assert verbose.returncode == 0, verbose.stderr
  assert "XNNPACK" in verbose.stderr and "INFO" in verbose.stderr


def test_commands_end_with_where_results_are_and_what_is_next(tmp_path,
                                                             capsys):
  from tests.helpers import SAMPLE_DIR  # pylint: disable=import-outside-toplevel
  images, shards = str(tmp_path / "images"), str(tmp_path / "shards")
  assert datasets.main(["--data", SAMPLE_DIR, "--to_png", images,
                        "--limit", "6"]) == 0
  assert make_shards.main([images, shards]) == 0
  out = capsys.readouterr().out
  assert f"Results: {images}" in out and f"Results: {shards}" in out
  assert f"python -m tools.make_shards {images}" in out
  assert f"python -m beam_jobs.predict --input '{shards}/images-*.parquet'" in (
      out)

  import numpy as np  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from beam_jobs import outputs  # pylint: disable=import-outside-toplevel
  results = tmp_path / "out"
  results.mkdir()
  pq.write_table(outputs.predictions_table(
      ["a", "b"], ["s", "s"], ["cat", None], np.eye(2, dtype=np.float32),
      ["cat", "dog"], 1, "m", "tflite", False),
                 results / "predictions-00000-of-00001.parquet")
  pq.write_table(outputs.ERRORS_SCHEMA.empty_table(),
                 results / "errors-00000-of-00001.parquet")
  assert query.main([str(results)]) == 0
  out = capsys.readouterr().out
  assert out.rstrip().endswith(
      f"python -m tools.report {results} --out {results}-report")
  assert f"python -m tools.query {results} accuracy" in out
  # Machine-readable output stays pure.
  assert query.main([str(results), "accuracy", "--json"]) == 0
  assert "Next:" not in capsys.readouterr().out


@pytest.mark.parametrize("args, expected", [
    (["out", "acuracy"], "did you mean accuracy?"),
    (["out", "accuracy", "--limit", "3"], "unknown flag --limit"),
    (["out", "low-confidence", "--limt", "3"], "did you mean --limit?"),
])
def test_query_names_the_nearest_command_or_flag(args, expected, capsys):
  with pytest.raises(SystemExit) as exit_info:
    query.build_parser().parse_args(args)
  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  assert expected in error and error.count("\n") == 1, error
  # A flag of another sub-command is not offered as the fix.
  assert "did you mean --limit?" not in error or "--limt" in args
