"""Answers from the prediction outputs, with SQL over the Parquet files.

Usage:
  python -m tools.query OUTPUT_DIR [summary]         # the default
  python -m tools.query OUTPUT_DIR sql "SELECT label, count(*) FROM predictions GROUP BY 1"
  python -m tools.query OUTPUT_DIR accuracy
  python -m tools.query OUTPUT_DIR low-confidence --below 0.6
  python -m tools.query OUTPUT_DIR misclassified | errors | duplicates
  python -m tools.query OUTPUT_DIR compare OTHER_OUTPUT_DIR
Every command takes --json for scripts.

The views `predictions` and `errors` cover exactly the shards the folder's
manifest lists, read in place by pyarrow (no server, no copy); a damaged
shard is named in a warning and left out. SQL runs on a DuckDB connection
that can reach nothing but those views (see ResultViews).
"""

import argparse
import dataclasses
import datetime
import io
import json
import math
import os
import re
import stat
import sys
import threading
from typing import Callable, Optional

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from beam_jobs import output_folder
from beam_jobs import outputs
from model import cli
from model import paths

ECE_BINS = 10
DEFAULT_LIMIT = 20
DEFAULT_TIMEOUT_SECONDS = 300
DEFAULT_MAX_ROWS = 10000
# Statement kinds `sql` runs: queries, and EXPLAIN of a query. DESCRIBE,
# SUMMARIZE, SHOW, VALUES and FROM-first queries are SELECTs to DuckDB.
READ_ONLY_STATEMENTS = ("SELECT", "PIVOT", "EXPLAIN SELECT", "EXPLAIN PIVOT")
# Keywords no read-only query needs; a query holding one is refused. This
# catches what a statement's type hides, such as a COPY inside WITH.
DENIED_KEYWORDS = frozenset((
    "ALTER", "ATTACH", "CALL", "CHECKPOINT", "COPY", "CREATE", "DELETE",
    "DETACH", "DROP", "EXPORT", "FORCE", "IMPORT", "INSERT", "INSTALL", "LOAD",
    "MERGE", "PRAGMA", "RESET", "SET", "TRUNCATE", "UPDATE", "USE", "VACUUM"))
# Table functions that read files or run SQL from a string; a query over
# the views needs none of them.
DENIED_FUNCTION_PREFIXES = ("read_", "parquet_", "sniff_", "iceberg_",
                            "delta_")
DENIED_FUNCTIONS = frozenset(("glob", "query", "query_table", "duckdb_secrets",
                              "which_secret", "load_aws_credentials"))
# Settings fixed before the lock: no extension is installed or loaded on
# demand, and no Python variable is scanned by name.
_LOCKED_CONFIG = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "python_enable_replacements": False,
}
# The scheme under which the views' shards, and nothing else, are reachable.
SHARDS_PROTOCOL = "result-shards"
# Errors in the statement itself, never in the data it reads.
_STATEMENT_ERRORS = (
    duckdb.ParserException, duckdb.SyntaxException, duckdb.BinderException,
    duckdb.CatalogException, duckdb.PermissionException,
    duckdb.ConversionException, duckdb.OutOfRangeException,
    duckdb.OutOfMemoryException, duckdb.TransactionException,
    duckdb.NotImplementedException)
_SCHEMAS = {
    outputs.PREDICTIONS_PREFIX: outputs.predictions_schema(True),
    outputs.ERRORS_PREFIX: outputs.ERRORS_SCHEMA,
}


class QueryError(ValueError):
  """A folder, statement or request that cannot be answered."""


def warn(message: str) -> None:
  print(f"tools.query: warning: {message}", file=sys.stderr)


def _filesystem(folder: str):
  """gs:// and other remote folders go through fsspec (gcsfs for gs://)."""
  if not paths.is_remote(folder):
    return None
  try:
    return fsspec.filesystem(folder.split("://")[0])
  except Exception as error:  # pylint: disable=broad-except
    raise QueryError(f"cannot read {folder}: install gcsfs (pip install "
                     f"gcsfs) for gs:// paths ({error})") from None


def _shard_problem(path: str, filesystem, expected: pa.Schema,
                   rows: Optional[int]):
  """(schema, None) for a readable shard, or (None, why it is not).

  Only the footer is read. A local shard must be a regular file: this tool
  never writes a link or a FIFO there.
  """
  if filesystem is None:
    try:
      mode = os.lstat(path).st_mode
    except OSError as error:
      return None, f"{type(error).__name__}: {error.strerror}"
    if not stat.S_ISREG(mode):
      return None, "not a regular file (this tool writes no links or FIFOs)"
  try:
    metadata = pq.read_metadata(path, filesystem=filesystem)
    schema = metadata.schema.to_arrow_schema()
  except Exception as error:  # pylint: disable=broad-except
    return None, f"{type(error).__name__}: {error}"
  wrong = [f"{field.name} is {field.type}" for field in schema
           if field.name in expected.names and
           field.type != expected.field(field.name).type]
  if wrong or "id" not in schema.names:
    return None, ("not a shard of this kind: " +
                  (", ".join(wrong) if wrong else "it has no id column"))
  if rows is not None and metadata.num_rows != rows:
    warn(f"{path} holds {metadata.num_rows} rows; the manifest says {rows}")
  return schema, None


class _ShardReader(io.RawIOBase):
  """A read-only handle on one shard that DuckDB's threads can share.

  DuckDB may read one handle from several threads, each seeking first; the
  position is kept per thread and each read is positioned, so they never
  mix.
  """

  def __init__(self, read_at: Callable, size: int, close: Callable):
    super().__init__()
    self._read_at = read_at
    self._size = size
    self._close = close
    self._position = threading.local()

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def tell(self) -> int:
    return getattr(self._position, "offset", 0)

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(),
            io.SEEK_END: self._size}[whence]
    self._position.offset = base + offset
    return self._position.offset

  def read(self, size: int = -1) -> bytes:
    offset = self.tell()
    if size is None or size < 0:
      size = self._size - offset
    data = self._read_at(offset, size)
    self._position.offset = offset + len(data)
    return data

  def readinto(self, buffer) -> int:
    data = self.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def close(self) -> None:
    if not self.closed:
      self._close()
    super().close()


def _refuse(*args, **kwargs):
  raise PermissionError("the result views are read-only")


class ListedShards(fsspec.AbstractFileSystem):
  """The only files the locked DuckDB connection can reach: the shards the
  views read, by name, read-only.

  Any other name does not exist here; every way to write, create, move or
  delete raises. A local shard is opened without following links and must
  be a regular file.
  """

  protocol = SHARDS_PROTOCOL

  def __init__(self, shards: dict, **kwargs):
    super().__init__(skip_instance_cache=True, **kwargs)
    self._shards = dict(shards)  # name -> (real path, remote file system)

  def _real(self, path: str) -> tuple:
    name = self._strip_protocol(path).strip("/")
    if name not in self._shards:
      raise FileNotFoundError(path)
    return self._shards[name]

  def _open(self, path, mode="rb", **kwargs):
    if mode != "rb":
      _refuse()
    real, remote = self._real(path)
    if remote is not None:
      handle = remote.open(real, "rb")
      lock = threading.Lock()

      def read_at(offset, size):
        with lock:
          handle.seek(offset)
          return handle.read(size)

      return _ShardReader(read_at, remote.size(real), handle.close)
    descriptor = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    mode = os.fstat(descriptor)
    if not stat.S_ISREG(mode.st_mode):
      os.close(descriptor)
      raise PermissionError(f"{real} is not a regular file")
    return _ShardReader(
        lambda offset, size: os.pread(descriptor, size, offset),
        mode.st_size, lambda: os.close(descriptor))

  def info(self, path, **kwargs):
    name = self._strip_protocol(path).strip("/")
    if not name:
      return {"name": "", "size": 0, "type": "directory"}
    real, remote = self._real(path)
    size = remote.size(real) if remote is not None else os.lstat(real).st_size
    return {"name": name, "size": size, "type": "file"}

  def modified(self, path):
    real, remote = self._real(path)
    if remote is not None:
      return remote.modified(real)
    return datetime.datetime.fromtimestamp(os.lstat(real).st_mtime)

  def ls(self, path, detail=True, **kwargs):
    entries = [self.info(name) for name in self._shards]
    return entries if detail else [entry["name"] for entry in entries]

  mkdir = makedirs = rmdir = rm = rm_file = _rm = touch = _refuse
  mv = move = copy = cp_file = pipe_file = put_file = _refuse


class ResultViews:
  """A DuckDB connection that can read the views over a run's shards and
  nothing else.

  The views `predictions` and `errors` (and `other_*` for `compare`) read
  the shards the manifest lists with DuckDB's own Parquet reader, through
  ListedShards. Then the connection is locked down: external access off
  but for ListedShards' scheme (no other file, URL, extension or secret can
  be reached), no temporary directory, and the configuration locked so that
  no statement can undo it. That is the boundary; the statement checks of
  `run_sql` are a second layer.
  """

  def __init__(self, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS):
    self.connection = duckdb.connect(config=dict(_LOCKED_CONFIG))
    self.timeout_seconds = timeout_seconds
    self._views = {}  # view -> ([shard names], empty schema)
    self._shards = {}  # shard name -> (real path, remote file system)
    self._verified = set()  # shard names read whole without an error

  def add_folder(self, folder: str, alias: str = "") -> None:
    try:
      files = output_folder.result_files(folder)
      manifest = outputs.read_manifest(folder)
    except outputs.ManifestError as error:
      raise QueryError(f"{error}; its results cannot be told apart: run "
                       "python -m beam_jobs.predict into it again with "
                       "--overwrite") from None
    if manifest is None and not any(files.values()):
      raise QueryError(f"{folder} holds no predictions or errors: expected "
                       "the --output folder of python -m beam_jobs.predict")
    listed = output_folder.listed_rows(manifest)
    filesystem = _filesystem(folder)
    for kind, expected in _SCHEMAS.items():
      names = []
      for path in files[kind]:
        base = path.rsplit("/", 1)[-1]
        schema, problem = _shard_problem(path, filesystem, expected,
                                         listed.get(base))
        if problem:
          warn(f"skipped {path}: {problem}; the answers leave it out")
          continue
        # A generated name, never the file's own: names come from shared
        # folders, and this one is spelt into the views' SQL.
        name = f"{alias}{kind}-{len(self._shards):06d}.parquet"
        self._shards[name] = (path, filesystem)
        names.append(name)
      empty = pa.schema([field for field in expected
                         if field.name != "probabilities"])
      self._views[alias + kind] = (names, empty)

  def _create_views(self) -> None:
    for view, (names, empty) in self._views.items():
      if names:
        listed = ", ".join(f"'{SHARDS_PROTOCOL}://{name}'" for name in names)
        source = f"read_parquet([{listed}], union_by_name = true)"
      else:
        # No shard of this kind: an empty view with the kind's columns.
        self.connection.register(f"_{view}_empty", empty.empty_table())
        source = f"_{view}_empty"
      self.connection.execute(
          f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {source}")

  def lock(self) -> "ResultViews":
    """Locks the connection first, then creates the views on it."""
    self.connection.register_filesystem(ListedShards(self._shards))
    for statement in (
        "SET temp_directory = ''",
        # Both spellings: DuckDB writes a globbed scheme path with three
        # slashes.
        f"SET allowed_directories = ['{SHARDS_PROTOCOL}://', "
        f"'{SHARDS_PROTOCOL}:///']",
        "SET enable_external_access = false",
        "SET lock_configuration = true"):
      self.connection.execute(statement)
    self._create_views()
    return self

  def fetch(self, sql: str, parameters=None, max_rows: Optional[int] = None):
    """(column names, rows) of one statement, within the time limit.

    A shard whose footer was fine but whose pages are damaged fails the
    query. The shards are then read through once to find it; it is named,
    left out with a warning, and the query runs again.
    """
    while True:
      try:
        return self._fetch(sql, parameters, max_rows)
      except duckdb.InterruptException:
        raise QueryError(f"the query ran over {self.timeout_seconds:g}s "
                         "(--timeout) and was stopped") from None
      except _STATEMENT_ERRORS:
        raise
      except duckdb.Error as error:
        named = [name for name in re.findall(
            rf"{SHARDS_PROTOCOL}://([^\s'\"]+)", str(error))
                 if name in self._shards]
        damaged = self._damaged_shards(named or list(self._shards))
        if not damaged:
          raise
        self._leave_out(damaged)

  def _damaged_shards(self, names: list) -> dict:
    """{name: why} of those shards that pyarrow cannot read whole; each is
    read once at most."""
    damaged = {}
    for name in names:
      path, filesystem = self._shards[name]
      if name in self._verified:
        continue
      try:
        pq.ParquetFile(path, filesystem=filesystem).read()
        self._verified.add(name)
      except Exception as error:  # pylint: disable=broad-except
        damaged[name] = f"{type(error).__name__}: {error}"
    return damaged

  def _leave_out(self, damaged: dict) -> None:
    for name, reason in damaged.items():
      reason = " ".join(reason.split())[:300]
      warn(f"skipped {self._shards.pop(name)[0]}: damaged ({reason}); the "
           "answers leave it out")
    self._views = {view: ([n for n in names if n in self._shards], empty)
                   for view, (names, empty) in self._views.items()}
    self._create_views()

  def _fetch(self, sql, parameters, max_rows):
    timer = threading.Timer(self.timeout_seconds, self.connection.interrupt)
    timer.start()
    try:
      cursor = self.connection.execute(sql, parameters or [])
      names = [column[0] for column in cursor.description or []]
      data = (cursor.fetchall() if max_rows is None else
              cursor.fetchmany(max_rows + 1))
    finally:
      timer.cancel()
    return names, data


def connect(output_dir: str, other_dir: Optional[str] = None,
            timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> ResultViews:
  """Read-only views over one (or two) output folders, locked down."""
  views = ResultViews(timeout_seconds)
  views.add_folder(output_dir)
  if other_dir is not None:
    views.add_folder(other_dir, alias="other_")
  return views.lock()


def rows(connection: ResultViews, sql: str, parameters=None) -> list:
  """The result of a query as a list of {column: value} dicts."""
  names, data = connection.fetch(sql, parameters)
  return [dict(zip(names, row)) for row in data]


def scalar(connection: ResultViews, sql: str, parameters=None):
  """The first value of a query's first row."""
  return connection.fetch(sql, parameters)[1][0][0]


def _tokens(sql: str) -> list:
  """(position, type, text) of each token of `sql`, comments left out."""
  marks = duckdb.tokenize(sql)
  tokens = []
  for i, (position, kind) in enumerate(marks):
    end = marks[i + 1][0] if i + 1 < len(marks) else len(sql)
    if kind != duckdb.token_type.comment:
      tokens.append((position, kind, sql[position:end].strip()))
  return tokens


def _explained(sql: str) -> str:
  """The statement after EXPLAIN [ANALYZE | (options)]."""
  tokens = _tokens(sql)
  i = 1
  if i < len(tokens) and tokens[i][2].upper() in ("ANALYZE", "ANALYSE"):
    i += 1
  elif i < len(tokens) and tokens[i][2] == "(":
    depth = 0
    while i < len(tokens):
      depth += tokens[i][2] == "("
      depth -= tokens[i][2] == ")"
      i += 1
      if depth == 0:
        break
  return sql[tokens[i][0]:] if i < len(tokens) else ""


def statement_kind(sql: str) -> str:
  """SELECT, PIVOT, EXPLAIN SELECT, ... or the type of a refused statement."""
  try:
    statements = duckdb.extract_statements(sql)
  except duckdb.Error as error:
    raise QueryError(f"cannot parse SQL: {error}") from None
  if len(statements) != 1:
    raise QueryError(f"expected one SQL statement, got {len(statements)}")
  try:
    kind = statements[0].type.name
  except ValueError:
    return "UNKNOWN"  # A type this DuckDB's Python API has no name for.
  tokens = _tokens(sql)
  if kind == "MULTI" and tokens and tokens[0][2].upper() in (
      "PIVOT", "PIVOT_WIDER"):
    return "PIVOT"
  if kind == "EXPLAIN":
    return "EXPLAIN " + statement_kind(_explained(sql))
  return kind


def check_read_only(sql: str) -> None:
  """Refuses, in one line, anything but one query or EXPLAIN of a query."""
  kind = statement_kind(sql)
  if kind not in READ_ONLY_STATEMENTS:
    raise QueryError(f"only read-only queries are allowed (SELECT, WITH, "
                     f"EXPLAIN, DESCRIBE, SUMMARIZE, PIVOT), not {kind}")
  tokens = _tokens(sql)
  denied = sorted({text.upper() for _, token, text in tokens
                   if token == duckdb.token_type.keyword and
                   text.upper() in DENIED_KEYWORDS})
  if denied:
    raise QueryError(f"only read-only queries are allowed; {', '.join(denied)} "
                     "has no place in one (quote it, \"like_this\", if it "
                     "names a column)")
  for (_, kind, text), (_, following_kind, following) in zip(tokens,
                                                             tokens[1:]):
    name = text.strip('"').lower()
    if following == "(" and kind in (duckdb.token_type.identifier,
                                      duckdb.token_type.keyword) and (
                                          name in DENIED_FUNCTIONS or
                                          name.startswith(
                                              DENIED_FUNCTION_PREFIXES)):
      raise QueryError(f"{name}() reads files or runs SQL from a string; "
                       "query the views predictions and errors instead")
    if text.upper() in ("FROM", "JOIN") and (
        following_kind == duckdb.token_type.string_const):
      raise QueryError(f"{text.upper()} {following} reads a file by name; "
                       "query the views predictions and errors instead")


def run_sql(connection: ResultViews, statement: str,
            max_rows: int = DEFAULT_MAX_ROWS) -> list:
  """Runs one read-only statement: a query, EXPLAIN, DESCRIBE or SUMMARIZE,
  and returns at most `max_rows` rows (with a warning when there are more)."""
  check_read_only(statement)
  try:
    names, data = connection.fetch(statement, max_rows=max_rows)
  except duckdb.Error as error:
    message = " ".join(str(error).split())
    raise QueryError(f"SQL error: {message}") from None
  if len(data) > max_rows:
    warn(f"showing the first {max_rows} rows (--max_rows)")
    data = data[:max_rows]
  return [dict(zip(names, row)) for row in data]


def class_counts(connection) -> list:
  return rows(connection, """
      SELECT label, count(*) AS images,
             round(count(*) / sum(count(*)) OVER (), 4) AS share,
             round(avg(confidence), 4) AS mean_confidence
      FROM predictions GROUP BY label ORDER BY images DESC, label""")


def confidence_histogram(connection) -> list:
  return rows(connection, f"""
      SELECT least(floor(confidence * {ECE_BINS}), {ECE_BINS - 1}) / {ECE_BINS}
               AS bin_start,
             count(*) AS images
      FROM predictions GROUP BY 1 ORDER BY 1""")


def error_summary(connection) -> dict:
  by_stage = rows(connection, """
      SELECT stage, count(*) AS errors FROM errors
      GROUP BY stage ORDER BY errors DESC, stage""")
  reasons = rows(connection, """
      SELECT stage, split_part(error, ':', 1) AS reason, count(*) AS errors
      FROM errors GROUP BY ALL ORDER BY errors DESC, stage, reason LIMIT 5""")
  return {"by_stage": by_stage, "top_reasons": reasons}


def low_confidence(connection, below: float = 0.6,
                   limit: int = DEFAULT_LIMIT) -> list:
  return rows(connection, """
      SELECT id, label, round(confidence, 4) AS confidence, true_label
      FROM predictions WHERE confidence < ?
      ORDER BY confidence, id LIMIT ?""", [below, limit])


def misclassified(connection, limit: int = DEFAULT_LIMIT) -> list:
  return rows(connection, """
      SELECT id, label, round(confidence, 4) AS confidence, true_label
      FROM predictions
      WHERE true_label IS NOT NULL AND label <> true_label
      ORDER BY confidence DESC, id LIMIT ?""", [limit])


def error_rows(connection, limit: int = DEFAULT_LIMIT) -> list:
  return rows(connection, "SELECT id, stage, error FROM errors ORDER BY id "
               "LIMIT ?", [limit])


def _columns(connection, view: str = "predictions") -> set:
  return {row["column_name"] for row in rows(connection, f"DESCRIBE {view}")}


def class_names_of(output_dir: str) -> Optional[list]:
  """The model's class names in index order, from the run's manifest."""
  manifest = outputs.read_manifest(output_dir) or {}
  return manifest.get("class_names")


def label_check(connection, class_names: Optional[list] = None) -> dict:
  """How the given true labels matched the model's classes.

  Returns the rows' count with a label that names a class ("matched") and
  with one that matches none ("unmatched", with the most common of them),
  and the SQL condition that selects the matched rows.
  """
  if "source_label" in _columns(connection):
    # predict matched the labels itself: true_label is a class name or null,
    # and source_label keeps each label as it was given.
    scored = "true_label IS NOT NULL"
    unmatched = "source_label IS NOT NULL AND true_label IS NULL"
    given, parameters = "source_label", []
  else:
    # Outputs of an earlier version hold labels as given in true_label; only
    # those naming a known class (or, lacking the card's list, a predicted
    # one) can be scored.
    known = class_names or [r["label"] for r in rows(
        connection, "SELECT DISTINCT label FROM predictions")]
    scored = "list_contains(?::VARCHAR[], true_label)"
    unmatched = ("true_label IS NOT NULL AND NOT list_contains(?::VARCHAR[], "
                 "true_label)")
    given, parameters = "true_label", [known]
  return {
      "matched": scalar(connection, f"SELECT count(*) FROM predictions WHERE "
                        f"{scored}", parameters),
      "unmatched": scalar(connection, "SELECT count(*) FROM predictions "
                          f"WHERE {unmatched}", parameters),
      "unmatched_examples": rows(connection, f"""
          SELECT {given} AS label, count(*) AS images FROM predictions
          WHERE {unmatched} GROUP BY 1 ORDER BY images DESC, label LIMIT 5""",
                                 parameters),
      "condition": (scored, parameters),
  }


def _examples(labels: dict) -> str:
  return ", ".join(f"{r['label']!r} ({r['images']})"
                   for r in labels["unmatched_examples"])


def accuracy(connection, class_names: Optional[list] = None) -> dict:
  """Accuracy, per-class precision/recall/F1, confusion and calibration.

  Only rows whose true label names one of the model's classes count; with
  `class_names` (the card's, in index order) the matrix has every class.
  """
  labels = label_check(connection, class_names)
  if not labels["matched"]:
    if labels["unmatched"]:
      raise QueryError(
          f"none of the {labels['unmatched']} true labels names a class of "
          f"the model (most common: {_examples(labels)}); labels must be "
          "class names or class indices, so there is no score to give")
    raise QueryError("no prediction has a true_label: accuracy needs inputs "
                     "in class folders or a --label_column")
  scored, parameters = labels.pop("condition")
  labelled = labels["matched"]
  correct = scalar(connection, "SELECT count(*) FROM predictions "
                    f"WHERE {scored} AND true_label = label", parameters)
  classes = list(class_names) if class_names else [
      row["name"] for row in rows(connection, f"""
      SELECT name FROM (
        SELECT label AS name, min(label_index) AS position FROM predictions
        GROUP BY label
        UNION ALL
        SELECT true_label, NULL FROM predictions
        WHERE {scored} GROUP BY true_label)
      GROUP BY name ORDER BY min(position) NULLS LAST, name""", parameters)]
  pairs = rows(connection, f"""
      SELECT true_label, label, count(*) AS images FROM predictions
      WHERE {scored} GROUP BY ALL""", parameters)
  index = {name: i for i, name in enumerate(classes)}
  matrix = [[0] * len(classes) for _ in classes]
  for pair in pairs:
    matrix[index[pair["true_label"]]][index[pair["label"]]] = pair["images"]
  per_class = []
  for i, name in enumerate(classes):
    true_positive = matrix[i][i]
    predicted = sum(row[i] for row in matrix)
    support = sum(matrix[i])
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / support if support else 0.0
    f1 = (2 * precision * recall / (precision + recall)
          if precision + recall else 0.0)
    per_class.append({"class": name, "precision": round(precision, 6),
                      "recall": round(recall, 6), "f1": round(f1, 6),
                      "support": support})
  bins = rows(connection, f"""
      SELECT least(floor(confidence * {ECE_BINS}), {ECE_BINS - 1})::INTEGER
               AS bin,
             count(*) AS images,
             avg(confidence::DOUBLE) AS mean_confidence,
             avg((label = true_label)::INTEGER::DOUBLE) AS accuracy
      FROM predictions WHERE {scored} GROUP BY 1 ORDER BY 1""", parameters)
  ece = sum(b["images"] / labelled * abs(b["accuracy"] - b["mean_confidence"])
            for b in bins)
  return {
      "labelled": labelled,
      "correct": correct,
      "accuracy": correct / labelled,
      "unmatched_labels": labels["unmatched"],
      "unmatched_examples": labels["unmatched_examples"],
      "classes": classes,
      "per_class": per_class,
      "confusion_matrix": matrix,
      "expected_calibration_error": ece,
      "calibration_bins": bins,
  }


_ALL_IDS = "(SELECT id FROM predictions UNION ALL SELECT id FROM errors)"


def duplicate_count(connection) -> int:
  """Rows, predictions and errors together, whose id an earlier row had."""
  return scalar(connection,
                f"SELECT count(*) - count(DISTINCT id) FROM {_ALL_IDS}")


def duplicates(connection, limit: int = DEFAULT_LIMIT) -> list:
  return rows(connection, f"""
      SELECT id, count(*) AS rows FROM {_ALL_IDS}
      GROUP BY id HAVING count(*) > 1 ORDER BY rows DESC, id LIMIT ?""",
              [limit])


def summary(connection, output_dir: str) -> dict:
  manifest = outputs.read_manifest(output_dir)
  class_names = (manifest or {}).get("class_names")
  labels = label_check(connection, class_names)
  labels.pop("condition")
  result = {
      "manifest": manifest,
      "predictions": scalar(connection, "SELECT count(*) FROM predictions"),
      "errors": scalar(connection, "SELECT count(*) FROM errors"),
      "duplicate_ids": duplicate_count(connection),
      "classes": class_counts(connection),
      "confidence_histogram": confidence_histogram(connection),
      "error_summary": error_summary(connection),
      "least_confident": low_confidence(connection, below=1.01, limit=5),
  }
  result["true_labels"] = labels
  try:
    scores = accuracy(connection, class_names)
    result["accuracy"] = {k: scores[k] for k in ("labelled", "correct",
                                                 "accuracy")}
  except QueryError:
    result["accuracy"] = None
  return result


def compare(connection, limit: int = DEFAULT_LIMIT) -> dict:
  """Where two runs disagree on the same ids, with counts per label pair."""
  joined = """FROM predictions AS a JOIN other_predictions AS b USING (id)"""
  return {
      "common_ids": scalar(connection, f"SELECT count(*) {joined}"),
      "only_here": scalar(connection, "SELECT count(*) FROM predictions "
                           "WHERE id NOT IN (SELECT id FROM other_predictions)"),
      "only_other": scalar(connection, "SELECT count(*) FROM other_predictions "
                            "WHERE id NOT IN (SELECT id FROM predictions)"),
      "disagreements": scalar(
          connection, f"SELECT count(*) {joined} WHERE a.label <> b.label"),
      "label_pairs": rows(connection, f"""
          SELECT a.label AS label, b.label AS other_label, count(*) AS images
          {joined} WHERE a.label <> b.label
          GROUP BY ALL ORDER BY images DESC, label, other_label LIMIT ?""",
                           [limit]),
      "examples": rows(connection, f"""
          SELECT id, a.label AS label, round(a.confidence, 4) AS confidence,
                 b.label AS other_label,
                 round(b.confidence, 4) AS other_confidence
          {joined} WHERE a.label <> b.label ORDER BY id LIMIT ?""", [limit]),
  }


def format_table(rows: list, title: str = "") -> str:
  """A plain fixed-width table for the terminal."""
  lines = [title] if title else []
  if not rows:
    return "\n".join(lines + ["  (none)"])
  columns = list(rows[0])
  cells = [[_cell(row[c]) for c in columns] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells))
            for i, c in enumerate(columns)]
  lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  lines.append("  ".join("-" * w for w in widths))
  lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells)
  return "\n".join(lines)


def _cell(value) -> str:
  if isinstance(value, float):
    return "" if math.isnan(value) else f"{value:.4g}"
  return "" if value is None else str(value)


def render_summary(result: dict) -> str:
  manifest = result["manifest"] or {}
  counts = manifest.get("counts", {})
  parts = [f"model {manifest.get('model_id', '?')}: "
           f"{result['predictions']} predictions, {result['errors']} errors"
           + (f", {counts.get('inputs')} inputs, "
              f"{manifest.get('images_per_second')} images/s"
              if counts else "")]
  if result["duplicate_ids"]:
    parts.append(f"{result['duplicate_ids']} rows repeat an id an earlier row "
                 "had (the `duplicates` command lists them)")
  if result["accuracy"]:
    score = result["accuracy"]
    parts.append(f"accuracy {score['accuracy']:.4f} ({score['correct']}/"
                 f"{score['labelled']} labelled images)")
  if result["true_labels"]["unmatched"]:
    parts.append(_unmatched_line(result["true_labels"]["unmatched"],
                                 result["true_labels"]))
  parts.append(format_table(result["classes"], "\npredictions per class"))
  parts.append(format_table(result["confidence_histogram"],
                            "\nconfidence histogram"))
  parts.append(format_table(result["error_summary"]["top_reasons"],
                            "\nerrors by stage and reason"))
  parts.append(format_table(result["least_confident"],
                            "\nleast confident images"))
  return "\n".join(parts)


def _unmatched_line(count: int, labels: dict) -> str:
  return (f"{count} true labels match no class of the model and are not "
          f"scored (most common: {_examples(labels)})")


def render_accuracy(result: dict) -> str:
  header = [f"accuracy {result['accuracy']:.4f} ({result['correct']}/"
            f"{result['labelled']}), expected calibration error "
            f"{result['expected_calibration_error']:.4f}"]
  if result["unmatched_labels"]:
    header.append(_unmatched_line(
        result["unmatched_labels"],
        {"unmatched_examples": result["unmatched_examples"]}))
  confusion = [dict({"true \\ predicted": name},
                    **dict(zip(result["classes"], row)))
               for name, row in zip(result["classes"],
                                    result["confusion_matrix"])]
  return "\n".join(header + [
      format_table(result["per_class"], "\nper class"),
      format_table(confusion, "\nconfusion matrix (rows: true class, "
                   "columns: predicted class)"),
  ])


def render_compare(result: dict) -> str:
  head = (f"{result['common_ids']} common ids, {result['disagreements']} "
          f"disagree; {result['only_here']} only here, "
          f"{result['only_other']} only in the other run")
  return "\n".join([head, format_table(result["label_pairs"], "\nlabel pairs"),
                    format_table(result["examples"], "\nexamples")])


_LIMIT = ("--limit", {"type": int, "default": DEFAULT_LIMIT,
                      "help": "rows to show"})


@dataclasses.dataclass(frozen=True)
class Command:
  """A sub-command: its help, its own arguments, what it runs and shows."""
  help: str
  run: Callable  # (connection, parsed arguments) -> result
  arguments: tuple = ()  # (name, argparse keyword arguments) pairs
  render: Callable = format_table
  # (output folder) -> commands worth running next, shown after the tables.
  next: Callable = lambda output_dir: []


def _report_command(output_dir: str) -> str:
  return cli.command("python", "-m", "tools.report", output_dir, "--out",
                     outputs.report_dir_for(output_dir))


COMMANDS = {
    "summary": Command(
        "counts, classes, confidence and errors (the default)",
        lambda connection, args: summary(connection, args.output_dir),
        render=render_summary,
        next=lambda output_dir: [
            cli.command("python", "-m", "tools.query", output_dir,
                        "accuracy"),
            cli.command("python", "-m", "tools.query", output_dir, "errors"),
            _report_command(output_dir)]),
    "sql": Command(
        "one read-only SQL statement over the views predictions and errors",
        lambda connection, args: run_sql(connection, args.statement,
                                         args.max_rows),
        (("statement", {"help": "e.g. \"SELECT label, count(*) FROM "
                                "predictions GROUP BY 1\""}),
         ("--max_rows", {"type": int, "default": DEFAULT_MAX_ROWS,
                         "help": "rows to return at most"}))),
    "accuracy": Command(
        "accuracy, per-class precision/recall/F1, confusion matrix and "
        "calibration (needs true labels)",
        lambda connection, args: accuracy(connection,
                                          class_names_of(args.output_dir)),
        render=render_accuracy,
        next=lambda output_dir: [
            cli.command("python", "-m", "tools.query", output_dir,
                        "misclassified"),
            _report_command(output_dir)]),
    "low-confidence": Command(
        "the least confident predictions",
        lambda connection, args: low_confidence(connection, args.below,
                                                args.limit),
        (("--below", {"type": float, "default": 0.6,
                      "help": "show predictions below this confidence"}),
         _LIMIT)),
    "misclassified": Command(
        "the most confident predictions that disagree with the true label",
        lambda connection, args: misclassified(connection, args.limit),
        (_LIMIT,)),
    "errors": Command(
        "inputs that could not be classified, with their stage and reason",
        lambda connection, args: error_rows(connection, args.limit),
        (_LIMIT,)),
    "duplicates": Command(
        "ids that more than one row has, with their row counts",
        lambda connection, args: duplicates(connection, args.limit),
        (_LIMIT,)),
    "compare": Command(
        "where two runs disagree on the same ids",
        lambda connection, args: compare(connection, args.limit),
        (("other_dir", {"help": "the --output folder of the other run"}),
         _LIMIT),
        render=render_compare),
}
DEFAULT_COMMAND = "summary"


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="python -m tools.query",
      description="Query the outputs of python -m beam_jobs.predict.")
  parser.add_argument("output_dir", help="the --output folder of a run")
  parser.add_argument("--json", action="store_true",
                      help="print JSON instead of tables")
  parser.add_argument("--timeout", type=float,
                      default=DEFAULT_TIMEOUT_SECONDS,
                      help="seconds a query may run before it is stopped")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                   help=f"default: {DEFAULT_COMMAND}")
  for name, command in COMMANDS.items():
    sub = commands.add_parser(name, help=command.help,
                              description=command.help)
    for argument, options in command.arguments:
      sub.add_argument(argument, **options)
    sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                     help="print JSON instead of tables")
  return parser


def answer(args) -> object:
  command = COMMANDS[args.command or DEFAULT_COMMAND]
  connection = connect(args.output_dir, getattr(args, "other_dir", None),
                       args.timeout)
  return command.run(connection, args)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    result = answer(args)
  except QueryError as error:
    print(f"tools.query: error: {error}", file=sys.stderr)
    return 2
  except duckdb.Error as error:
    message = " ".join(str(error).split())
    print(f"tools.query: error: {message}", file=sys.stderr)
    return 1
  command = COMMANDS[args.command or DEFAULT_COMMAND]
  if args.json:
    print(json.dumps(result, indent=2, default=str))
  else:
    print(command.render(result))
    cli.print_next(None, command.next(args.output_dir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
