"""Sources: image files and Parquet shards, read in batches.

Each is a composite PTransform whose main output is `ImageBatch` elements and
whose `errors` output holds a row for every input it could not read.
"""

import concurrent.futures
from typing import Iterable, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_jobs.contracts import DEFAULT_BATCH_SIZE
from beam_jobs.contracts import ERRORS
from beam_jobs.contracts import INPUTS
from beam_jobs.contracts import SKIPPED
from beam_jobs.contracts import ImageBatch
from beam_jobs.contracts import counter
from beam_jobs.contracts import error_row
from model import paths

_UNCOMPRESSED = CompressionTypes.UNCOMPRESSED
# An object store answers each small read after tens of milliseconds, so a
# group of remote files is read by this many threads at once; local files
# read faster one after another.
REMOTE_READ_THREADS = 16


class ExistingIds:
  """Ids a model already predicted in an output folder, loaded on a worker.

  Only the glob and model id travel in the job graph; each worker reads the
  id column itself in `setup`, so millions of ids never bloat the graph.
  """

  def __init__(self, predictions_glob: str, model_id: str):
    self.predictions_glob = predictions_glob
    self.model_id = model_id

  def load(self) -> frozenset:
    ids = set()
    for path in paths.match_paths(self.predictions_glob):
      with FileSystems.open(path, compression_type=_UNCOMPRESSED) as handle:
        table = pq.read_table(handle, columns=["id", "model_id"])
      for id_, model_id in zip(table.column("id").to_pylist(),
                               table.column("model_id").to_pylist()):
        if model_id == self.model_id:
          ids.add(id_)
    return frozenset(ids)


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
    matched = paths.match_paths(pattern)
    if self._existing:
      kept = [p for p in matched if p not in self._existing]
      counter(SKIPPED).inc(len(matched) - len(kept))
      matched = kept
    yield from _chunks(matched, self._group_size)


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
    # One file system lookup per group; images are read as stored, never
    # decompressed by file name.
    filesystem = FileSystems.get_filesystem(group[0])

    def read(path):
      try:
        with filesystem.open(path, compression_type=_UNCOMPRESSED) as handle:
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
    return (
        pipeline
        | "Pattern" >> beam.Create([self._pattern])
        | "MatchFiles" >> beam.ParDo(
            _MatchInGroups(self._batch_size, self._skip))
        # Matching happens on one worker; spread the groups before reading.
        | "SpreadGroups" >> beam.Reshuffle()
        | "ReadFiles" >> beam.ParDo(
            _ReadFileGroup(paths.pattern_base(self._pattern),
                           self._class_names)).with_outputs(ERRORS, main="images"))


def raw_pixel_array(column: pa.Array, row_length: int):
  """Splits a list column of uint8 into rows; returns (pixels, bad rows).

  Rows of the wrong length or with nulls are reported by index, so the good
  rows in the same record batch still go through.
  """
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  lengths = column.value_lengths().to_numpy(zero_copy_only=False)
  valid = column.is_valid().to_numpy(zero_copy_only=False)
  lengths = np.where(valid, np.nan_to_num(lengths, nan=0), 0).astype(np.int64)
  good = valid & (lengths == row_length)
  bad = {}
  for index in np.flatnonzero(~good):
    bad[int(index)] = ("null image cell" if not valid[index] else
                       f"raw pixels of length {lengths[index]}, expected "
                       f"{row_length} (height x width x channels)")
  values = column.filter(pa.array(good)).flatten()
  if values.null_count:
    raise ValueError("raw pixel values must not be null")
  pixels = values.to_numpy(zero_copy_only=False)
  if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
    raise ValueError("raw pixel values must lie in 0..255")
  return pixels.astype(np.uint8, copy=False), np.flatnonzero(good), bad


class _ReadParquetShard(beam.DoFn):
  """Reads one shard as Arrow record batches, one ImageBatch per batch."""

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
      with FileSystems.open(path) as handle:
        shard = pq.ParquetFile(handle)
        columns = [c for c in (self._image_column, self._id_column,
                               self._label_column) if c]
        missing = [c for c in columns if c not in shard.schema_arrow.names]
        if missing:
          raise KeyError(f"columns {missing} not in shard; it has "
                         f"{shard.schema_arrow.names}")
        for record_batch in shard.iter_batches(
            batch_size=self._batch_size, columns=columns):
          yield from self._batch_outputs(path, offset, record_batch)
          offset += record_batch.num_rows
    except Exception as error:  # pylint: disable=broad-except
      # A shard that cannot be read is one input with one error row, and the
      # other shards go on.
      counter(INPUTS).inc()
      after = f" (after {offset} rows were read)" if offset else ""
      yield beam.pvalue.TaggedOutput(
          ERRORS, error_row(path, path, "read",
                            f"{type(error).__name__}: {error}{after}"))

  def _batch_outputs(self, path: str, offset: int, record_batch):
    rows = record_batch.num_rows
    if self._id_column:
      ids = [str(v) for v in record_batch.column(self._id_column).to_pylist()]
    else:
      ids = [f"{path}#{offset + i}" for i in range(rows)]
    if self._existing:
      keep = [i for i, id_ in enumerate(ids) if id_ not in self._existing]
      counter(SKIPPED).inc(rows - len(keep))
      if len(keep) < rows:
        record_batch = record_batch.take(pa.array(keep, pa.int64()))
        ids = [ids[i] for i in keep]
        rows = len(keep)
      if not rows:
        return
    counter(INPUTS).inc(rows)
    # Labels stay as the column holds them (names, indices); they are
    # matched to class names when predictions are formatted.
    labels = (record_batch.column(self._label_column).to_pylist()
              if self._label_column else [None] * rows)
    images = record_batch.column(self._image_column)
    batch = ImageBatch(ids=ids, sources=[path] * rows, true_labels=labels)
    if pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type):
      batch.encoded = images.to_pylist()
      yield batch
      return
    if not (pa.types.is_list(images.type) or
            pa.types.is_large_list(images.type) or
            pa.types.is_fixed_size_list(images.type)):
      raise TypeError(f"column {self._image_column!r} has type {images.type}; "
                      "expected binary (encoded PNG/JPEG) or a list of uint8 "
                      "(raw pixels)")
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
    return (
        pipeline
        | "Pattern" >> beam.Create([self._pattern])
        | "MatchShards" >> beam.FlatMap(paths.match_paths)
        | "SpreadShards" >> beam.Reshuffle()
        | "ReadShards" >> beam.ParDo(self._reader).with_outputs(
            ERRORS, main="images"))
