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

from typing import NamedTuple

import apache_beam as beam


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
