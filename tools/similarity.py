"""Cosine similarity over a run's embeddings, in bounded memory: the
nearest neighbours of one row, and every pair of near-duplicates.

Both read (ids, embeddings) a record batch at a time from a `scan`, a
callable that starts a new pass over the rows in the same order each time
(tools/answers.py gives one over the locked views). Rows whose embedding is
all zeros have no direction and are left out (and counted).

Near-duplicates are exact at every size, in blocks. The rows are taken
BLOCK_BYTES of embeddings at a time (a block); each block is compared with
itself and with every later row as a scan streams them by, so a run of N
rows of D values takes ceil(N / block rows) passes and holds one block,
one record batch and one tile of TILE_ROWS x TILE_ROWS similarities at a
time, whatever N is. Time grows as N^2 D: every pair's cosine is one
float32 multiply-add per value (N^2 D / 2 in all, in BLAS matrix
products); pairs within FLOAT32_SLACK of the threshold or above are
confirmed in float64.
"""

import dataclasses
import hashlib
import heapq
import time
from typing import Callable, Iterator, Optional

import numpy as np

# The embeddings a block holds (float32): 128 MB, 26,214 rows of D = 1280.
BLOCK_BYTES = 128 * 1024 * 1024
# Rows per side of one tile of similarities (16 MB of float32).
TILE_ROWS = 2048
# Room for float32 rounding in a tile's similarities, so no pair at the
# threshold is missed; the pairs kept are confirmed in float64, at most
# CONFIRM_PAIRS at a time.
FLOAT32_SLACK = 1e-5
CONFIRM_PAIRS = 4096


class SimilarityError(ValueError):
  """A request that cannot be answered (an unknown id, no embeddings)."""


def unit_rows(values: np.ndarray) -> tuple:
  """(unit-length rows as float32, mask of the rows that have a direction)."""
  values = np.asarray(values, np.float32)
  norms = np.linalg.norm(values.astype(np.float64), axis=1)
  usable = norms > 0
  unit = np.zeros_like(values)
  unit[usable] = values[usable] / norms[usable, None].astype(np.float32)
  return unit, usable


def neighbours(query: np.ndarray, query_id: str, scan: Callable[[], Iterator],
               k: int) -> dict:
  """The `k` rows most cosine-similar to `query`, best first (ties by id),
  rows with the query's id left out; one pass, one batch in memory."""
  if k < 1:
    raise SimilarityError(f"--k must be at least 1, got {k}")
  target, usable = unit_rows(np.asarray(query, np.float32)[None, :])
  if not usable[0]:
    raise SimilarityError(f"{query_id!r} has an all-zero embedding, which "
                          "has no direction to compare")
  best, rows, skipped = [], 0, 0  # a heap of (similarity, -rank of id, id)
  for ids, values in scan():
    unit, usable = unit_rows(values)
    skipped += int((~usable).sum())
    rows += len(ids)
    similarity = unit @ target[0]
    for index in np.flatnonzero(usable):
      if ids[index] == query_id:
        continue
      item = (float(similarity[index]), _Descending(ids[index]))
      if len(best) < k:
        heapq.heappush(best, item)
      elif item > best[0]:
        heapq.heapreplace(best, item)
  ranked = sorted(best, reverse=True)
  return {"id": query_id, "rows": rows, "zero_rows": skipped,
          "neighbours": [{"rank": rank, "id": item[1].value,
                          "similarity": item[0]}
                         for rank, item in enumerate(ranked, 1)]}


@dataclasses.dataclass(frozen=True)
class _Descending:
  """An id that sorts backwards, so that among equal similarities the
  smaller id ranks first in a max-first ordering."""
  value: str

  def __lt__(self, other):
    return self.value > other.value

  def __le__(self, other):
    return self.value >= other.value

  def __gt__(self, other):
    return self.value < other.value

  def __ge__(self, other):
    return self.value <= other.value


def block_rows(dimension: int, block_bytes: int) -> int:
  """Rows per block for embeddings of `dimension` values."""
  return max(TILE_ROWS, block_bytes // (4 * max(1, dimension)))


class _Pairs:
  """The pairs found: all counted, the `limit` most similar kept (every one
  with limit 0)."""

  def __init__(self, limit: int):
    self.limit = limit
    self.count = 0
    self._kept = []  # a heap of (similarity, -id pair) when limited

  def add(self, similarity: float, first: str, second: str) -> None:
    self.count += 1
    first, second = min(first, second), max(first, second)
    item = (similarity, _Descending(first), _Descending(second))
    if not self.limit:
      self._kept.append(item)
    elif len(self._kept) < self.limit:
      heapq.heappush(self._kept, item)
    elif item > self._kept[0]:
      heapq.heapreplace(self._kept, item)

  def rows(self) -> list:
    return [{"id": first.value, "other_id": second.value,
             "similarity": similarity}
            for similarity, first, second in sorted(self._kept, reverse=True)]


def _compare(left: np.ndarray, left_ids: list, right: np.ndarray,
             right_ids: list, min_similarity: float, pairs: _Pairs,
             same: bool) -> None:
  """Adds the pairs of `left` x `right` (with `same`, the pairs within one
  set, each once) at `min_similarity` or above, a tile at a time."""
  for start in range(0, len(left), TILE_ROWS):
    stop = min(start + TILE_ROWS, len(left))
    for other in range(start if same else 0, len(right), TILE_ROWS):
      end = min(other + TILE_ROWS, len(right))
      close = (left[start:stop] @ right[other:end].T >=
               np.float32(min_similarity - FLOAT32_SLACK))
      if same and other == start:
        close &= np.triu(np.ones(close.shape, bool), k=1)
      rows, columns = np.nonzero(close)
      for first in range(0, len(rows), CONFIRM_PAIRS):
        chunk_rows = rows[first:first + CONFIRM_PAIRS] + start
        chunk_columns = columns[first:first + CONFIRM_PAIRS] + other
        similarity = np.einsum(
            "ij,ij->i", left[chunk_rows].astype(np.float64),
            right[chunk_columns].astype(np.float64))
        for row, column, value in zip(chunk_rows, chunk_columns, similarity):
          if value >= min_similarity and left_ids[row] != right_ids[column]:
            pairs.add(float(value), left_ids[row], right_ids[column])


def near_duplicates(scan: Callable[[], Iterator], min_similarity: float,
                    dimension: int, limit: int = 0,
                    block_bytes: Optional[int] = None) -> dict:
  """Every pair of rows (with different ids) whose embeddings' cosine is at
  least `min_similarity`, counted, and the `limit` most similar listed (all
  with 0); exact, in blocks (see the module's docstring)."""
  if not -1.0 <= min_similarity <= 1.0:
    raise SimilarityError(f"--min_similarity must be between -1 and 1, got "
                          f"{min_similarity}")
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
    raise SimilarityError(f"--limit must be a whole number, 0 (every pair) "
                          f"or more, got {limit!r}")
  started = time.monotonic()
  per_block = block_rows(dimension, block_bytes or BLOCK_BYTES)
  pairs = _Pairs(limit)
  order, passes = None, 0
  rows = zero_rows = 0
  block_start = 0
  while True:
    passes += 1
    digest = hashlib.sha256()
    position = 0
    block, block_ids, closed = [], [], False
    for ids, values in scan():
      digest.update("\0".join(ids).encode("utf-8", "surrogatepass") + b"\1")
      unit, usable = unit_rows(values)
      if passes == 1:
        rows += len(ids)
        zero_rows += int((~usable).sum())
      kept = np.flatnonzero(usable)
      unit, batch_ids = unit[kept], [ids[i] for i in kept]
      # This batch's rows that fall in the block, and those after it.
      offsets = position + np.arange(len(kept))
      position += len(kept)
      in_block = (offsets >= block_start) & (offsets < block_start + per_block)
      after = offsets >= block_start + per_block
      if in_block.any():
        block.append(unit[in_block])
        block_ids.extend(i for i, keep in zip(batch_ids, in_block) if keep)
      if after.any():
        if not closed:
          block, closed = _joined(block, dimension), True
          _compare(block, block_ids, block, block_ids, min_similarity, pairs,
                   same=True)
        _compare(block, block_ids, unit[after],
                 [i for i, keep in zip(batch_ids, after) if keep],
                 min_similarity, pairs, same=False)
    if order is None:
      order = digest.hexdigest()
    elif order != digest.hexdigest():
      raise SimilarityError("the rows came back in another order on a later "
                            "pass; near-duplicates cannot be counted exactly")
    if not closed and block:
      # The block ran to the end of the rows: only its own pairs are left.
      block = _joined(block, dimension)
      _compare(block, block_ids, block, block_ids, min_similarity, pairs,
               same=True)
    block_start += per_block
    if block_start >= position:
      break
  return {
      "min_similarity": min_similarity, "rows": rows, "zero_rows": zero_rows,
      "pairs": pairs.count, "shown": pairs.rows(),
      "method": (f"exact, every pair compared: {passes} pass(es) over the "
                 f"rows in blocks of up to {per_block}"),
      "seconds": round(time.monotonic() - started, 3),
  }


def _joined(block: list, dimension: int) -> np.ndarray:
  return (np.concatenate(block) if block else
          np.zeros((0, dimension), np.float32))
