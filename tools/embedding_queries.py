"""The answers about a run's embeddings (predict --write_embeddings): the
nearest neighbours of an id, near-duplicate pairs, the mean cosine between
two runs, and a bounded sample for the report's map.

Everything is read through the locked views of tools/sandbox.py, a record
batch at a time (tools/similarity.py holds the arithmetic). DuckDB reads the
column as FLOAT[]; `embedding::FLOAT[D]` makes it a fixed-size array for
`array_cosine_similarity` and friends in `tools.query OUT sql`.
"""

from typing import Optional

import numpy as np

from beam_jobs import outputs
from tools import similarity
from tools.sandbox import QueryError
from tools.sandbox import rows
from tools.sandbox import scalar

COLUMN = outputs.EMBEDDING_COLUMN
# Rows per record batch read from the views: 4,096 x 1,280 float32 is 20 MB.
SCAN_ROWS = 4096
DEFAULT_K = 10
DEFAULT_MIN_SIMILARITY = 0.97
# Pairs listed at most by default, as `sql` returns 10,000 rows at most; all
# are counted, and --limit 0 lists every one (N^2 / 2 at worst).
DEFAULT_PAIRS_SHOWN = 10000
# The report's map: at most this many rows, picked by a hash of the id.
MAP_ROWS = 5000


def has_embeddings(connection, view: str = "predictions") -> bool:
  return COLUMN in {row["column_name"] for row in rows(
      connection, f"DESCRIBE {view}")}


def dimension(connection, view: str = "predictions") -> int:
  """D of the view's embeddings, from its first row that has one;
  QueryError when it has none. Every scan checks that each row has D."""
  if not has_embeddings(connection, view):
    raise QueryError(f"the {view} have no {COLUMN} column: run "
                     "python -m beam_jobs.predict with --write_embeddings")
  sizes = rows(connection, f"SELECT len({COLUMN}) AS size FROM {view} "
               f"WHERE {COLUMN} IS NOT NULL LIMIT 1")
  if not sizes:
    raise QueryError(f"no row of the {view} has an {COLUMN}")
  return int(sizes[0]["size"])


def _matrix(column, width: int) -> np.ndarray:
  """A list<float> Arrow column of rows of `width` values as (N, width)."""
  values = np.asarray(column.flatten().to_numpy(zero_copy_only=False),
                      np.float32)
  if values.size != len(column) * width or len(set(
      column.value_lengths().to_pylist())) > 1:
    raise QueryError("the embeddings have several sizes; they come from "
                     "different models")
  return values.reshape(-1, width)


def scanner(connection, width: int, view: str = "predictions"):
  """A `scan` for tools/similarity.py: each call starts a pass over the
  view's rows that have an embedding, in the view's order, yielding (ids,
  (n, D) float32)."""
  def scan():
    for batch in connection.record_batches(
        f"SELECT id, {COLUMN} FROM {view} WHERE {COLUMN} IS NOT NULL",
        rows_per_batch=SCAN_ROWS):
      yield (batch.column(0).to_pylist(), _matrix(batch.column(1), width))
  return scan


def neighbours(connection, query_id: str, k: int = DEFAULT_K) -> dict:
  """The k rows whose embeddings are most cosine-similar to `query_id`'s."""
  width = dimension(connection)
  found = rows(connection, f"SELECT {COLUMN} AS e FROM predictions WHERE id "
               f"= ? AND {COLUMN} IS NOT NULL LIMIT 2", [query_id])
  if not found:
    raise QueryError(f"no prediction with an embedding has the id "
                     f"{query_id!r}")
  try:
    result = similarity.neighbours(np.asarray(found[0]["e"], np.float32),
                                   query_id, scanner(connection, width), k)
  except similarity.SimilarityError as error:
    raise QueryError(str(error)) from None
  result["repeated_id"] = len(found) > 1
  _add_labels(connection, result["neighbours"], "id")
  return result


def near_duplicates(connection, min_similarity: float =
                    DEFAULT_MIN_SIMILARITY,
                    limit: int = DEFAULT_PAIRS_SHOWN) -> dict:
  """Every pair of rows at `min_similarity` or above: counted exactly, the
  `limit` most similar listed (all with 0)."""
  width = dimension(connection)
  try:
    result = similarity.near_duplicates(scanner(connection, width),
                                        min_similarity, width, limit)
  except similarity.SimilarityError as error:
    raise QueryError(str(error)) from None
  _add_labels(connection, result["shown"], "id", "label")
  _add_labels(connection, result["shown"], "other_id", "other_label")
  return result


def _add_labels(connection, found: list, key: str,
                name: str = "label") -> None:
  """Each row's predicted label, looked up by id (bound, in one query)."""
  if not found:
    return
  labels = {row["id"]: row["label"] for row in rows(
      connection, "SELECT id, any_value(label) AS label FROM predictions "
      "WHERE list_contains(?::VARCHAR[], id) GROUP BY id",
      [[row[key] for row in found]])}
  for row in found:
    row[name] = labels.get(row[key])


def mean_cosine(connection) -> Optional[dict]:
  """The mean cosine between the two runs' embeddings of the same ids
  (rows whose embeddings have the same size and a direction), or None when
  either run has none."""
  if not (has_embeddings(connection) and
          has_embeddings(connection, "other_predictions")):
    return None
  return rows(connection, f"""
      SELECT avg(cosine) AS mean_cosine, min(cosine) AS min_cosine,
             count(*) AS ids
      FROM (SELECT list_cosine_similarity(a.{COLUMN}, b.{COLUMN}) AS cosine
            FROM predictions AS a JOIN other_predictions AS b USING (id)
            WHERE len(a.{COLUMN}) = len(b.{COLUMN}))
      WHERE NOT isnan(cosine)""")[0]


def map_sample(connection, limit: int = MAP_ROWS) -> Optional[dict]:
  """Up to `limit` rows' embeddings with their true and predicted labels,
  picked by a hash of the id (a bounded top-N), or None without
  embeddings."""
  if not has_embeddings(connection):
    return None
  width = dimension(connection)
  total = scalar(connection, f"SELECT count(*) FROM predictions WHERE "
                 f"{COLUMN} IS NOT NULL")
  sample = rows(connection, f"""
      SELECT label, true_label, {COLUMN} AS e FROM predictions
      WHERE {COLUMN} IS NOT NULL ORDER BY hash(id), id LIMIT ?""", [limit])
  return {"rows": total, "dimension": width,
          "embeddings": np.asarray([row["e"] for row in sample], np.float32
                                   ).reshape(-1, width),
          "labels": [row["label"] for row in sample],
          "true_labels": [row["true_label"] for row in sample]}
