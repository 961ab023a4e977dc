"""Local and remote (gs://, ...) paths: remote ones read through Beam's
FileSystems, local ones opened only when they are regular files.

Training, serving and the result tools name files the same way: a local path
is made absolute, a folder means every file below it, and a file's class is
the folder it sits in.
"""

import itertools
import os
import posixpath
import re
import socket
import stat
import threading
import time
from typing import Optional

_GLOB_CHARS = re.compile(r"[*?\[]")
# What a local path that is not a regular file is, for error messages.
_SPECIAL_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                  (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"))


def has_glob(pattern: str) -> bool:
  """Whether a pattern may match more than the one path it spells."""
  return bool(_GLOB_CHARS.search(pattern))


def is_remote(path: str) -> bool:
  return "://" in path


def join(directory: str, name: str) -> str:
  """Joins a file name onto a local or remote folder path."""
  return directory.rstrip("/") + "/" + name


def absolute(path: str) -> str:
  """Local paths become absolute, so ids don't depend on the working folder."""
  if is_remote(path):
    return path
  absolute_path = os.path.abspath(path)
  return absolute_path + "/" if path.endswith("/") else absolute_path


# Cloud Storage's API host, and how long finding it may take before a
# gs:// path is given up as unreachable from here.
GCS_HOST = "storage.googleapis.com"
REACH_SECONDS = 5.0
# How long a failed look is believed before the host is looked up again.
_UNREACHABLE_SECONDS = 30.0
_reach = {}  # host -> (time looked, None or why not)
_reach_lock = threading.Lock()


class Unreachable(OSError):
  """A remote path whose store cannot be reached from this machine."""


def _reach_problem(host: str, port: int) -> Optional[str]:
  """Why `host` cannot be reached, or None: its name is resolved and a
  connection opened, each within REACH_SECONDS (in a thread, since a
  name lookup has no timeout of its own)."""
  outcome = []

  def look():
    try:
      with socket.create_connection((host, port), timeout=REACH_SECONDS):
        outcome.append(None)
    except socket.gaierror as error:
      outcome.append(f"{host} does not resolve: {error.strerror or error}")
    except OSError as error:
      outcome.append(f"no connection to {host}: {error.strerror or error}")

  worker = threading.Thread(target=look, daemon=True)
  worker.start()
  worker.join(REACH_SECONDS * 2)
  return outcome[0] if outcome else (
      f"{host} did not answer within {REACH_SECONDS * 2:g}s")


def check_reachable(path: str) -> None:
  """Raises Unreachable, in one line, for a gs:// path when Cloud Storage
  cannot be reached from here, so that no client waits minutes on retries
  first. Nothing is checked for other paths, through a proxy (which does
  the lookups), or with the storage emulator. A success is remembered for
  the process, a failure for _UNREACHABLE_SECONDS."""
  if not path.startswith("gs://") or any(
      os.environ.get(name) for name in ("STORAGE_EMULATOR_HOST",
                                        "HTTPS_PROXY", "https_proxy")):
    return
  with _reach_lock:
    looked = _reach.get(GCS_HOST)
    if looked is None or (looked[1] is not None and
                          time.monotonic() - looked[0] > _UNREACHABLE_SECONDS):
      looked = (time.monotonic(), _reach_problem(GCS_HOST, 443))
      _reach[GCS_HOST] = looked
  if looked[1]:
    raise Unreachable(f"cannot reach Cloud Storage ({looked[1]}), so "
                      f"{printable(path)} cannot be read or written from here")


class NotARegularFile(OSError):
  """A local path that is a FIFO, socket, device or folder: never opened."""


def _special_kind(mode: int) -> Optional[str]:
  if stat.S_ISREG(mode):
    return None
  for test, kind in _SPECIAL_KINDS:
    if test(mode):
      return kind
  return "not a regular file"


def open_file(path: str):
  """Opens a local or remote file for reading, as stored (a gs:// one
  only if Cloud Storage can be reached: `check_reachable`).

  A local path is checked with stat before it is opened and refused unless
  it is a regular file (after following symbolic links): opening a FIFO
  blocks forever and opening a device can have effects of its own. The open
  itself is non-blocking and checked again, so a file swapped for a FIFO in
  between is refused as well.
  """
  if is_remote(path):
    # pylint: disable=import-outside-toplevel
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    check_reachable(path)
    return FileSystems.open(path,
                            compression_type=CompressionTypes.UNCOMPRESSED)
  kind = _special_kind(os.stat(path).st_mode)
  if kind:
    raise NotARegularFile(f"{printable(path)} is {kind}, not a regular file; "
                          "it was not opened")
  descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY |
                       getattr(os, "O_CLOEXEC", 0))
  try:
    kind = _special_kind(os.fstat(descriptor).st_mode)
    if kind:
      raise NotARegularFile(f"{printable(path)} is {kind}, not a regular "
                            "file; it was not read")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")
  except BaseException:
    os.close(descriptor)
    raise


def read_bytes(path: str) -> bytes:
  """Reads a local or remote file, as stored (never decompressed by name)."""
  with open_file(path) as handle:
    return handle.read()


def printable(path: str) -> str:
  """A path as text that can be printed and stored: the bytes of a file name
  that is not valid UTF-8 (which Python holds as surrogate escapes) become
  \\xNN."""
  return path.encode("utf-8", "surrogateescape").decode("utf-8",
                                                        "backslashreplace")


def is_printable(path: str) -> bool:
  """Whether a path is valid text as it is (see `printable`)."""
  try:
    path.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def expand_pattern(pattern: str) -> str:
  """A directory means every file below it; a glob is used as it is."""
  if _GLOB_CHARS.search(pattern):
    return pattern
  return pattern.rstrip("/") + "/**"


def folder_pattern(pattern: str) -> str:
  """A pattern ending in `/` means the files in that folder, as Beam's
  FileSystems.match reads it."""
  return pattern + "*" if pattern.endswith("/") else pattern


def pattern_base(pattern: str) -> str:
  """The folder above the first glob character: labels are relative to it."""
  match = _GLOB_CHARS.search(pattern)
  prefix = pattern[:match.start()] if match else pattern
  return prefix if prefix.endswith("/") else posixpath.dirname(prefix) + "/"


def match_paths(pattern: str, limit: Optional[int] = None,
                exclude: Optional[str] = None) -> list:
  """File paths a pattern matches, sorted; with `limit`, at most that many
  of them, found without listing the rest. Nothing in the folder `exclude`
  matches (an output folder inside the input, say).

  Remote patterns go through Beam's FileSystems. Local ones are listed here
  (`walk_local`) with the same pattern rules, because Beam's local listing
  drops every entry it cannot stat: a dangling or looping symbolic link
  would vanish instead of becoming an error row. Under a recursive pattern
  (`**`, what a folder means), a sub-folder that cannot be listed is
  returned as a path too, so that reading it fails visibly.
  """
  if not is_remote(pattern):
    # With a limit, paths come in the order of their names, as on gs://,
    # so that the same files come first every time (a check of "the first
    # shard" reads the same shard however the disk orders its entries).
    return sorted(itertools.islice(
        _match_local(pattern, ordered=bool(limit), exclude=exclude), limit))
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  found = [metadata.path for metadata in FileSystems.match(
      [pattern], limits=[limit] if limit else None)[0].metadata_list]
  kept = [path for path in found if not is_below(path, exclude)]
  if limit and len(kept) < len(found):
    # The excluded folder came first: look further, past it.
    kept = [metadata.path for metadata in FileSystems.match([pattern])[
        0].metadata_list if not is_below(metadata.path, exclude)][:limit]
  return sorted(kept)


def is_below(path: str, folder: Optional[str]) -> bool:
  """Whether `path` is the folder `folder` or below it."""
  return bool(folder) and (path.rstrip("/") + "/").startswith(
      folder.rstrip("/") + "/")


def pattern_regex(pattern: str) -> "re.Pattern":
  """The regular expression Beam's FileSystems match paths with: `*` within
  one folder, `**` across folders, `?` and `[...]` as in fnmatch."""
  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystem import FileSystem
  return re.compile(FileSystem.translate_pattern(pattern))


def scan_local(folder: str):
  """One local folder's entries as os.walk sees them, streamed: yields
  (path, is_folder). A link to a folder is neither listed nor followed (as
  os.walk without followlinks); any other entry, a dangling link included,
  is a file. Raises OSError when the folder cannot be listed."""
  with os.scandir(folder) as entries:
    for entry in entries:
      if not _true_or_false(entry.is_dir):
        yield entry.path, False
      elif not _true_or_false(entry.is_symlink):
        yield entry.path, True


def _true_or_false(test) -> bool:
  """A DirEntry test; an entry that cannot be examined is False."""
  try:
    return test()
  except OSError:
    return False


def walk_local(root: str, descend=None, ordered: bool = False):
  """Every file below a local folder, streamed, depth first: yields (path,
  listed). `listed` is False for a folder that could not be listed (the
  root included), which is yielded in place of its files. `descend(folder)`
  may decline to enter a sub-folder. Only the folders still to visit are
  held, never the files, unless `ordered`: then each folder's entries are
  read whole and the paths come in the order of their full names, as an
  object store lists them (gs:// lists names in lexicographic order), so a
  limited match finds the same first file here and there."""
  if ordered:
    yield from _walk_ordered(root, descend)
    return
  pending = [root]
  while pending:
    folder = pending.pop()
    try:
      folders = []
      for path, is_folder in scan_local(folder):
        if not is_folder:
          yield path, True
        elif descend is None or descend(path):
          folders.append(path)
      pending.extend(folders)
    except OSError:
      yield folder, False


def _sorted_entries(folder: str) -> list:
  """A folder's entries by full name, a sub-folder's name read with its
  trailing slash ("a/b.png" before "a/b/c.png", as object names sort)."""
  return sorted(scan_local(folder),
                key=lambda entry: entry[0] + ("/" if entry[1] else ""))


def _walk_ordered(root: str, descend=None):
  try:
    stack = [iter(_sorted_entries(root))]
  except OSError:
    yield root, False
    return
  while stack:
    entry = next(stack[-1], None)
    if entry is None:
      stack.pop()
      continue
    path, is_folder = entry
    if not is_folder:
      yield path, True
    elif descend is None or descend(path):
      try:
        stack.append(iter(_sorted_entries(path)))
      except OSError:
        yield path, False


def _match_local(pattern: str, ordered: bool = False,
                 exclude: Optional[str] = None):
  pattern = folder_pattern(pattern)
  prefix = _GLOB_CHARS.split(pattern, 1)[0]
  if prefix == pattern:
    if os.path.lexists(pattern) and not is_below(pattern, exclude):
      yield pattern
    return
  root = posixpath.dirname(prefix)
  regex = pattern_regex(pattern)
  recursive = "**" in pattern
  for path, listed in walk_local(
      root, lambda folder: not is_below(folder, exclude), ordered=ordered):
    if listed:
      if regex.match(path):
        yield path
    # The root itself not existing is no match, not an error.
    elif recursive and path != root and os.path.lexists(path):
      yield path


def folder_label(path: str, base: str,
                 class_names: Optional[frozenset] = None) -> Optional[str]:
  """The class folder a file sits in under `base`.

  With `class_names`, only a folder named for a known class counts, so a
  folder such as `incoming/` is not mistaken for a wrong label.
  """
  relative = path[len(base):] if path.startswith(base) else path
  parts = relative.split("/")
  if len(parts) >= 2 and (class_names is None or parts[-2] in class_names):
    return parts[-2]
  return None
