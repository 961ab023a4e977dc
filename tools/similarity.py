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
time, whatever N is. Time grows as N^2: at worst every tile's
similarities are computed in full (N^2 D / 2 multiply-adds). Many tiles are
ruled out first, cheaply and losslessly: for unit vectors u, v,
cos(u, v) >= s means |u - v|^2 <= 2 - 2s, and an orthonormal projection P
can only shrink a distance, so a pair whose projected distance
|Pu - Pv|^2 is above 2 - 2s cannot be a near-duplicate. P is the top
PROJECTION_DIMENSIONS principal axes of the first block (any orthonormal P
is exact; good axes rule out more). It rules out most pairs of spread-out
embeddings, and few where rows form tight clusters, whose tiles are then
compared in full.
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
# The projection that rules pairs out before the full comparison.
PROJECTION_DIMENSIONS = 64
# Rows of the first block the principal axes are computed from.
PROJECTION_SAMPLE = 4096
# Room for float32 rounding in the projected test and in a tile's float32
# similarities, so no pair at the threshold is ruled out by either; the
# pairs kept are confirmed in float64.
PROJECTION_SLACK = 1e-4
FLOAT32_SLACK = 1e-5
# Pairs confirmed on all D values at a time; a tile with more left after
# the projection test gets its similarities in one product instead.
GATHER_PAIRS = 4096


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


def block_rows(dimension: int, block_bytes: int = BLOCK_BYTES) -> int:
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


def _projection(unit: np.ndarray) -> np.ndarray:
  """(D, k) orthonormal columns: the principal axes of up to
  PROJECTION_SAMPLE rows."""
  sample = unit[:PROJECTION_SAMPLE].astype(np.float64)
  sample = sample - sample.mean(axis=0)
  _, _, axes = np.linalg.svd(sample, full_matrices=False)
  return np.ascontiguousarray(axes[:PROJECTION_DIMENSIONS].T, np.float32)


def _compare(left: np.ndarray, left_projected: np.ndarray, left_ids: list,
             right: np.ndarray, right_projected: np.ndarray, right_ids: list,
             min_similarity: float, pairs: _Pairs, same: bool) -> int:
  """Adds the pairs of `left` x `right` (with `same`, the pairs within one
  set, each once) at `min_similarity` or above; returns how many tiles
  needed their similarities in full.

  Per tile: the projection test rules pairs out; when more than
  GATHER_PAIRS are left, the tile's float32 similarities are computed in
  one product instead. Every pair left is confirmed in float64, at most
  GATHER_PAIRS at a time.
  """
  bound = 2.0 - 2.0 * min_similarity + PROJECTION_SLACK
  left_norms = (left_projected.astype(np.float64) ** 2).sum(axis=1)
  right_norms = (right_projected.astype(np.float64) ** 2).sum(axis=1)
  full_tiles = 0
  for start in range(0, len(left), TILE_ROWS):
    stop = min(start + TILE_ROWS, len(left))
    for other in range(start if same else 0, len(right), TILE_ROWS):
      end = min(other + TILE_ROWS, len(right))
      close = (left_norms[start:stop, None] + right_norms[None, other:end]
               - 2.0 * (left_projected[start:stop] @
                        right_projected[other:end].T)) <= bound
      if same and other == start:
        close &= np.triu(np.ones(close.shape, bool), k=1)
      if np.count_nonzero(close) > GATHER_PAIRS:
        full_tiles += 1
        close &= (left[start:stop] @ right[other:end].T >=
                  min_similarity - FLOAT32_SLACK)
      rows, columns = np.nonzero(close)
      for first in range(0, len(rows), GATHER_PAIRS):
        chunk_rows = rows[first:first + GATHER_PAIRS] + start
        chunk_columns = columns[first:first + GATHER_PAIRS] + other
        similarity = np.einsum(
            "ij,ij->i", left[chunk_rows].astype(np.float64),
            right[chunk_columns].astype(np.float64))
        for row, column, value in zip(chunk_rows, chunk_columns, similarity):
          if value >= min_similarity and left_ids[row] != right_ids[column]:
            pairs.add(float(value), left_ids[row], right_ids[column])
  return full_tiles


def near_duplicates(scan: Callable[[], Iterator], min_similarity: float,
                    dimension: int, limit: int = 0,
                    block_bytes: int = BLOCK_BYTES) -> dict:
  """Every pair of rows (with different ids) whose embeddings' cosine is at
  least `min_similarity`, counted, and the `limit` most similar listed (all
  with 0); exact, in blocks (see the module's docstring)."""
  if not -1.0 <= min_similarity <= 1.0:
    raise SimilarityError(f"--min_similarity must be between -1 and 1, got "
                          f"{min_similarity}")
  started = time.monotonic()
  per_block = block_rows(dimension, block_bytes)
  pairs = _Pairs(limit)
  projection, order, passes, full_tiles = None, None, 0, 0
  rows = zero_rows = 0
  block_start = 0
  while True:
    passes += 1
    digest = hashlib.sha256()
    position = 0
    block, block_ids, block_projected = [], [], None
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
        if block_projected is None:
          block, projection, block_projected = _close_block(
              block, projection)
          full_tiles += _compare(block, block_projected, block_ids, block,
                                 block_projected, block_ids, min_similarity,
                                 pairs, same=True)
        later = unit[after]
        full_tiles += _compare(
            block, block_projected, block_ids, later, later @ projection,
            [i for i, keep in zip(batch_ids, after) if keep],
            min_similarity, pairs, same=False)
    if order is None:
      order = digest.hexdigest()
    elif order != digest.hexdigest():
      raise SimilarityError("the rows came back in another order on a later "
                            "pass; near-duplicates cannot be counted exactly")
    if block_projected is None and block:
      # The block ran to the end of the rows: only its own pairs are left.
      block, projection, block_projected = _close_block(block, projection)
      full_tiles += _compare(block, block_projected, block_ids, block,
                             block_projected, block_ids, min_similarity,
                             pairs, same=True)
    block_start += per_block
    if block_start >= position:
      break
  return {
      "min_similarity": min_similarity, "rows": rows, "zero_rows": zero_rows,
      "pairs": pairs.count, "shown": pairs.rows(),
      "method": (f"exact, in blocks: {passes} pass(es) over the rows, blocks "
                 f"of up to {per_block}; tiles of {TILE_ROWS} rows ruled out "
                 f"by a lossless {PROJECTION_DIMENSIONS}-dimension "
                 f"projection test but for {full_tiles} compared in full"),
      "seconds": round(time.monotonic() - started, 3),
  }


def _close_block(block: list, projection: Optional[np.ndarray]) -> tuple:
  """(the block as one array, the projection, the block projected); the
  projection is made from the first block."""
  block = np.concatenate(block) if block else np.zeros((0, 0), np.float32)
  if projection is None:
    projection = _projection(block)
  return block, projection, block @ projection
