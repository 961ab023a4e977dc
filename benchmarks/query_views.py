"""Query speed: the locked-down views of tools.query against the old ones.

Three ways to give DuckDB the views, timed on the same questions
(connection set-up included), interleaved, medians:
  native  the views before: DuckDB's read_parquet over a glob, no lock-down;
  arrow   pyarrow datasets registered with DuckDB, which then has no file
          access at all (/work/notes/duckdb_boundary.md, recipe B);
  listed  what tools.query does: DuckDB's read_parquet through ListedShards,
          a read-only file system holding only the listed shards, with
          external access off for everything else.

  python -m benchmarks.query_views --rows 300000 --repeats 7
"""

import argparse
import os
import statistics
import tempfile
import time

import glob

import duckdb
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from beam_jobs import outputs
from tools import answers
from tools import sandbox

CLASSES = [f"class_{i}" for i in range(10)]


def write_output(folder: str, rows: int, shards: int) -> None:
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(rows, len(CLASSES))).astype(np.float32) * 3
  probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  truth = [CLASSES[i] for i in rng.integers(0, len(CLASSES), rows)]
  ids = [f"gs://bucket/images/{i:09d}.png" for i in range(rows)]
  bounds = np.linspace(0, rows, shards + 1).astype(int)
  for shard, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
    table = outputs.predictions_table(
        ids[start:stop], ids[start:stop], truth[start:stop],
        probabilities[start:stop], CLASSES, 3, "m", "tflite", False)
    os.makedirs(os.path.join(folder, "predictions"), exist_ok=True)
    pq.write_table(table, os.path.join(
        folder, "predictions", f"predictions-{shard:05d}-of-{shards:05d}.parquet"))
  os.makedirs(os.path.join(folder, "errors"), exist_ok=True)
  pq.write_table(outputs.ERRORS_SCHEMA.empty_table(),
                 os.path.join(folder, "errors", "errors-00000-of-00001.parquet"))


def native_views(folder: str):
  """The views as tools.query made them before: read_parquet over a glob."""
  connection = duckdb.connect()
  for prefix in outputs.KINDS:
    pattern = outputs.shard_glob(folder, prefix)
    connection.execute(
        f"CREATE VIEW {prefix} AS SELECT * FROM read_parquet('{pattern}', "
        "union_by_name=true)")
  return connection


def arrow_views(folder: str):
  """Recipe B: pyarrow datasets, then DuckDB locked out of every file."""
  connection = duckdb.connect(config={"autoload_known_extensions": False,
                                      "autoinstall_known_extensions": False})
  for prefix in (outputs.PREDICTIONS_PREFIX, outputs.ERRORS_PREFIX):
    files = sorted(glob.glob(outputs.shard_glob(folder, prefix)))
    connection.register(f"_{prefix}", ds.dataset(files, format="parquet"))
    connection.execute(f"CREATE VIEW {prefix} AS SELECT * FROM _{prefix}")
  for statement in ("SET temp_directory = ''",
                    "SET enable_external_access = false",
                    "SET lock_configuration = true"):
    connection.execute(statement)
  return connection


QUESTIONS = {
    "count by label (sql)": lambda c: sandbox.rows(
        c, "SELECT label, count(*) AS n FROM predictions GROUP BY 1"),
    "summary": lambda c: answers.summary(c, "unused"),
    "accuracy": answers.accuracy,
    "low-confidence": lambda c: answers.low_confidence(c, 0.6, 20),
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=300000)
  parser.add_argument("--shards", type=int, default=12)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  folder = tempfile.mkdtemp(prefix="query-views-")
  write_output(folder, args.rows, args.shards)
  # sandbox.rows/scalar call .fetch; native connections get a thin adapter.
  connects = {
      "native": lambda: _Native(native_views(folder)),
      "arrow": lambda: _Native(arrow_views(folder)),
      "listed": lambda: sandbox.connect(folder),
  }
  print(f"{args.rows} predictions in {args.shards} shards, "
        f"median of {args.repeats} (set-up included), seconds")
  print(f"{'question':22} {'native':>7} {'arrow':>7} {'listed':>7} "
        f"{'arrow/n':>7} {'listed/n':>8}")
  for name, question in QUESTIONS.items():
    times = {kind: [] for kind in connects}
    for _ in range(args.repeats):
      for kind, make in connects.items():
        started = time.perf_counter()
        question(make())
        times[kind].append(time.perf_counter() - started)
    native, arrow, listed = (statistics.median(times[k]) for k in connects)
    print(f"{name:22} {native:7.3f} {arrow:7.3f} {listed:7.3f} "
          f"{arrow / native:7.2f} {listed / native:8.2f}")


class _Native:
  def __init__(self, connection):
    self.connection = connection

  def fetch(self, sql, parameters=None, max_rows=None):
    cursor = self.connection.execute(sql, parameters or [])
    names = [column[0] for column in cursor.description]
    return names, cursor.fetchall()


if __name__ == "__main__":
  main()
