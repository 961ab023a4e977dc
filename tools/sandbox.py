"""The SQL sandbox: DuckDB views over a run's listed shards, and nothing else.

This is the security boundary of tools.query and tools.report. Output
folders are shared (a gs:// bucket, a colleague's run), so every name and
byte in them is untrusted:

* The shards a folder's manifest lists reach DuckDB under generated names,
  through a read-only file system of their own (`ListedShards`); no name
  from the folder is ever spelt into SQL.
* The connection is locked before any view exists: external access off but
  for that file system, no temporary directory, limits on memory and
  threads, and the configuration locked so no statement can undo it.
* `run_sql` checks a user's statement as a second layer (tools/sql_checks.py):
  one read-only statement that reads the views and calls only the functions
  of an allow-list.
"""

import contextlib
import datetime
import io
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
from imagebatch import paths
from tools import limits
from tools.sql_checks import QueryError
from tools.sql_checks import check_read_only

DEFAULT_TIMEOUT_SECONDS = limits.DEFAULT_TIMEOUT_SECONDS
DEFAULT_MAX_ROWS = limits.DEFAULT_MAX_ROWS
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


def warn(message: str) -> None:
  print(f"tools.query: warning: {message}", file=sys.stderr)


def one_line(error: BaseException, limit: int = 500) -> str:
  """An error as one line of at most `limit` characters; DuckDB's messages
  name their kind themselves."""
  text = " ".join(str(error).split())
  if not isinstance(error, duckdb.Error):
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= limit else text[:limit] + "..."


def read_manifest(folder: str) -> Optional[dict]:
  """The folder's manifest, as outputs.read_manifest reads it; but a local
  `_run.json` that is not a regular file is refused before anything opens
  it (a FIFO would block forever; this tool writes no links), and one nested
  too deeply to parse is a damaged manifest. Raises outputs.ManifestError."""
  path = outputs.manifest_path(folder)
  if not paths.is_remote(folder):
    try:
      mode = os.lstat(path).st_mode
    except FileNotFoundError:
      mode = None
    except OSError as error:
      raise outputs.ManifestError(
          f"{path} cannot be read: {error.strerror}") from None
    if mode is not None and not stat.S_ISREG(mode):
      raise outputs.ManifestError(
          f"{path} is not a regular file (this tool writes no links or "
          "FIFOs)")
  try:
    return outputs.read_manifest(folder)
  except RecursionError:
    raise outputs.ManifestError(f"{path} is nested too deeply to be a "
                                "manifest this tool wrote") from None


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

  Every statement runs within `timeout_seconds`, in at most `memory_limit`
  bytes of DuckDB's memory (default: limits.default_memory_limit()) and on
  `threads` threads (default: this process's cores).
  """

  def __init__(self, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
               memory_limit: Optional[int] = None,
               threads: Optional[int] = None):
    if not (isinstance(timeout_seconds, (int, float)) and
            math.isfinite(timeout_seconds) and timeout_seconds > 0):
      raise QueryError(f"the time limit must be a finite number of seconds "
                       f"above 0, not {timeout_seconds!r}")
    self.memory_limit = int(memory_limit or limits.default_memory_limit())
    self.threads = int(threads or limits.default_threads())
    if self.memory_limit < limits.MIN_MEMORY_BYTES or self.threads < 1:
      raise QueryError(f"a memory limit of at least {limits.MIN_MEMORY_BYTES} "
                       "bytes and at least 1 thread are needed")
    self.connection = duckdb.connect(config=dict(_LOCKED_CONFIG))
    self.timeout_seconds = timeout_seconds
    self._views = {}  # view -> ([shard names], empty schema)
    self._shards = {}  # shard name -> (real path, remote file system)
    self._verified = set()  # shard names read whole without an error
    self.manifests = {}  # folder alias -> its manifest (or None)

  @property
  def manifest(self) -> Optional[dict]:
    """The manifest of the first folder, as the views were made from it."""
    return self.manifests.get("")

  def add_folder(self, folder: str, alias: str = "") -> None:
    try:
      # Read (and refused) first, so nothing below opens a FIFO in its place.
      manifest = read_manifest(folder)
      files = output_folder.result_files(folder)
    except (outputs.ManifestError, RecursionError, TypeError, KeyError,
            AttributeError, ValueError) as error:
      if not isinstance(error, outputs.ManifestError):
        error = (f"{outputs.manifest_path(folder)} is not a manifest this "
                 f"tool wrote ({type(error).__name__})")
      raise QueryError(f"{error}; its results cannot be told apart: run "
                       "python -m beam_jobs.predict into it again with "
                       "--overwrite") from None
    self.manifests[alias] = manifest
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

  def out_of_memory(self) -> str:
    return (f"the query needed more memory than "
            f"{limits.format_bytes(self.memory_limit)} (--memory_limit) and "
            "was stopped")

  @property
  def views(self) -> list:
    """The names of the views a query may read."""
    return list(self._views)

  def lock(self) -> "ResultViews":
    """Locks the connection first, then creates the views on it."""
    self.connection.register_filesystem(ListedShards(self._shards))
    for statement in (
        # Both are integers, checked in __init__.
        f"SET memory_limit = '{self.memory_limit:d}B'",
        f"SET threads = {self.threads:d}",
        # No progress bar on stderr during a long scan.
        "SET enable_progress_bar = false",
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
    """(column names, rows) of one statement, within the limits. A shard
    whose footer was fine but whose pages are damaged fails the query; the
    shards are then read through once to find it, it is named and left out
    with a warning, and the query runs again."""
    while True:
      try:
        with self._within_limits():
          cursor = self.connection.execute(sql, parameters or [])
          names = [column[0] for column in cursor.description or []]
          return names, (cursor.fetchall() if max_rows is None else
                         cursor.fetchmany(max_rows + 1))
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

  def record_batches(self, sql: str, parameters=None,
                     rows_per_batch: int = 4096):
    """Yields pyarrow RecordBatches of one statement over the views, so a
    caller holds one batch at a time; the whole scan runs within the time
    limit. For the canned answers only: `sql` is never a user's."""
    with self._within_limits():
      # A relation streams; a DB-API result would be copied whole first.
      yield from self.connection.sql(sql, params=parameters or None
                                     ).to_arrow_reader(rows_per_batch)

  @contextlib.contextmanager
  def _within_limits(self):
    """Interrupts the statement at the time limit; running over it, or out
    of memory, is one QueryError."""
    timer = threading.Timer(self.timeout_seconds, self.connection.interrupt)
    timer.start()
    try:
      yield
    except duckdb.InterruptException:
      raise QueryError(f"the query ran over {self.timeout_seconds:g}s "
                       "(--timeout) and was stopped") from None
    except (duckdb.OutOfMemoryException, MemoryError):
      raise QueryError(self.out_of_memory()) from None
    finally:
      timer.cancel()


def connect(output_dir: str, other_dir: Optional[str] = None,
            timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
            memory_limit: Optional[int] = None,
            threads: Optional[int] = None) -> ResultViews:
  """Read-only views over one (or two) output folders, locked down."""
  views = ResultViews(timeout_seconds, memory_limit, threads)
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


def run_sql(connection: ResultViews, statement: str,
            max_rows: int = DEFAULT_MAX_ROWS) -> list:
  """Runs one read-only statement: a query, EXPLAIN, DESCRIBE or SUMMARIZE,
  and returns at most `max_rows` rows (with a warning when there are more)."""
  if isinstance(max_rows, bool) or not isinstance(max_rows, int) or (
      max_rows < 1):
    raise QueryError(f"max_rows must be a whole number of at least 1, not "
                     f"{max_rows!r}")
  check_read_only(statement, connection.views)
  try:
    names, data = connection.fetch(statement, max_rows=max_rows)
  except duckdb.Error as error:
    raise QueryError(f"SQL error: {one_line(error)}") from None
  if len(data) > max_rows:
    warn(f"showing the first {max_rows} rows (--max_rows)")
    data = data[:max_rows]
  return [dict(zip(names, row)) for row in data]
