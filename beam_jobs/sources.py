"""Sources: image folders, lists of image URIs and Parquet shards, read in
batches.

Each is a composite PTransform whose main output is `ImageBatch` elements and
whose `errors` output holds a row for every input it could not read. What is
read by URI (a folder's files, a list's rows) travels as references, in
groups of --batch_size, until the group is read: a path is its own id, a
list row is (id, uri, label). beam_jobs/listing.py lists folders and
beam_jobs/row_groups.py splits Parquet by row group; with --skip_existing,
beam_jobs/skip_existing.py drops the inputs already predicted before any
image is read.
"""

import codecs
import concurrent.futures
import csv
import io
import os
import posixpath
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beam_jobs import row_groups
from beam_jobs.contracts import DEFAULT_BATCH_SIZE
from beam_jobs.contracts import ERRORS
from beam_jobs.contracts import INPUTS
from beam_jobs.contracts import ImageBatch
from beam_jobs.contracts import counter
from beam_jobs.contracts import error_row
from beam_jobs.contracts import id_bucket
from beam_jobs.listing import PARTIAL
from beam_jobs.listing import Groups
from beam_jobs.listing import ListFiles
from beam_jobs.listing import merge_short_groups
from beam_jobs.skip_existing import SkipExisting
from beam_jobs.skip_existing import SkipRefs
from beam_jobs.skip_existing import SkipRows
from imagebatch import paths

# An object store answers each small read after tens of milliseconds, so a
# group of remote files is read by this many threads at once; local files
# read faster one after another.
REMOTE_READ_THREADS = 16


class ReadResult(NamedTuple):
  """A source's outputs: ImageBatches, and a row for each unread input."""
  images: beam.PCollection
  errors: beam.PCollection


class _ReadFileGroup(beam.DoFn):
  """Reads a group of input references into one ImageBatch of encoded bytes.

  A reference is a path (a folder's file: its own id, labelled by its class
  folder under `base`) or an (id, uri, label) tuple (a list's row).
  """

  def __init__(self, base: Optional[str], class_names: list,
               threads: Optional[int] = None):
    self._base = base
    self._class_names = frozenset(class_names)
    self._threads = threads
    self._pool = None

  def setup(self):
    threads = self._threads or REMOTE_READ_THREADS
    self._pool = (concurrent.futures.ThreadPoolExecutor(threads)
                  if threads > 1 else None)

  def teardown(self):
    if self._pool:
      self._pool.shutdown(wait=False)

  def process(self, group: list):
    counter(INPUTS).inc(len(group))

    def read(ref):
      # Images are read as stored, never decompressed by file name; a local
      # FIFO, socket or device is refused before it is opened.
      try:
        with paths.open_file(ref if isinstance(ref, str) else ref[1]) as handle:
          return handle.read()
      except Exception as error:  # pylint: disable=broad-except
        return error

    # Threads for remote files (or when asked for): a pool's hand-offs cost
    # more than a local read.
    threaded = self._pool and (self._threads or any(
        paths.is_remote(ref if isinstance(ref, str) else ref[1])
        for ref in group))
    results = self._pool.map(read, group) if threaded else map(read, group)
    ids, uris, labels, payloads = [], [], [], []
    for ref, result in zip(group, results):
      id_, uri, label = (ref, ref, None) if isinstance(ref, str) else ref
      if isinstance(result, Exception):
        yield beam.pvalue.TaggedOutput(ERRORS,
                                       error_row(id_, uri, "read", result))
        continue
      if isinstance(ref, str):
        label = paths.folder_label(ref, self._base, self._class_names)
      ids.append(id_)
      uris.append(uri)
      labels.append(label)
      payloads.append(result)
    if ids:
      yield ImageBatch(ids=ids, sources=uris, true_labels=labels,
                       encoded=payloads)


def _read_groups(groups, base: Optional[str], class_names: list):
  """Groups of references, spread over the workers, read."""
  return (groups
          # Groups leave their listing where it ran; spread them first.
          | "SpreadGroups" >> beam.Reshuffle()
          | "ReadFiles" >> beam.ParDo(_ReadFileGroup(
              base, class_names)).with_outputs(ERRORS, main="images"))


class ReadImageFiles(beam.PTransform):
  """Reads every file under a directory or glob, local or remote.

  The pattern is listed in parallel (beam_jobs/listing.py) and handed on in
  groups, so the per-element cost of the graph is paid once per group rather
  than once per image; with `skip`, the paths already predicted are dropped
  by bucket before any file is read. `storage_client` stands in for
  google-cloud-storage's client when listing gs:// (tests pass a fake one).
  """

  def __init__(self, pattern: str, class_names: list,
               batch_size: int = DEFAULT_BATCH_SIZE,
               skip: Optional[SkipExisting] = None, storage_client=None):
    super().__init__()
    self._pattern = paths.expand_pattern(pattern)
    self._class_names = class_names
    self._batch_size = batch_size
    self._skip = skip
    self._storage_client = storage_client

  def expand(self, pipeline):
    buckets = self._skip.buckets if self._skip else 0
    groups, list_errors = pipeline | "ListFiles" >> ListFiles(
        self._pattern, self._batch_size, buckets, self._storage_client)
    if self._skip:
      groups = groups | "SkipExisting" >> SkipRefs(self._skip,
                                                   self._batch_size)
    read = _read_groups(groups, paths.pattern_base(self._pattern),
                        self._class_names)
    errors = ((list_errors, read.errors) | "ReadErrors" >> beam.Flatten())
    return ReadResult(read.images, errors)


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


def _id_text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", "backslashreplace")
  return str(value)


def image_column_problem(column_type: pa.DataType) -> Optional[str]:
  """Why a column of this type cannot hold images, or None if it can."""
  if (pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)
      or pa.types.is_fixed_size_binary(column_type)):
    return None
  if ((pa.types.is_list(column_type) or pa.types.is_large_list(column_type) or
       pa.types.is_fixed_size_list(column_type)) and
      pa.types.is_integer(column_type.value_type)):
    return None
  return (f"has type {column_type}; expected binary (encoded PNG/JPEG) or a "
          "list of integers 0..255 (raw pixels)")


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
      ids.append(_id_text(value))
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
    self._label_column = label_column
    self._batch_size = batch_size
    self._input_shape = tuple(input_shape)

  def process(self, element):
    item, rows = element if len(element) == 2 else (element, None)
    columns = [c for c in (self._image_column, self._id_column,
                           self._label_column) if c]
    for kind, *rest in row_groups.read_item(item, columns, self._batch_size,
                                            rows):
      if kind == "error":
        counter(INPUTS).inc()
        yield beam.pvalue.TaggedOutput(ERRORS, row_groups.item_error(item,
                                                                     *rest))
      else:
        yield from self._batch_outputs(item[0], *rest)

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
  (bucket, (item, rows, ids)). Rows whose id is unusable never
  match an earlier id: they go straight on, (item, rows), to the KEEP
  output, and are reported when the item is read."""

  def __init__(self, id_column: Optional[str], buckets: int):
    self._id_column = id_column
    self._buckets = buckets

  def process(self, item):
    pieces = {}
    keep = []

    def piece(bucket):
      rows, ids = pieces.pop(bucket)
      return bucket, (item, rows, ids)

    columns = [self._id_column] if self._id_column else []
    for kind, *rest in row_groups.read_item(item, columns, _ID_PIECE):
      if kind == "error":
        counter(INPUTS).inc()
        yield beam.pvalue.TaggedOutput(ERRORS, row_groups.item_error(item,
                                                                     *rest))
        continue
      indices, record_batch = rest
      ids, problems = _shard_ids(item[0], indices, record_batch,
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


def _merge_rows(item_and_lists):
  item, lists = item_and_lists
  return item, sorted(row for rows in lists for row in rows)


class ReadParquetImages(beam.PTransform):
  """Reads images from Parquet shards matched by a glob, local or remote.

  The image column holds either encoded image bytes (PNG, JPEG, ...) or raw
  uint8 pixels of the model's input size, flattened row-major (H, W, C).
  Shards are read by row group (beam_jobs/row_groups.py); with `skip`, the
  id column is read first and only the rows not predicted before are read.
  """

  def __init__(self, pattern: str, input_shape: list, image_column: str,
               id_column: Optional[str] = None,
               label_column: Optional[str] = None,
               batch_size: int = DEFAULT_BATCH_SIZE,
               skip: Optional[SkipExisting] = None,
               item_rows: int = row_groups.ITEM_ROWS):
    super().__init__()
    self._pattern = pattern
    self._id_column = id_column
    self._skip = skip
    self._item_rows = item_rows
    self._reader = _ReadParquetItem(image_column, id_column, label_column,
                                    batch_size, input_shape)

  def expand(self, pipeline):
    items, plan_errors = pipeline | "PlanShards" >> PlanShards(
        self._pattern, self._item_rows)
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

  def __init__(self, pattern: str, item_rows: int = row_groups.ITEM_ROWS):
    super().__init__()
    self._pattern = pattern
    self._item_rows = item_rows

  def expand(self, pipeline):
    shards, list_errors = pipeline | "ListShards" >> ListFiles(
        self._pattern, _SHARDS_PER_GROUP)
    planned = (shards
               | "SpreadShards" >> beam.Reshuffle()
               | "Plan" >> beam.ParDo(row_groups.PlanRowGroups(
                   self._item_rows)).with_outputs(ERRORS, main="items"))
    items = planned.items | "SpreadItems" >> beam.Reshuffle()
    return items, ((list_errors, planned.errors)
                   | "PlanErrors" >> beam.Flatten())


# Lists of image URIs ----------------------------------------------------------

# List files per element between listing and reading.
_LISTS_PER_GROUP = 16


def list_format(path: str) -> str:
  """A list file's format, by its name: parquet, csv, else text."""
  name = path.lower()
  if name.endswith(".parquet"):
    return "parquet"
  return "csv" if name.endswith(".csv") else "text"


def resolve_uri(uri: str, list_path: str) -> str:
  """A list's URI as read: a URI with a scheme (gs://...) as written; a
  relative path from the list file's own folder; a local path normalised."""
  if "://" in uri:
    return uri
  if not uri.startswith("/"):
    folder = list_path.rsplit("/", 1)[0] if "/" in list_path else "."
    if paths.is_remote(folder):
      scheme, rest = folder.split("://", 1)
      return f"{scheme}://{posixpath.normpath(rest + '/' + uri)}"
    uri = os.path.join(folder, uri)
  return os.path.normpath(uri)


class _PlanLists(beam.DoFn):
  """List files in; work items out: (format, path) for a text or CSV list,
  read whole, and row-group items for a Parquet one."""

  def __init__(self):
    self._planner = row_groups.PlanRowGroups()

  def process(self, lists):
    for path in lists:
      kind = list_format(path)
      if kind == "parquet":
        yield from self._planner.process(path)
      else:
        yield (kind, path)


class _ReadListItem(beam.DoFn):
  """Reads a list's rows into input references, (id, uri, label), in
  groups (keyed by bucket with `buckets`).

  Each row is one input: a row without a URI, or with a null id when the
  list has an id column, is an error row of its own, named LIST#ROW (ROW
  counts the list's rows from 0: its lines for a text list, its records
  after the header for a CSV one, its rows for a Parquet one). Blank lines
  and records are no rows. A list file that cannot be read, or breaks
  part-way, is one input with one error row naming it.
  """

  def __init__(self, uri_column: str, id_column: Optional[str],
               label_column: Optional[str], group_size: int,
               buckets: int = 0):
    self._uri_column = uri_column
    self._id_column = id_column
    self._label_column = label_column
    self._group_size = group_size
    self._buckets = buckets

  def process(self, item):
    groups = Groups(self._group_size, self._buckets)
    if len(item) == 2:
      kind, path = item
      rows = self._csv_rows(path) if kind == "csv" else self._text_rows(path)
    else:
      path = item[0]
      rows = self._parquet_rows(item)
    for row in rows:
      if isinstance(row, dict):
        counter(INPUTS).inc()
        yield beam.pvalue.TaggedOutput(ERRORS, row)
        continue
      ref = self._ref(path, *row)
      if isinstance(ref, dict):
        counter(INPUTS).inc()
        yield beam.pvalue.TaggedOutput(ERRORS, ref)
        continue
      full = groups.add(ref)
      if full is not None:
        yield full
    for group in groups.rest():
      yield (group if self._buckets else
             beam.pvalue.TaggedOutput(PARTIAL, group))

  def _ref(self, path: str, row: int, uri, has_id: bool, id_value, label):
    """A row's (id, uri, label), or its error row."""
    fallback = f"{path}#{row}"
    id_ = None
    if has_id:
      if id_value is None or id_value == "":
        return error_row(fallback, path, "read",
                         f"null id in column {self._id_column!r}; this row "
                         "is named LIST#ROW here")
      id_ = paths.printable(_id_text(id_value))
    if isinstance(uri, bytes):
      try:
        uri = uri.decode("utf-8")
      except UnicodeDecodeError:
        text = uri.decode("utf-8", "backslashreplace")
        return error_row(id_ or text, path, "read",
                         "the URI is not valid UTF-8 (its bytes are shown "
                         "escaped as \\xNN); it was not read")
    uri = None if uri is None else str(uri).strip()
    if not uri:
      return error_row(id_ or fallback, path, "read",
                       f"no URI in column {self._uri_column!r}")
    if not paths.is_printable(uri):
      return error_row(id_ or paths.printable(uri), path, "read",
                       "the URI is not valid UTF-8 (its bytes are shown "
                       "escaped as \\xNN); it was not read")
    uri = resolve_uri(uri, path)
    return (id_ or uri, uri, None if label == "" else label)

  @staticmethod
  def _file_error(path: str, error, row: int) -> dict:
    after = f" (rows from {row} on; rows before it were read)" if row else ""
    return error_row(path, path, "read",
                     f"{type(error).__name__}: {error}{after}")

  def _text_rows(self, path: str):
    """One URI per line; surrounding blanks and a UTF-8 byte order mark
    (Windows' Notepad writes one) are dropped."""
    row = 0
    try:
      with paths.open_file(path) as handle:
        for row, line in enumerate(handle):
          line = line.strip()
          if row == 0 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
          if line:
            yield row, line, False, None, None
    except Exception as error:  # pylint: disable=broad-except
      yield self._file_error(path, error, row)

  def _csv_rows(self, path: str):
    """A header row, then one record per input (quoted fields may span
    lines). A later list without the --uri_column column fails row by row,
    as a shard without the image column does."""
    row = 0
    try:
      with paths.open_file(path) as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8-sig",
                                errors="surrogateescape", newline="")
        records = csv.reader(text)
        header = next(records, None) or []
        where = {name: i for i, name in enumerate(header)}
        uri_at = where.get(self._uri_column)
        id_at = where.get(self._id_column) if self._id_column else None
        label_at = (where.get(self._label_column) if self._label_column
                    else None)

        def cell(record, at):
          return record[at] if at is not None and at < len(record) else None

        for record in records:
          if not record:
            continue
          yield (row, cell(record, uri_at), id_at is not None,
                 cell(record, id_at), cell(record, label_at))
          row += 1
    except Exception as error:  # pylint: disable=broad-except
      yield self._file_error(path, error, row)

  def _parquet_rows(self, item: tuple):
    path = item[0]
    columns = [c for c in (self._uri_column, self._id_column,
                           self._label_column) if c]
    for kind, *rest in row_groups.read_item(item, columns, 1024):
      if kind == "error":
        yield row_groups.item_error(item, *rest)
        continue
      indices, record_batch = rest
      names = record_batch.schema.names

      def values(column):
        return (record_batch.column(column).to_pylist()
                if column and column in names else [None] * len(indices))

      has_id = bool(self._id_column) and self._id_column in names
      for row, uri, id_value, label in zip(indices.tolist(),
                                           values(self._uri_column),
                                           values(self._id_column),
                                           values(self._label_column)):
        yield row, uri, has_id, id_value, label


class ReadInputList(beam.PTransform):
  """Reads the images that list files name: text (one URI per line), CSV
  (a header row; columns `uri_column`, and `id_column` and `label_column`
  when present) or Parquet (the same columns), by file name.

  An input's id is its id column's value when the list has that column,
  else its URI as read (see `resolve_uri`). Lists are read in parallel: a
  text or CSV list by one worker, a Parquet list by row group.
  """

  def __init__(self, pattern: str, uri_column: str = "uri",
               id_column: Optional[str] = "id",
               label_column: Optional[str] = None,
               batch_size: int = DEFAULT_BATCH_SIZE,
               skip: Optional[SkipExisting] = None):
    super().__init__()
    self._pattern = pattern
    self._batch_size = batch_size
    self._skip = skip
    self._reader = _ReadListItem(uri_column, id_column, label_column,
                                 batch_size, skip.buckets if skip else 0)

  def expand(self, pipeline):
    lists, list_errors = pipeline | "ListLists" >> ListFiles(
        self._pattern, _LISTS_PER_GROUP)
    planned = (lists
               | "SpreadLists" >> beam.Reshuffle()
               | "PlanLists" >> beam.ParDo(_PlanLists()).with_outputs(
                   ERRORS, main="items"))
    rows = (planned.items
            | "SpreadItems" >> beam.Reshuffle()
            | "ReadLists" >> beam.ParDo(self._reader).with_outputs(
                ERRORS, PARTIAL, main="groups"))
    if self._skip:
      groups = rows.groups | "SkipExisting" >> SkipRefs(self._skip,
                                                        self._batch_size)
    else:
      groups = ((rows.groups, merge_short_groups(rows[PARTIAL],
                                                 self._batch_size))
                | "AllGroups" >> beam.Flatten())
    read = _read_groups(groups, None, [])
    errors = ((list_errors, planned.errors, rows.errors, read.errors)
              | "ReadErrors" >> beam.Flatten())
    return ReadResult(read.images, errors)
