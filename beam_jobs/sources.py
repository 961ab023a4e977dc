"""Sources: image files and Parquet shards, read in batches.

Each is a composite PTransform whose main output is `ImageBatch` elements and
whose `errors` output holds a row for every input it could not read.
"""

import concurrent.futures
from typing import Iterable, NamedTuple, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from beam_jobs.contracts import DEFAULT_BATCH_SIZE
from beam_jobs.contracts import ERRORS
from beam_jobs.contracts import INPUTS
from beam_jobs.contracts import SKIPPED
from beam_jobs.contracts import ImageBatch
from beam_jobs.contracts import counter
from beam_jobs.contracts import error_row
from model import paths

# An object store answers each small read after tens of milliseconds, so a
# group of remote files is read by this many threads at once; local files
# read faster one after another.
REMOTE_READ_THREADS = 16


class ExistingIds:
  """Ids a model already predicted in an output folder, loaded on a worker.

  Only the shard paths (those the folder's manifest lists) and the model id
  travel in the job graph; each worker reads the id column itself in
  `setup`, so millions of ids never bloat the graph.
  """

  def __init__(self, files: list, model_id: str):
    self.files = list(files)
    self.model_id = model_id

  def load(self) -> frozenset:
    ids = set()
    for path in self.files:
      with paths.open_file(path) as handle:
        table = pq.read_table(handle, columns=["id", "model_id"])
      for id_, model_id in zip(table.column("id").to_pylist(),
                               table.column("model_id").to_pylist()):
        if model_id == self.model_id and id_ is not None:
          ids.add(id_)
    return frozenset(ids)


def _name_error(path: str) -> dict:
  """The error row of a file whose name is not valid UTF-8: it is never
  read, and its id is the name with the undecodable bytes escaped."""
  name = paths.printable(path)
  return error_row(name, name, "read",
                   "the file name is not valid UTF-8 (its bytes are shown "
                   "escaped as \\xNN); the file was not read")


def _chunks(items: list, size: int) -> Iterable[list]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


class _MatchInGroups(beam.DoFn):
  """Expands a pattern into groups of paths, one group per element."""

  def __init__(self, group_size: int, skip: Optional[ExistingIds] = None):
    self._group_size = group_size
    self._skip = skip

  def setup(self):
    self._existing = self._skip.load() if self._skip else frozenset()

  def process(self, pattern: str):
    matched = yield from _match_text_paths(pattern)
    if self._existing:
      kept = [p for p in matched if p not in self._existing]
      counter(SKIPPED).inc(len(matched) - len(kept))
      matched = kept
    yield from _chunks(matched, self._group_size)


def _match_text_paths(pattern: str):
  """Yields an error row for each matched path whose name is not valid
  UTF-8, counted as an input; returns the other paths.

  Such a name cannot be written as text, nor even passed between stages,
  so it ends here.
  """
  matched = paths.match_paths(pattern)
  undecodable = [p for p in matched if not paths.is_printable(p)]
  counter(INPUTS).inc(len(undecodable))
  for path in undecodable:
    yield beam.pvalue.TaggedOutput(ERRORS, _name_error(path))
  return [p for p in matched if paths.is_printable(p)]


class _MatchShards(beam.DoFn):
  """Expands a pattern into shard paths, one element each."""

  def process(self, pattern: str):
    matched = yield from _match_text_paths(pattern)
    yield from matched


class _ReadFileGroup(beam.DoFn):
  """Reads a group of files into one ImageBatch of encoded bytes."""

  def __init__(self, base: str, class_names: list,
               threads: Optional[int] = None):
    self._base = base
    self._class_names = frozenset(class_names)
    self._threads = threads

  def setup(self):
    threads = self._threads or (
        REMOTE_READ_THREADS if paths.is_remote(self._base) else 1)
    self._pool = (concurrent.futures.ThreadPoolExecutor(threads)
                  if threads > 1 else None)

  def teardown(self):
    if self._pool:
      self._pool.shutdown(wait=False)

  def process(self, group: list):
    counter(INPUTS).inc(len(group))

    def read(path):
      # Images are read as stored, never decompressed by file name; a local
      # FIFO, socket or device is refused before it is opened.
      try:
        with paths.open_file(path) as handle:
          return handle.read()
      except Exception as error:  # pylint: disable=broad-except
        return error

    results = self._pool.map(read, group) if self._pool else map(read, group)
    ids, payloads = [], []
    for path, result in zip(group, results):
      if isinstance(result, Exception):
        yield beam.pvalue.TaggedOutput(ERRORS,
                                       error_row(path, path, "read", result))
      else:
        ids.append(path)
        payloads.append(result)
    if ids:
      yield ImageBatch(
          ids=ids,
          sources=list(ids),
          true_labels=[paths.folder_label(p, self._base, self._class_names)
                       for p in ids],
          encoded=payloads)


class ReadImageFiles(beam.PTransform):
  """Reads every file under a directory or glob, local or remote.

  Paths are matched in one place and handed on in groups, so the per-element
  cost of the graph is paid once per group rather than once per image.
  """

  def __init__(self, pattern: str, class_names: list,
               batch_size: int = DEFAULT_BATCH_SIZE,
               skip: Optional[ExistingIds] = None):
    super().__init__()
    self._pattern = paths.expand_pattern(pattern)
    self._class_names = class_names
    self._batch_size = batch_size
    self._skip = skip

  def expand(self, pipeline):
    matched = (
        pipeline
        | "Pattern" >> beam.Create([self._pattern])
        | "MatchFiles" >> beam.ParDo(
            _MatchInGroups(self._batch_size, self._skip)).with_outputs(
                ERRORS, main="groups"))
    read = (
        matched.groups
        # Matching happens on one worker; spread the groups before reading.
        | "SpreadGroups" >> beam.Reshuffle()
        | "ReadFiles" >> beam.ParDo(
            _ReadFileGroup(paths.pattern_base(self._pattern),
                           self._class_names)).with_outputs(ERRORS, main="images"))
    errors = ((matched.errors, read.errors)
              | "ReadErrors" >> beam.Flatten())
    return ReadResult(read.images, errors)


class ReadResult(NamedTuple):
  """A source's outputs: ImageBatches, and a row for each unread input."""
  images: beam.PCollection
  errors: beam.PCollection


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


class _ReadParquetShard(beam.DoFn):
  """Reads one shard as Arrow record batches, one ImageBatch per batch.

  Every row is an input that ends as an image or an error row of its own: a
  null id, a missing image or id column, an image column of the wrong type
  and a bad raw-pixel row fail their rows alone. A shard that cannot be
  opened, or breaks part-way, is one input with one error row naming where.
  """

  def __init__(self, image_column: str, id_column: Optional[str],
               label_column: Optional[str], batch_size: int,
               input_shape: list, skip: Optional[ExistingIds] = None):
    self._image_column = image_column
    self._id_column = id_column
    self._label_column = label_column
    self._batch_size = batch_size
    self._input_shape = tuple(input_shape)
    self._skip = skip

  def setup(self):
    self._existing = self._skip.load() if self._skip else frozenset()

  def process(self, path: str):
    offset = 0
    try:
      with paths.open_file(path) as handle:
        shard = pq.ParquetFile(handle)
        names = shard.schema_arrow.names
        columns = [c for c in (self._image_column, self._id_column,
                               self._label_column) if c and c in names]
        # With none of them, one column is read to count the rows.
        for record_batch in shard.iter_batches(
            batch_size=self._batch_size, columns=columns or names[:1]):
          yield from self._batch_outputs(path, offset, record_batch)
          offset += record_batch.num_rows
    except Exception as error:  # pylint: disable=broad-except
      # What could not be read is one input with one error row, and the
      # other shards go on.
      counter(INPUTS).inc()
      after = (f" (rows from {offset} on; rows before it were read)"
               if offset else "")
      yield beam.pvalue.TaggedOutput(
          ERRORS, error_row(path, path, "read",
                            f"{type(error).__name__}: {error}{after}"))

  def _ids(self, path: str, offset: int, record_batch) -> tuple:
    """The rows' ids, and a reason for each row whose id is unusable."""
    rows = record_batch.num_rows
    generated = [f"{path}#{offset + i}" for i in range(rows)]
    if not self._id_column:
      return generated, {}
    if self._id_column not in record_batch.schema.names:
      reason = f"the shard has no id column {self._id_column!r} (--id_column)"
      return generated, dict.fromkeys(range(rows), reason)
    values = record_batch.column(self._id_column).to_pylist()
    ids, problems = [], {}
    for i, value in enumerate(values):
      if value is None:
        # Named by shard and row instead, in the error row only.
        ids.append(generated[i])
        problems[i] = (f"null id in column {self._id_column!r}; this row is "
                       "named SHARD#ROW here")
      else:
        ids.append(_id_text(value))
    return ids, problems

  def _batch_outputs(self, path: str, offset: int, record_batch):
    ids, problems = self._ids(path, offset, record_batch)
    rows = record_batch.num_rows
    names = record_batch.schema.names
    if self._existing:
      keep = [i for i in range(rows)
              if i in problems or ids[i] not in self._existing]
      counter(SKIPPED).inc(rows - len(keep))
      if len(keep) < rows:
        record_batch = record_batch.take(pa.array(keep, pa.int64()))
        ids = [ids[i] for i in keep]
        problems = {new: problems[old] for new, old in enumerate(keep)
                    if old in problems}
        rows = len(keep)
      if not rows:
        return
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


class ReadParquetImages(beam.PTransform):
  """Reads images from Parquet shards matched by a glob, local or remote.

  The image column holds either encoded image bytes (PNG, JPEG, ...) or raw
  uint8 pixels of the model's input size, flattened row-major (H, W, C).
  """

  def __init__(self, pattern: str, input_shape: list, image_column: str,
               id_column: Optional[str] = None,
               label_column: Optional[str] = None,
               batch_size: int = DEFAULT_BATCH_SIZE,
               skip: Optional[ExistingIds] = None):
    super().__init__()
    self._pattern = pattern
    self._reader = _ReadParquetShard(image_column, id_column, label_column,
                                     batch_size, input_shape, skip)

  def expand(self, pipeline):
    matched = (
        pipeline
        | "Pattern" >> beam.Create([self._pattern])
        | "MatchShards" >> beam.ParDo(_MatchShards()).with_outputs(
            ERRORS, main="shards"))
    read = (
        matched.shards
        | "SpreadShards" >> beam.Reshuffle()
        | "ReadShards" >> beam.ParDo(self._reader).with_outputs(
            ERRORS, main="images"))
    errors = ((matched.errors, read.errors)
              | "ReadErrors" >> beam.Flatten())
    return ReadResult(read.images, errors)
