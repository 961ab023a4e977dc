"""Parquet by row group: the work items of every Parquet input.

A shard's footer says how many row groups it has and how many rows each
holds; `PlanRowGroups` turns each shard into work items of consecutive row
groups (`RowGroupItem`) of about ITEM_ROWS rows, so one large shard spreads over every worker and a retry
redoes one item, not the shard. A row group is the smallest item: Parquet
cannot start reading in the middle of one.

`read_item` reads an item's row groups one at a time (`RowBatch`es), so a
corrupt row group costs its own rows only: it is reported as a
`RowRangeError` and the other row groups go on. Rows keep their global index in the shard,
which names them (SHARD#ROW) however the shard was split.
"""

from typing import Iterable, NamedTuple, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from beam_jobs.contracts import ERRORS
from beam_jobs.contracts import INPUTS
from beam_jobs.contracts import counter
from beam_jobs.contracts import error_row
from imagebatch import paths

# Rows per work item: row groups are put together until an item has this
# many (a row group of more is an item by itself).
ITEM_ROWS = 10_000


class RowGroupItem(NamedTuple):
  """A work item: row groups first_group..stop_group-1 of a shard, holding
  its rows first_row..stop_row-1."""
  path: str
  first_group: int
  stop_group: int
  first_row: int
  stop_row: int


class RowSelection(NamedTuple):
  """The rows of a work item to read: all of them (rows None), or those
  --skip_existing left (sorted global row indices)."""
  item: RowGroupItem
  rows: Optional[list] = None


class RowBatch(NamedTuple):
  """Rows read from a shard, with their global row indices."""
  indices: np.ndarray
  record_batch: pa.RecordBatch


class RowRangeError(NamedTuple):
  """Rows start..stop-1 of a shard that could not be read."""
  start: int
  stop: int
  error: Exception

  def error_row(self, path: str) -> dict:
    """The one error row standing for these rows."""
    return error_row(
        range_id(path, self.start, self.stop), path, "read",
        f"{type(self.error).__name__}: {self.error} (rows {self.start} to "
        f"{self.stop - 1} of the shard; its other row groups were read)")


def plan_items(path: str, row_group_rows: list, item_rows: int = ITEM_ROWS):
  """The work items (RowGroupItem) of a shard whose row groups hold
  `row_group_rows` rows."""
  first, first_row, row = 0, 0, 0
  for index, count in enumerate(row_group_rows):
    row += count
    if row - first_row >= item_rows or index + 1 == len(row_group_rows):
      yield RowGroupItem(path, first, index + 1, first_row, row)
      first, first_row = index + 1, row


def footer_rows(path: str) -> list:
  """The row count of each row group of a shard, from its footer."""
  with paths.open_file(path) as handle:
    metadata = pq.ParquetFile(handle).metadata
    return [metadata.row_group(i).num_rows
            for i in range(metadata.num_row_groups)]


class PlanRowGroups(beam.DoFn):
  """Groups (lists) of shard paths in; work items out.

  A shard whose footer cannot be read is one input with one error row (its
  id is the shard's path), unless `strict`: then it fails the run, for
  shards the run cannot do without.
  """

  def __init__(self, item_rows: int = ITEM_ROWS, strict: bool = False):
    self._item_rows = item_rows
    self._strict = strict

  def process(self, shards: list):
    for path in shards:
      try:
        rows = footer_rows(path)
      except Exception as error:  # pylint: disable=broad-except
        if self._strict:
          raise
        counter(INPUTS).inc()
        yield beam.pvalue.TaggedOutput(
            ERRORS, error_row(path, path, "read",
                              f"{type(error).__name__}: {error}"))
        continue
      yield from plan_items(path, rows, self._item_rows)


def range_id(path: str, start: int, stop: int) -> str:
  """The id of the error row standing for rows start..stop-1 of a shard."""
  return f"{path}#{start}-{stop - 1}"


def read_item(item: RowGroupItem, columns: Optional[list], batch_size: int,
              rows: Optional[Iterable[int]] = None):
  """Reads a work item's row groups as Arrow record batches.

  Yields a RowBatch per record batch and, for each row group that fails, a
  RowRangeError, after which the next row group is read. `columns`: None for every column; the present
  ones are read (with none present, none: the batches count the rows).
  With `rows` (sorted global indices), only those rows are returned and row
  groups holding none of them are not read. A shard that can no longer be
  opened fails the item's whole range the same way.
  """
  path, first, stop, start, stop_row = item
  wanted = None if rows is None else np.asarray(sorted(rows), dtype=np.int64)
  handle = None
  try:
    handle = paths.open_file(path)
    shard = pq.ParquetFile(handle)
    names = shard.schema_arrow.names
    counts = [shard.metadata.row_group(i).num_rows for i in range(first, stop)]
  except Exception as error:  # pylint: disable=broad-except
    if handle is not None:
      handle.close()
    yield from _failed(start, stop_row, wanted, error)
    return
  with handle:
    present = names if columns is None else [c for c in columns if c in names]
    for index, count in zip(range(first, stop), counts):
      yield from _read_row_group(shard, index, start, count,
                                 present, batch_size, wanted)
      start += count


def _failed(start: int, stop: int, wanted: Optional[np.ndarray], error):
  """The error of rows start..stop-1 failing; with `wanted`, of the wanted
  rows among them only (the others were skipped, or reported by the pass
  that read the ids), and none if there are none."""
  if wanted is not None:
    lost = wanted[(wanted >= start) & (wanted < stop)]
    if not len(lost):
      return
    start, stop = int(lost[0]), int(lost[-1]) + 1
  yield RowRangeError(start, stop, error)


def _read_row_group(shard, index: int, start: int, count: int, columns: list,
                    batch_size: int, wanted: Optional[np.ndarray]):
  if wanted is not None:
    lo, hi = np.searchsorted(wanted, [start, start + count])
    if lo == hi:
      return
    selected = wanted[lo:hi]
  offset = start
  try:
    for record_batch in shard.iter_batches(batch_size=batch_size,
                                           row_groups=[index],
                                           columns=columns):
      indices = np.arange(offset, offset + record_batch.num_rows)
      offset += record_batch.num_rows
      if wanted is not None:
        keep = np.flatnonzero(np.isin(indices, selected, assume_unique=True))
        if len(keep) < len(indices):
          record_batch = record_batch.take(pa.array(keep, pa.int64()))
          indices = indices[keep]
      if len(indices):
        yield RowBatch(indices, record_batch)
      if wanted is not None and offset > selected[-1]:
        return  # nothing wanted is left; the rest may fail, and is not ours
  except Exception as error:  # pylint: disable=broad-except
    yield from _failed(offset, start + count, wanted, error)
