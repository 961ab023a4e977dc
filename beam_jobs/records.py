"""The output folder's JSON records, `_run.json` and `_run.lock`, as read.

Output folders are shared (a gs:// bucket, a colleague's run), so a record
is untrusted bytes until it has passed every check here, and each failure
is one `RecordError` naming the file and what is wrong with it:

* Only a regular file is opened, never a link, FIFO or device: the open is
  non-blocking and does not follow a link (O_NOFOLLOW), and the file is
  checked with fstat before a byte is read. gs:// objects are regular.
* Its size is bounded (`read_bytes`), and so is its nesting, before it is
  parsed (`parse`): json would recurse once per level.
* Every field a reader uses is type-checked against a schema (`check`), so
  that no reader meets a string where it counts, or a list where it looks
  names up.
"""

import errno
import json
import os
import stat
from typing import Optional

import numpy as np

from imagebatch import paths

# Levels of arrays and objects a record may hold; ours hold four or five.
MAX_DEPTH = 32
# Bytes scanned at a time when the nesting is counted.
_CHUNK = 1 << 20


class RecordError(ValueError):
  """A record that is not one this tool wrote, or cannot be read."""


def read_bytes(path: str, max_bytes: int) -> Optional[bytes]:
  """A record's bytes, None when there is none.

  Raises RecordError for a link, a FIFO or anything else that is not a
  regular file (never opened for reading, so never blocks), for a file that
  cannot be read, and for one larger than `max_bytes`.
  """
  try:
    if paths.is_remote(path):
      # pylint: disable=import-outside-toplevel
      from apache_beam.io.filesystems import FileSystems
      if not FileSystems.exists(path):
        return None
      with paths.open_file(path) as handle:
        data = handle.read(max_bytes + 1)
    else:
      data = _read_local(path, max_bytes)
      if data is None:
        return None
  except RecordError:
    raise
  except Exception as error:  # pylint: disable=broad-except
    raise RecordError(f"{paths.printable(path)} cannot be read: "
                      f"{type(error).__name__}: {error}") from None
  if len(data) > max_bytes:
    raise RecordError(f"{paths.printable(path)} is larger than {max_bytes} "
                      "bytes: not a record this tool wrote")
  return data


def _read_local(path: str, max_bytes: int) -> Optional[bytes]:
  try:
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW |
                         os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
  except FileNotFoundError:
    return None
  except OSError as error:
    if error.errno == errno.ELOOP:
      raise RecordError(f"{paths.printable(path)} is a symbolic link, not a "
                        "file this tool wrote; it was not followed") from None
    raise
  try:
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
      kind = "a folder" if stat.S_ISDIR(mode) else (
          "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file")
      raise RecordError(f"{paths.printable(path)} is {kind}, not a file this "
                        "tool wrote; it was not read")
    chunks, left = [], max_bytes + 1
    while left > 0:
      chunk = os.read(descriptor, min(left, 1 << 20))
      if not chunk:
        break
      chunks.append(chunk)
      left -= len(chunk)
    return b"".join(chunks)
  finally:
    os.close(descriptor)


def nesting_depth(data: bytes, limit: int = MAX_DEPTH) -> int:
  """How deep arrays and objects nest in JSON text, counted without
  parsing it (brackets inside strings do not count); counting stops past
  `limit`. Linear in the text, a chunk at a time."""
  depth, deepest = 0, 0
  inside = 0  # 1 within a string, carried from one chunk to the next
  run = 0  # backslashes that ended the previous chunk
  for start in range(0, len(data), _CHUNK):
    chars = np.frombuffer(data, np.uint8, min(_CHUNK, len(data) - start),
                          start)
    backslash = chars == ord("\\")
    index = np.arange(len(chars), dtype=np.int64)
    # For each position, the last one before it that is no backslash: the
    # backslashes just before a character number the gap.
    last_other = np.maximum.accumulate(np.where(backslash, -1 - run, index))
    before = np.empty(len(chars), np.int64)
    before[0] = run
    before[1:] = index[:-1] - last_other[:-1]
    quote = (chars == ord('"')) & (before % 2 == 0)
    in_string = (np.cumsum(quote) + inside) % 2 == 1
    opens = ((chars == ord("[")) | (chars == ord("{"))) & ~in_string
    closes = ((chars == ord("]")) | (chars == ord("}"))) & ~in_string
    levels = depth + np.cumsum(opens.astype(np.int64) - closes)
    deepest = max(deepest, int(levels.max()))
    if deepest > limit:
      return deepest
    depth = int(levels[-1])
    inside = int(in_string[-1])
    run = int(index[-1] - last_other[-1])
  return deepest


def parse(data: bytes, path: str, max_depth: int = MAX_DEPTH):
  """The JSON value of a record's bytes; RecordError when they are empty,
  not UTF-8 JSON, or nested deeper than `max_depth`."""
  where = paths.printable(path)
  if not data:
    raise RecordError(f"{where} is empty (0 bytes)")
  if nesting_depth(data, max_depth) > max_depth:
    raise RecordError(f"{where} nests deeper than {max_depth} levels: not a "
                      "record this tool wrote")
  try:
    return json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError) as error:
    raise RecordError(f"{where} is not valid JSON ({error})") from None


# Schemas ----------------------------------------------------------------------
# A schema is a type (str, int, float, bool), one of the classes below, or a
# tuple of schemas any of which may match. int never matches a bool, and
# float matches any number.


class ListOf:
  def __init__(self, item):
    self.item = item


class MapOf:
  """An object of any string keys, each value of one schema."""

  def __init__(self, value):
    self.value = value


class Fields:
  """An object whose named fields, when present, have their schemas; other
  fields are let through unread."""

  def __init__(self, **fields):
    self.fields = fields


NONE = type(None)
SCALAR = (str, int, float, bool, NONE)


def _problem(value, schema, where: str) -> Optional[str]:
  if isinstance(schema, tuple):
    problems = [_problem(value, option, where) for option in schema]
    return None if None in problems else problems[0]
  if schema is NONE:
    return None if value is None else f"{where} is not null"
  if schema is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    return None if ok else f"{where} is not an integer"
  if schema is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return None if ok else f"{where} is not a number"
  if schema in (str, bool):
    ok = isinstance(value, schema)
    return None if ok else f"{where} is not a {schema.__name__}"
  if isinstance(schema, ListOf):
    if not isinstance(value, list):
      return f"{where} is not a list"
    for i, item in enumerate(value):
      problem = _problem(item, schema.item, f"{where}[{i}]")
      if problem:
        return problem
    return None
  if not isinstance(value, dict):
    return f"{where} is not an object"
  if isinstance(schema, MapOf):
    items = value.items()
  else:
    items = ((name, value[name]) for name in schema.fields if name in value)
  for name, item in items:
    problem = _problem(item, schema.value if isinstance(schema, MapOf)
                       else schema.fields[name], f"{where}.{name}")
    if problem:
      return problem
  return None


def check(record, schema: Fields, path: str) -> dict:
  """Returns the record if it is an object whose fields match `schema`;
  else raises RecordError naming the first field that does not."""
  where = paths.printable(path)
  if not isinstance(record, dict):
    raise RecordError(f"{where} is not a JSON object")
  problem = _problem(record, schema, "")
  if problem:
    raise RecordError(f"{where}: field {problem.lstrip('.')}, not as this "
                      "tool writes it")
  return record
