"""ReadParquetImages: images from Parquet shards, by row group.

The image column holds encoded image bytes (PNG, JPEG, ...), raw uint8
pixels of the model's input size, flattened row-major (H, W, C), or Hugging
Face `datasets`' image struct, `struct<bytes: binary, path: string>`: its
bytes, or, where only the path is set, the file the path names (a relative
one from the shard's own folder, as a list's URIs are). Shards are
planned into row-group work items (row_groups.py) and read in record
batches of --batch_size rows; every row is one input, and a row that cannot
be used is an error row of its own.
"""

from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beam_jobs.contracts import DEFAULT_BATCH_SIZE
from beam_jobs.contracts import ERRORS
from beam_jobs.contracts import INPUTS
from beam_jobs.contracts import ImageBatch
from beam_jobs.contracts import counter
from beam_jobs.contracts import error_row
from beam_jobs.contracts import label_column_to_read
from beam_jobs.contracts import id_bucket
from beam_jobs.sources import ReadResult
from beam_jobs.sources import id_text
from beam_jobs.sources import resolve_uri
from beam_jobs.sources import row_groups
from beam_jobs.sources.images import read_image
from beam_jobs.sources.listing import ListFiles
from beam_jobs.sources.row_groups import RowRangeError
from beam_jobs.sources.row_groups import RowSelection
from beam_jobs.sources.skip_existing import RowIds
from beam_jobs.sources.skip_existing import SkipExisting
from beam_jobs.sources.skip_existing import SkipRows


def raw_pixel_array(column: pa.Array, row_length: int):
  """Splits a list column of integers into rows; returns (pixels, good rows,
  bad rows).

  A row that is null, of the wrong length, holds a null value or a value
  outside 0..255 is reported by index with the reason, so the good rows of
  the same record batch still go through. `pixels` holds the good rows'
  values, flattened, as uint8.
  """
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  valid = column.is_valid().to_numpy(zero_copy_only=False)
  lengths = pc.list_value_length(column).fill_null(0).to_numpy(
      zero_copy_only=False).astype(np.int64)
  candidates = np.flatnonzero(valid & (lengths == row_length))
  bad = {}
  for index in np.flatnonzero(~valid):
    bad[int(index)] = "null image cell"
  for index in np.flatnonzero(valid & (lengths != row_length)):
    bad[int(index)] = (f"raw pixels of length {lengths[index]}, expected "
                       f"{row_length} (height x width x channels)")
  values = column.take(pa.array(candidates, pa.int64())).flatten()
  shape = (len(candidates), row_length)
  if values.null_count:
    nulls = values.is_null().to_numpy(zero_copy_only=False).reshape(shape)
    values = values.fill_null(0)
  else:
    nulls = np.zeros(shape, dtype=bool)
  numbers = values.to_numpy(zero_copy_only=False).reshape(shape)
  rejected = nulls.any(axis=1)
  for index in candidates[rejected]:
    bad[int(index)] = "raw pixels hold a null value"
  if numbers.dtype != np.uint8 and numbers.size:
    outside = ((numbers.min(axis=1) < 0) | (numbers.max(axis=1) > 255)
               ) & ~rejected
    for position in np.flatnonzero(outside):
      row = numbers[position]
      value = row[(row < 0) | (row > 255)][0]
      bad[int(candidates[position])] = (
          f"raw pixel value {value} outside 0..255")
    rejected |= outside
  good = candidates[~rejected]
  pixels = numbers[~rejected].astype(np.uint8, copy=False).ravel()
  return pixels, good, dict(sorted(bad.items()))


def _is_binary(column_type: pa.DataType) -> bool:
  return (pa.types.is_binary(column_type) or
          pa.types.is_large_binary(column_type) or
          pa.types.is_fixed_size_binary(column_type))


def _struct_fields(column_type: pa.DataType) -> Optional[tuple]:
  """(bytes field, path field) of an image struct, each a name or None;
  None when the type is no image struct (Hugging Face's Image feature is
  struct<bytes: binary, path: string>)."""
  if not pa.types.is_struct(column_type):
    return None
  names = {column_type.field(i).name: column_type.field(i).type
           for i in range(column_type.num_fields)}
  data = "bytes" if "bytes" in names and _is_binary(names["bytes"]) else None
  path = "path" if "path" in names and (
      pa.types.is_string(names["path"]) or
      pa.types.is_large_string(names["path"])) else None
  return (data, path) if data or path else None


def image_column_problem(column_type: pa.DataType) -> Optional[str]:
  """Why a column of this type cannot hold images, or None if it can."""
  if _is_binary(column_type) or _struct_fields(column_type):
    return None
  if ((pa.types.is_list(column_type) or pa.types.is_large_list(column_type) or
       pa.types.is_fixed_size_list(column_type)) and
      pa.types.is_integer(column_type.value_type)):
    return None
  return (f"has type {column_type}; expected binary (encoded PNG/JPEG), a "
          "list of integers 0..255 (raw pixels) or an image struct "
          "<bytes: binary, path: string> (Hugging Face datasets)")


def struct_images(column, shard_path: str) -> tuple:
  """An image struct column's images: (encoded bytes per row, None where
  the row failed; {row: reason}). A row's bytes are used when set; else the
  file its path names is read, resolved from the shard's folder."""
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  data_field, path_field = _struct_fields(column.type)
  rows = len(column)
  valid = column.is_valid().to_numpy(zero_copy_only=False)
  data = (column.field(data_field).to_pylist() if data_field
          else [None] * rows)
  named = (column.field(path_field).to_pylist() if path_field
           else [None] * rows)
  encoded, problems = [], {}
  for row in range(rows):
    if valid[row] and data[row]:
      encoded.append(data[row])
      continue
    if not valid[row] or not named[row]:
      encoded.append(None)
      problems[row] = "null image cell (neither bytes nor a path)"
      continue
    image = read_image(resolve_uri(named[row], shard_path))
    if isinstance(image, Exception):
      encoded.append(None)
      problems[row] = (f"the image at the path the row names cannot be "
                       f"read: {type(image).__name__}: {image}")
    else:
      encoded.append(image)
  return encoded, problems


def _shard_ids(path: str, indices, record_batch, id_column: Optional[str]
               ) -> tuple:
  """The rows' ids, and a reason for each row whose id is unusable.

  Without an id column a row is named SHARD#ROW, ROW being its index in the
  whole shard, however the shard was split into work items.
  """
  rows = record_batch.num_rows
  generated = [f"{path}#{index}" for index in indices]
  if not id_column:
    return generated, {}
  if id_column not in record_batch.schema.names:
    reason = f"the shard has no id column {id_column!r} (--id_column)"
    return generated, dict.fromkeys(range(rows), reason)
  values = record_batch.column(id_column).to_pylist()
  ids, problems = [], {}
  for i, value in enumerate(values):
    if value is None:
      # Named by shard and row instead, in the error row only.
      ids.append(generated[i])
      problems[i] = (f"null id in column {id_column!r}; this row is "
                     "named SHARD#ROW here")
    else:
      ids.append(id_text(value))
  return ids, problems


class _ReadParquetItem(beam.DoFn):
  """Reads one work item (a shard's row groups) as Arrow record batches,
  one ImageBatch per batch; after --skip_existing, (item, rows) reads only
  those rows.

  Every row is an input that ends as an image or an error row of its own: a
  null id, a missing image or id column, an image column of the wrong type
  and a bad raw-pixel row fail their rows alone. A row group that cannot be
  read is one input with one error row naming the shard and its rows, and
  the item's other row groups go on.
  """

  def __init__(self, image_column: str, id_column: Optional[str],
               label_column: Optional[str], batch_size: int,
               input_shape: list):
    self._image_column = image_column
    self._id_column = id_column
    self._label_column = label_column_to_read(label_column)
    self._batch_size = batch_size
    self._input_shape = tuple(input_shape)

  def process(self, selection: RowSelection):
    path = selection.item.path
    columns = [c for c in (self._image_column, self._id_column,
                           self._label_column) if c]
    for part in row_groups.read_item(selection.item, columns,
                                     self._batch_size, selection.rows):
      if isinstance(part, RowRangeError):
        counter(INPUTS).inc()
        yield beam.pvalue.TaggedOutput(ERRORS, part.error_row(path))
      else:
        yield from self._batch_outputs(path, *part)

  def _batch_outputs(self, path: str, indices, record_batch):
    ids, problems = _shard_ids(path, indices, record_batch, self._id_column)
    rows = record_batch.num_rows
    names = record_batch.schema.names
    counter(INPUTS).inc(rows)
    if self._image_column not in names:
      reason = f"the shard has no image column {self._image_column!r}"
      problems.update({i: reason for i in range(rows) if i not in problems})
    else:
      column_problem = image_column_problem(
          record_batch.schema.field(self._image_column).type)
      if column_problem:
        reason = f"column {self._image_column!r} {column_problem}"
        problems.update({i: reason for i in range(rows) if i not in problems})
    for index in sorted(problems):
      yield beam.pvalue.TaggedOutput(
          ERRORS, error_row(ids[index], path, "read", problems[index]))
    good = [i for i in range(rows) if i not in problems]
    if not good:
      return
    if len(good) < rows:
      record_batch = record_batch.take(pa.array(good, pa.int64()))
      ids = [ids[i] for i in good]
    rows = len(good)
    # The label column is optional: a shard without it has unknown labels.
    # Labels stay as the column holds them (names, indices); they are
    # matched to class names when predictions are formatted.
    labels = (record_batch.column(self._label_column).to_pylist()
              if self._label_column and self._label_column in names
              else [None] * rows)
    images = record_batch.column(self._image_column)
    batch = ImageBatch(ids=ids, sources=[path] * rows, true_labels=labels)
    if pa.types.is_struct(images.type):
      encoded, failed = struct_images(images, path)
      for index, message in failed.items():
        yield beam.pvalue.TaggedOutput(
            ERRORS, error_row(ids[index], path, "read", message))
      kept = [i for i in range(rows) if i not in failed]
      if kept:
        batch = batch.take(kept)
        batch.encoded = [encoded[i] for i in kept]
        yield batch
      return
    if not pa.types.is_list(images.type) and not pa.types.is_large_list(
        images.type) and not pa.types.is_fixed_size_list(images.type):
      batch.encoded = images.to_pylist()
      yield batch
      return
    row_length = int(np.prod(self._input_shape))
    pixels, good, bad = raw_pixel_array(images, row_length)
    for index, message in bad.items():
      yield beam.pvalue.TaggedOutput(
          ERRORS, error_row(ids[index], path, "preprocess", message))
    if len(good):
      batch = batch.take(good)
      batch.pixels = pixels.reshape((len(good),) + self._input_shape)
      yield batch


# Ids per element on their way to the --skip_existing join.
_ID_PIECE = 4096
KEEP = "keep"


class _RowIds(beam.DoFn):
  """--skip_existing's first pass over a Parquet work item: reads only the
  id column and sends each row's (row, id) to its bucket, as
  (bucket, RowIds). Rows whose id is unusable never match an earlier id:
  they go straight on, as a RowSelection, to the KEEP output, and are
  reported when the item is read."""

  def __init__(self, id_column: Optional[str], buckets: int):
    self._id_column = id_column
    self._buckets = buckets

  def process(self, item):
    pieces = {}
    keep = []

    def piece(bucket):
      rows, ids = pieces.pop(bucket)
      return bucket, RowIds(item, rows, ids)

    columns = [self._id_column] if self._id_column else []
    for part in row_groups.read_item(item, columns, _ID_PIECE):
      if isinstance(part, RowRangeError):
        counter(INPUTS).inc()
        yield beam.pvalue.TaggedOutput(ERRORS, part.error_row(item.path))
        continue
      indices, record_batch = part
      ids, problems = _shard_ids(item.path, indices, record_batch,
                                 self._id_column)
      for i, (row, id_) in enumerate(zip(indices.tolist(), ids)):
        if i in problems:
          keep.append(row)
          continue
        bucket = id_bucket(id_, self._buckets)
        rows, bucket_ids = pieces.setdefault(bucket, ([], []))
        rows.append(row)
        bucket_ids.append(id_)
        if len(rows) >= _ID_PIECE:
          yield piece(bucket)
    for bucket in list(pieces):
      yield piece(bucket)
    if keep:
      yield beam.pvalue.TaggedOutput(KEEP, (item, keep))


def _merge_rows(item_and_lists) -> RowSelection:
  item, lists = item_and_lists
  return RowSelection(item, sorted(row for rows in lists for row in rows))


class ReadParquetImages(beam.PTransform):
  """Reads images from Parquet shards matched by a glob, local or remote.

  The image column holds either encoded image bytes (PNG, JPEG, ...) or raw
  uint8 pixels of the model's input size, flattened row-major (H, W, C).
  Shards are read by row group (row_groups.py); with `skip`, the
  id column is read first and only the rows not predicted before are read.
  No shard in the folder `exclude` (the run's output) is read.
  """

  def __init__(self, pattern: str, input_shape: list, image_column: str,
               id_column: Optional[str] = None,
               label_column: Optional[str] = None,
               batch_size: int = DEFAULT_BATCH_SIZE,
               skip: Optional[SkipExisting] = None,
               item_rows: int = row_groups.ITEM_ROWS,
               exclude: Optional[str] = None):
    super().__init__()
    self._pattern = pattern
    self._id_column = id_column
    self._skip = skip
    self._item_rows = item_rows
    self._exclude = exclude
    self._reader = _ReadParquetItem(image_column, id_column, label_column,
                                    batch_size, input_shape)

  def expand(self, pipeline):
    items, plan_errors = pipeline | "PlanShards" >> PlanShards(
        self._pattern, self._item_rows, self._exclude)
    errors = [plan_errors]
    if self._skip:
      ids = items | "ReadIds" >> beam.ParDo(_RowIds(
          self._id_column, self._skip.buckets)).with_outputs(
              ERRORS, KEEP, main="ids")
      errors.append(ids[ERRORS])
      kept = ids.ids | "SkipExisting" >> SkipRows(self._skip)
      items = ((kept, ids[KEEP])
               | "RowsToRead" >> beam.Flatten()
               | "ByItem" >> beam.GroupByKey()
               | "MergeRows" >> beam.Map(_merge_rows))
    else:
      items = items | "AllRows" >> beam.Map(RowSelection)
    read = items | "ReadRowGroups" >> beam.ParDo(self._reader).with_outputs(
        ERRORS, main="images")
    errors.append(read.errors)
    return ReadResult(read.images, tuple(errors) | "ReadErrors" >>
                      beam.Flatten())


# Shards per element between listing and planning.
_SHARDS_PER_GROUP = 16


class PlanShards(beam.PTransform):
  """A glob of Parquet files in; their row-group work items out, spread
  over the workers, plus an error row for each file that is no shard."""

  def __init__(self, pattern: str, item_rows: int = row_groups.ITEM_ROWS,
               exclude: Optional[str] = None):
    super().__init__()
    self._pattern = pattern
    self._item_rows = item_rows
    self._exclude = exclude

  def expand(self, pipeline):
    shards, list_errors = pipeline | "ListShards" >> ListFiles(
        self._pattern, _SHARDS_PER_GROUP, exclude=self._exclude)
    planned = (shards
               | "SpreadShards" >> beam.Reshuffle()
               | "Plan" >> beam.ParDo(row_groups.PlanRowGroups(
                   self._item_rows)).with_outputs(ERRORS, main="items"))
    items = planned.items | "SpreadItems" >> beam.Reshuffle()
    return items, ((list_errors, planned.errors)
                   | "PlanErrors" >> beam.Flatten())


