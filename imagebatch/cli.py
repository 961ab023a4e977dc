"""What every command here shares: strict flags, help with defaults, quiet
library logs, and closing lines that say where results are and what is next.

A misspelled flag is refused in one line that names the nearest known flag,
with exit 2, as git and gcloud answer one; argparse alone would accept a
prefix of a flag, print its usage and suggest nothing.

TensorFlow, LiteRT and Beam print lines on every healthy CPU run that read
like failures (`E0000 ... failed call to cuInit`). Some come from C++ while
the libraries load, before Python's logging or TF_CPP_MIN_LOG_LEVEL apply, so
`quiet_libraries` passes the process's stderr through a small filter process
that drops exactly those lines and nothing else. A separate process, not a
thread, so that a crash's last words still reach the terminal: the filter
reads until every writer is gone.
"""

import argparse
import atexit
import difflib
import glob
import logging
import os
import re
import shlex
import subprocess
import sys
from typing import Iterable, Optional

USAGE_ERROR = 2

# Lines a healthy CPU run prints, matched whole. Each names the library line
# it comes from, so an unexpected message (a real error) never matches.
_ABSL = r"[IWE]\d{4} [\d:.]+ +\d+ "
NOISE_LINES = (
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are "
    r"written to STDERR",
    _ABSL + r"port\.cc:\d+\] oneDNN custom operations are on\..*",
    _ABSL + r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your "
    r"machine, GPU will not be used\.",
    _ABSL + r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized "
    r"to use available CPU instructions.*",
    r"To enable the following instructions: .* in other operations, rebuild "
    r"TensorFlow with the appropriate compiler flags\.",
    # tf.data's options carry an attribute the bundled op registry lacks;
    # printed once per TFLite conversion or SavedModel export, harmless.
    _ABSL + r"node_def_util\.cc:\d+\] NodeDef mentions attribute "
    r"use_unbounded_threadpool which is not in the op definition: .*",
    r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.",
    # Beam's RunInference looks for `resource` next to an optional torch
    # import; without torch it warns on every model load.
    r"(WARNING:root:|WARNING )?Resource module is not available for current "
    r"platform, memory usage cannot be fetched\.",
)
# Only where no GPU device exists is a failed cuInit expected; on a GPU
# machine it is a real driver problem and stays visible.
NO_GPU_NOISE_LINES = (
    _ABSL + r"cuda_(platform|executor|diagnostics)\.cc:\d+\] failed call to "
    r"cuInit: .*",
)
# C++ INFO and WARNING lines once the libraries have loaded; errors stay.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2"}

# The filter process: stdin is the parent's stderr, stdout the terminal.
# It ignores Ctrl-C so the parent's last lines (a traceback) still pass.
_FILTER = r"""
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
noise = re.compile(sys.argv[1].encode())
out = sys.stdout.buffer
for line in sys.stdin.buffer:
  if not noise.fullmatch(line.rstrip(b"\r\n")):
    out.write(line)
    out.flush()
"""
_FILTER_EXIT_SECONDS = 5


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Shows every flag's default, and the description as it is written."""

  def _get_help_string(self, action):
    text = action.help or ""
    if ("%(default)" in text or "(default:" in text or
        action.default is argparse.SUPPRESS):
      return text
    if not action.option_strings:
      return text  # A positional argument: its place in the usage says it.
    if action.required:
      return f"{text} (required)"
    if action.default is None:
      default = "none"
    elif action.default is False and action.nargs == 0:
      default = "off"
    else:
      default = "%(default)s"
    return f"{text} (default: {default})"


class ArgumentParser(argparse.ArgumentParser):
  """argparse, strict: exact flag names only, one-line errors, exit 2."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    kwargs.setdefault("formatter_class", HelpFormatter)
    super().__init__(*args, **kwargs)

  def parse_args(self, args=None, namespace=None):
    namespace, extras = self.parse_known_args(args, namespace)
    if extras:
      self.error(unknown_arguments_message(extras,
                                           option_names(self, namespace)))
    return namespace

  def error(self, message):
    choice = _INVALID_CHOICE.match(message)
    if choice:
      close = difflib.get_close_matches(
          choice.group(1), re.findall(r"'([^']*)'", choice.group(2)), n=1)
      if close:
        message += f"; did you mean {close[0]}?"
    self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


_INVALID_CHOICE = re.compile(r".*invalid choice: '([^']*)' \(choose from (.*)\)$")


def option_names(parser: argparse.ArgumentParser, namespace=None) -> list:
  """The flags of a parser and of its sub-commands: with a parsed
  `namespace`, only of the sub-command it chose."""
  names = []
  for action in parser._actions:  # pylint: disable=protected-access
    names.extend(o for o in action.option_strings if o.startswith("--"))
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      chosen = getattr(namespace, action.dest, None) if namespace else None
      for name, sub in action.choices.items():
        if namespace is None or name == chosen:
          names.extend(option_names(sub, namespace))
  return sorted(set(names))


def unknown_arguments_message(extras: list, known: Iterable[str]) -> str:
  """One line naming the unknown flags, each with its nearest known flag."""
  known = list(known)
  flags = [e for e in extras if e.startswith("-")]
  if not flags:
    return f"unexpected argument{'s' if len(extras) > 1 else ''} " + ", ".join(
        repr(e) for e in extras)
  parts = []
  for flag in flags:
    name = flag.split("=", 1)[0]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
  return f"unknown flag{'s' if len(parts) > 1 else ''} " + ", ".join(parts)


class _Formatter(logging.Formatter):
  """Our INFO lines as plain sentences; warnings and errors say what they are."""

  def format(self, record):
    text = super().format(record)
    return text if record.levelno < logging.WARNING else (
        f"{record.levelname} {text}")


def configure_logging(verbose: bool) -> None:
  """Our own INFO lines; other libraries' INFO lines only with --verbose."""
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s")
                       if verbose else _Formatter("%(message)s"))
  logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                      handlers=[handler])
  for package in ("imagebatch", "model", "beam_jobs", "tools"):
    logging.getLogger(package).setLevel(logging.INFO)


def _has_gpu_device() -> bool:
  return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/dxg"))


def noise_pattern(gpu: bool = False) -> str:
  lines = NOISE_LINES + (() if gpu else NO_GPU_NOISE_LINES)
  return "|".join(f"(?:{line})" for line in lines)


def quiet_libraries(verbose: bool) -> None:
  """Keeps library noise off stderr for this process and its children.

  Call it once at the start of a command's `main`, before TensorFlow or a
  model loads. Settings the user made (TF_CPP_MIN_LOG_LEVEL) are kept, and
  `verbose` leaves everything as the libraries print it.
  """
  configure_logging(verbose)
  if verbose:
    return
  for name, value in QUIET_ENVIRONMENT.items():
    os.environ.setdefault(name, value)
  try:
    stderr = sys.stderr.fileno()
  except (AttributeError, ValueError, OSError):
    return  # No real stderr (an embedding host): nothing to filter.
  sys.stderr.flush()
  terminal = os.dup(stderr)
  process = subprocess.Popen(
      [sys.executable, "-I", "-S", "-c", _FILTER,
       noise_pattern(_has_gpu_device())],
      stdin=subprocess.PIPE, stdout=terminal, close_fds=True)
  os.dup2(process.stdin.fileno(), stderr)
  process.stdin.close()

  def restore():
    # The terminal back on stderr closes the pipe, so the filter drains and
    # ends; waiting for it keeps our last lines before the shell's prompt.
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(terminal, stderr)
    os.close(terminal)
    try:
      process.wait(timeout=_FILTER_EXIT_SECONDS)
    except subprocess.TimeoutExpired:
      pass  # A worker process still holds the pipe; the filter ends with it.

  atexit.register(restore)


def command(*parts) -> str:
  """A shell command line with each part quoted as needed."""
  return " ".join(shlex.quote(str(part)) for part in parts)


# The install's commands, by the name each "Next:" line suggests them with.
PROGRAMS = {
    "train": "model.train",
    "adopt": "model.adopt",
    "datasets": "model.datasets",
    "predict": "beam_jobs.predict",
    "query": "tools.query",
    "report": "tools.report",
    "make_shards": "tools.make_shards",
}


def program(name: str, *arguments) -> str:
  """The command line that runs one of PROGRAMS with `arguments`."""
  return command("python", "-m", PROGRAMS[name], *arguments)


def predict_command(input_: str = "IMAGES_OR_SHARDS", model: str = "MODEL_DIR",
                    *flags: str) -> str:
  """The predict line a closing "Next:" suggests; `flags` go after --input."""
  return program("predict", "--input", input_, *flags, "--model", model,
                 "--output", "OUTPUT_DIR")


def print_next(results: Optional[str], commands: Iterable[str]) -> None:
  """The closing lines of a command: where its results are, what is next."""
  commands = list(commands)
  if results or commands:
    print()
  if results:
    print(f"Results: {results}")
  if commands:
    print("Next:")
    for line in commands:
      print(f"  {line}")
