"""--skip_existing as a distributed anti-join on id.

Ids meet by bucket (`contracts.id_bucket`, a CRC-32 of the id modulo the
bucket count): the earlier predictions' ids, read from the shards the
output's manifest lists (the `id` and `model_id` columns only, by row group,
this model's rows only), and the inputs' ids, read before any image is.
Both go out in groups per bucket, so the elements number about (ids / group
size) + (work items x buckets), and one GroupByKey brings each bucket's two
sides together. There the bucket's earlier ids are put in a set, the inputs
are filtered against it, and what is left goes on to be read: no process
ever holds more than one bucket's earlier ids. The bucket count grows with
the earlier rows the manifest records (IDS_PER_BUCKET each).

Only this model's ids count, a row whose id is null never matches, and every
skipped input is counted (SKIPPED) instead of being read.
"""

import math
from typing import NamedTuple, Optional

import apache_beam as beam
import pyarrow.compute as pc

from beam_jobs.contracts import SKIPPED
from beam_jobs.contracts import counter
from beam_jobs.sources import row_groups
from beam_jobs.sources.listing import Groups
from beam_jobs.sources.listing import same
from beam_jobs.sources.row_groups import RowGroupItem
from beam_jobs.sources.row_groups import RowRangeError

IDS_PER_BUCKET = 50_000
MIN_BUCKETS, MAX_BUCKETS = 16, 8192
# Ids per element when the earlier ids go to their buckets.
EARLIER_GROUP = 4096
# The two sides of a bucket.
EARLIER, INPUT = "earlier", "input"


class RowIds(NamedTuple):
  """Rows of a Parquet work item on their way to the join, with their ids."""
  item: RowGroupItem
  rows: list
  ids: list


def bucket_count(earlier_rows: Optional[int]) -> int:
  """Buckets for a join against this many earlier rows (None: unknown)."""
  rows = earlier_rows if earlier_rows is not None else (
      IDS_PER_BUCKET * MIN_BUCKETS * 4)
  return max(MIN_BUCKETS,
             min(MAX_BUCKETS, math.ceil(rows / IDS_PER_BUCKET)))


class SkipExisting:
  """What --skip_existing skips: the ids `model_id` has in the prediction
  shards `files` (those the output's manifest lists, holding
  `earlier_rows` rows in all, when known)."""

  def __init__(self, files: list, model_id: str,
               earlier_rows: Optional[int] = None):
    self.files = list(files)
    self.model_id = model_id
    self.buckets = bucket_count(earlier_rows)

  def earlier_ids(self, pipeline, label: str = "EarlierIds"):
    """(bucket, (EARLIER, [id, ...])) for every id of this model."""
    return pipeline | label >> ReadEarlierIds(self.files, self.model_id,
                                              self.buckets)


class _EarlierIds(beam.DoFn):
  """Reads one work item of an earlier shard's id and model_id columns."""

  def __init__(self, model_id: str, buckets: int):
    self._model_id = model_id
    self._buckets = buckets

  def process(self, item):
    groups = Groups(EARLIER_GROUP, self._buckets)
    for part in row_groups.read_item(item, ["id", "model_id"],
                                     EARLIER_GROUP):
      if isinstance(part, RowRangeError):
        # The manifest lists this shard as part of the results: without its
        # ids the run cannot know what to skip.
        raise RuntimeError(
            f"--skip_existing: rows {part.start} to {part.stop - 1} of "
            f"{item.path}, a prediction shard the output's manifest lists, "
            f"cannot be read: {type(part.error).__name__}: {part.error}"
        ) from part.error
      record_batch = part.record_batch
      mine = pc.and_kleene(
          pc.equal(record_batch.column("model_id"), self._model_id),
          pc.is_valid(record_batch.column("id")))
      for id_ in record_batch.column("id").filter(
          pc.fill_null(mine, False)).to_pylist():
        full = groups.add(id_)
        if full is not None:
          yield full[0], (EARLIER, full[1])
    for bucket, ids in groups.rest():
      yield bucket, (EARLIER, ids)


class ReadEarlierIds(beam.PTransform):
  """The earlier prediction shards, by row group, to ids keyed by bucket."""

  def __init__(self, files: list, model_id: str, buckets: int):
    super().__init__()
    self._files = list(files)
    self._model_id = model_id
    self._buckets = buckets

  def expand(self, pipeline):
    return (pipeline
            | "Shards" >> beam.Create([[path] for path in self._files])
            | "SpreadShards" >> beam.Reshuffle()
            | "Plan" >> beam.ParDo(row_groups.PlanRowGroups(strict=True))
            | "SpreadItems" >> beam.Reshuffle()
            | "ReadIds" >> beam.ParDo(_EarlierIds(self._model_id,
                                                  self._buckets)))


def _earlier_set(values) -> set:
  earlier = set()
  for side, payload in values:
    if side == EARLIER:
      earlier.update(payload)
  return earlier


class _JoinRefs(beam.DoFn):
  """A bucket's inputs (paths or list rows), less those whose id
  (`id_of(input)`) it held before, in full groups.

  The bucket's values are read twice (Beam's grouped values can be): once
  for the earlier ids, once for the inputs, so only the set is held.
  """

  def __init__(self, batch_size: int, id_of=same):
    self._batch_size = batch_size
    self._id_of = id_of

  def process(self, bucket_values):
    _, values = bucket_values
    earlier = _earlier_set(values)
    groups = Groups(self._batch_size)
    skipped = 0
    for side, refs in values:
      if side != INPUT:
        continue
      for ref in refs:
        if self._id_of(ref) in earlier:
          skipped += 1
          continue
        full = groups.add(ref)
        if full is not None:
          yield full
    yield from groups.rest()
    if skipped:
      counter(SKIPPED).inc(skipped)


class SkipRefs(beam.PTransform):
  """Keyed groups of inputs read by URI, (bucket, [input, ...]), in; groups
  of those not predicted before out (up to `batch_size` each). An input is
  a path, its own id, or anything whose id `id_of` gives."""

  def __init__(self, skip: SkipExisting, batch_size: int, id_of=same):
    super().__init__()
    self._skip = skip
    self._batch_size = batch_size
    self._id_of = id_of

  def expand(self, keyed_refs):
    inputs = keyed_refs | "TagInputs" >> beam.MapTuple(
        lambda bucket, refs: (bucket, (INPUT, refs)))
    return ((self._skip.earlier_ids(keyed_refs.pipeline), inputs)
            | "BothSides" >> beam.Flatten()
            | "ByBucket" >> beam.GroupByKey()
            | "Join" >> beam.ParDo(_JoinRefs(self._batch_size, self._id_of)))


class _JoinRows(beam.DoFn):
  """A bucket's Parquet rows (RowIds), less those whose id it held before:
  (item, [row, ...]) for each item."""

  def process(self, bucket_values):
    _, values = bucket_values
    earlier = _earlier_set(values)
    skipped = 0
    for side, payload in values:
      if side != INPUT:
        continue
      item, rows, ids = payload
      kept = [row for row, id_ in zip(rows, ids) if id_ not in earlier]
      skipped += len(rows) - len(kept)
      if kept:
        yield item, kept
    if skipped:
      counter(SKIPPED).inc(skipped)


class SkipRows(beam.PTransform):
  """Parquet rows by bucket, (bucket, RowIds), in; (item, rows) out for the
  rows not predicted before."""

  def __init__(self, skip: SkipExisting):
    super().__init__()
    self._skip = skip

  def expand(self, keyed_rows):
    inputs = keyed_rows | "TagInputs" >> beam.MapTuple(
        lambda bucket, rows: (bucket, (INPUT, rows)))
    return ((self._skip.earlier_ids(keyed_rows.pipeline), inputs)
            | "BothSides" >> beam.Flatten()
            | "ByBucket" >> beam.GroupByKey()
            | "Join" >> beam.ParDo(_JoinRows()))
