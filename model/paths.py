"""Local and remote (gs://, ...) paths, read through Beam's FileSystems.

Training, serving and the result tools name files the same way: a local path
is made absolute, a folder means every file below it, and a file's class is
the folder it sits in.
"""

import os
import posixpath
import re
from typing import Optional

_GLOB_CHARS = re.compile(r"[*?\[]")


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


def read_bytes(path: str) -> bytes:
  """Reads a local or remote file, as stored (never decompressed by name)."""
  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystem import CompressionTypes
  from apache_beam.io.filesystems import FileSystems
  with FileSystems.open(
      path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
    return handle.read()


def expand_pattern(pattern: str) -> str:
  """A directory means every file below it; a glob is used as it is."""
  if _GLOB_CHARS.search(pattern):
    return pattern
  return pattern.rstrip("/") + "/**"


def pattern_base(pattern: str) -> str:
  """The folder above the first glob character: labels are relative to it."""
  match = _GLOB_CHARS.search(pattern)
  prefix = pattern[:match.start()] if match else pattern
  return prefix if prefix.endswith("/") else posixpath.dirname(prefix) + "/"


def match_paths(pattern: str, limit: Optional[int] = None) -> list:
  """File paths a pattern matches, sorted."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  result = FileSystems.match([pattern], limits=[limit] if limit else None)[0]
  return sorted(metadata.path for metadata in result.metadata_list)


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
