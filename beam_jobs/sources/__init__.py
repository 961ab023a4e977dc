"""Sources: image folders, lists of image URIs and Parquet shards, read in
batches.

Each source is a composite PTransform whose main output is `ImageBatch`
elements and whose `errors` output holds a row for every input it could not
read:

* images.py  ReadImageFiles: a folder or glob, listed in parallel
             (listing.py), its files read in groups.
* lists.py   ReadInputList: text, CSV or Parquet lists of image URIs.
* parquet.py ReadParquetImages: shards of image bytes or raw pixels, by row
             group (row_groups.py).

What is read by URI travels as paths or list rows in groups of --batch_size
until --skip_existing (skip_existing.py) has dropped the inputs already
predicted, then as `ImageRefs` until it is read.
"""

import os
import posixpath
from typing import NamedTuple

import apache_beam as beam

from imagebatch import paths


class ReadResult(NamedTuple):
  """A source's outputs: ImageBatches, and a row for each unread input."""
  images: beam.PCollection
  errors: beam.PCollection


class ImageRefs(NamedTuple):
  """A group of inputs to read by URI, in columns: their ids, URIs and the
  labels they came with (a class folder's name, a list's label, or None)."""
  ids: list
  uris: list
  labels: list


def id_text(value) -> str:
  """An id column's value as text; bytes are decoded, bad bytes escaped."""
  if isinstance(value, bytes):
    return value.decode("utf-8", "backslashreplace")
  return str(value)


def resolve_uri(uri: str, list_path: str) -> str:
  """A URI a file names (a list's row, a Parquet image's path) as read: a
  URI with a scheme (gs://...) as written; a relative path from the naming
  file's own folder; a local path normalised."""
  if "://" in uri:
    return uri
  if not uri.startswith("/"):
    folder = list_path.rsplit("/", 1)[0] if "/" in list_path else "."
    if paths.is_remote(folder):
      scheme, rest = folder.split("://", 1)
      return f"{scheme}://{posixpath.normpath(rest + '/' + uri)}"
    uri = os.path.join(folder, uri)
  return os.path.normpath(uri)
