"""Embeddings: what writing them costs, how fast they are searched, and
what a head trained on them scores.

  python -m benchmarks.embeddings [--parts write,search,flowers]
      [--work /work/bench/embed] [--repeats 3] [--slow_repeats 1]
      [--rows 100000] [--kinds clustered,isotropic] [--heads linear,mlp]
      [--no_baseline]

write    beam_jobs.predict on W3 (benchmarks.workloads' 10,299 flower
         JPEGs, its photo_xception flowers model trained 1 epoch) with and
         without --write_embeddings, interleaved: seconds of the whole
         command and bytes of the prediction shards; medians; the ratio is
         with / without.
search   over a synthetic run of --rows embeddings of D = 1280 (200
         clusters of ReLU-like vectors, 1,000 planted near-duplicate pairs;
         and isotropic ones), seconds of the whole command, medians: the
         baseline is the SQL a user would write for one id's 10 nearest
         (tools.query sql with DuckDB's array_cosine_similarity, in the same
         sandbox), then tools.query neighbours (--repeats runs) and
         near-duplicates (--slow_repeats runs); each ratio is against that
         baseline on the same data in the same run.
flowers  model.train --features_from the pretrained EfficientNet-Lite0
         (benchmarks/pytorch's export, adopted with its timm config.json:
         bicubic resize to 256, centre crop 224, (x - 127.5) / 127.5) on the
         flowers, seeded 20% split, --heads (linear and mlp): validation
         accuracy and seconds of the whole command; one run each; the
         baseline is model.train from scratch (photo_xception at 64x64,
         docs/training.md's 0.730) in the same run, unless --no_baseline.

Every row gives the 1-minute load average before and after (2 shared
cores).
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from benchmarks import workloads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = "/work/shared/data"
ONNX_MODELS = "/work/bench/onnx_models/efficientnet_lite0"
DIMENSION = 1280
CLUSTERS = 200
PLANTED_PAIRS = 1000
ROWS_PER_SHARD = 10000


def load() -> float:
  return round(os.getloadavg()[0], 1)


def timed(command: list) -> tuple:
  """(seconds, load before, load after) of a command that must succeed."""
  before = load()
  started = time.monotonic()
  subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE)
  return time.monotonic() - started, before, load()


def shard_bytes(output: str) -> int:
  return sum(os.path.getsize(path) for path in glob.glob(
      os.path.join(output, "**", "predictions-*.parquet"), recursive=True))


def part_write(work: str, repeats: int) -> list:
  workloads.SHARED = SHARED
  folder = os.path.join(work, "W3-10000")
  if not os.path.exists(folder):
    workloads.build_w3(folder + ".tmp", 10000)
    os.rename(folder + ".tmp", folder)
  model = workloads.ensure_model(os.path.join(work, "flowers_w3"),
                                 os.path.join(SHARED, "flowers"),
                                 "photo_xception", ("--epochs", "1"))
  runs = {False: [], True: []}
  for _ in range(repeats):
    for embeddings in (False, True):
      output = os.path.join(work, "out_w3_" + ("with" if embeddings
                                               else "without"))
      command = [sys.executable, "-m", "beam_jobs.predict", "--input", folder,
                 "--model", model, "--output", output, "--overwrite",
                 "--progress_seconds", "0"]
      seconds, before, after = timed(command + (["--write_embeddings"]
                                                if embeddings else []))
      runs[embeddings].append((seconds, shard_bytes(output), before, after))
  dimension = json.load(open(os.path.join(model, "model_card.json"))
                        )["embedding"]["dimension"]
  without = _row("W3 predict without --write_embeddings", runs[False])
  return [without, _row(f"W3 predict with --write_embeddings (D = "
                        f"{dimension})", runs[True], without)]


def _row(name, runs, baseline: dict = None) -> dict:
  """A table row of medians; `ratio` is seconds (and bytes) against the
  baseline row, measured in the same run."""
  row = {"what": name, "runs": len(runs),
         "seconds": round(statistics.median(r[0] for r in runs), 2),
         "bytes": (int(statistics.median(r[1] for r in runs))
                   if runs[0][1] is not None else None),
         "load": f"{min(r[2] for r in runs)}-{max(r[3] for r in runs)}"}
  if baseline:
    ratios = [f"{row['seconds'] / baseline['seconds']:.2f}x s"]
    if row["bytes"] and baseline["bytes"]:
      ratios.append(f"{row['bytes'] / baseline['bytes']:.2f}x bytes")
    row["ratio"] = ", ".join(ratios)
  return row


def synthetic_run(folder: str, rows: int, kind: str) -> None:
  """A folder of prediction shards with `rows` embeddings; rows 2i and
  2i + 1 (i < PLANTED_PAIRS) are near-duplicates."""
  from beam_jobs import outputs  # pylint: disable=import-outside-toplevel
  # A folder left half-written, or in the layout before the kinds' folders,
  # is written again from the seed.
  shutil.rmtree(folder, ignore_errors=True)
  for shard_kind in outputs.KINDS:
    os.makedirs(os.path.join(folder, shard_kind), exist_ok=True)
  rng = np.random.default_rng(0)
  centres = np.abs(rng.standard_normal((CLUSTERS, DIMENSION))).astype(
      np.float32)
  shards = -(-rows // ROWS_PER_SHARD)
  for shard in range(shards):
    start, stop = shard * ROWS_PER_SHARD, min(rows, (shard + 1) *
                                              ROWS_PER_SHARD)
    count = stop - start
    if kind == "clustered":
      values = centres[rng.integers(0, CLUSTERS, count)] + 0.8 * np.abs(
          rng.standard_normal((count, DIMENSION))).astype(np.float32)
    else:
      values = rng.standard_normal((count, DIMENSION)).astype(np.float32)
    for i in range(0, min(count, 2 * PLANTED_PAIRS - start), 2):
      values[i + 1] = values[i] + 0.02 * rng.standard_normal(DIMENSION)
    ids = [f"img/{i:07d}.jpg" for i in range(start, stop)]
    probabilities = rng.dirichlet(np.ones(5), count).astype(np.float32)
    table = outputs.predictions_table(
        ids, ids, [None] * count, probabilities, list("abcde"), 3, "m",
        "onnx", False, embeddings=values)
    pq.write_table(table, os.path.join(
        folder, "predictions",
        f"predictions-{shard:05d}-of-{shards:05d}.parquet"))
  pq.write_table(outputs.ERRORS_SCHEMA.empty_table(), os.path.join(
      folder, "errors", "errors-00000-of-00001.parquet"))


def _sql_nearest(query_id: str) -> str:
  """What a SQL user writes for one id's 10 nearest (docs/embeddings.md)."""
  cast = f"embedding::FLOAT[{DIMENSION}]"
  return (f"SELECT id, array_cosine_similarity({cast}, (SELECT {cast} FROM "
          f"predictions WHERE id = '{query_id}')) AS s FROM predictions "
          "ORDER BY s DESC LIMIT 11")


def part_search(work: str, repeats: int, slow_repeats: int, rows: int,
                kinds: list) -> list:
  results = []
  query_id = "img/0000007.jpg"
  for kind in kinds:
    folder = os.path.join(work, f"search_{kind}_{rows}")
    if not os.path.exists(os.path.join(folder, "errors",
                                       "errors-00000-of-00001.parquet")):
      synthetic_run(folder, rows, kind)
    query = [sys.executable, "-m", "tools.query", folder]
    baseline = None
    for name, command, times in (
        ("baseline: sql array_cosine_similarity ... LIMIT 11",
         query + ["sql", _sql_nearest(query_id)], repeats),
        ("neighbours ID --k 10", query + ["neighbours", query_id, "--k",
                                          "10"], repeats),
        ("near-duplicates --min_similarity 0.97",
         query + ["near-duplicates", "--min_similarity", "0.97"],
         slow_repeats)):
      runs = []
      for _ in range(times):
        seconds, before, after = timed(command)
        runs.append((seconds, None, before, after))
      row = _row(f"{name}, {rows:,} x {DIMENSION} {kind}", runs, baseline)
      baseline = baseline or row
      results.append(row)
  return results


def _train(output: str, flags: list) -> tuple:
  """(seconds, load before, load after, card) of model.train on the
  flowers' seeded 20% split."""
  seconds, before, after = timed([
      sys.executable, "-m", "model.train", "--data",
      os.path.join(SHARED, "flowers"), "--output", output, "--quiet",
      *flags])
  with open(os.path.join(output, "model_card.json"), encoding="utf-8") as f:
    return seconds, before, after, json.load(f)


def part_flowers(work: str, heads: list, baseline: bool) -> list:
  backbone = os.path.join(work, "efficientnet_lite0")
  if not os.path.exists(os.path.join(backbone, "model_card.json")):
    subprocess.run([
        sys.executable, "-m", "model.adopt",
        os.path.join(ONNX_MODELS, "efficientnet_lite0_b1.onnx"),
        "--output", backbone, "--class_names",
        os.path.join(ONNX_MODELS, "imagenet_classes.txt"),
        "--preprocessing_config", os.path.join(ONNX_MODELS, "config.json")],
                   check=True, cwd=REPO)
  results, scratch = [], None
  if baseline:
    # The from-scratch default (photo_xception at 64x64), the figure a head
    # on the embeddings has to beat.
    seconds, before, after, card = _train(
        os.path.join(work, "flowers_scratch"), [])
    scratch = card["metrics"]["validation_accuracy"]
    results.append({
        "what": "baseline: flowers from scratch, photo_xception 64x64",
        "runs": 1, "seconds": round(seconds, 1), "accuracy": scratch,
        "load": f"{before}-{after}"})
  for head in heads:
    seconds, before, after, card = _train(
        os.path.join(work, f"flowers_{head}"),
        ["--features_from", backbone, "--head", head])
    accuracy = card["metrics"]["validation_accuracy"]
    row = {"what": f"flowers, --features_from EfficientNet-Lite0, {head} "
                   "head", "runs": 1, "seconds": round(seconds, 1),
           "accuracy": accuracy,
           "embed_seconds": card["training"]["seconds"]["embed"],
           "load": f"{before}-{after}"}
    if scratch:
      row["ratio"] = (f"{seconds / results[0]['seconds']:.2f}x s, "
                      f"{accuracy / scratch:.3f}x accuracy")
    results.append(row)
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--parts", default="write,search,flowers")
  parser.add_argument("--work", default="/work/bench/embed")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--slow_repeats", type=int, default=1,
                      help="runs of near-duplicates (minutes each)")
  parser.add_argument("--rows", type=int, default=100000)
  parser.add_argument("--kinds", default="clustered,isotropic")
  parser.add_argument("--heads", default="linear,mlp")
  parser.add_argument("--no_baseline", action="store_true",
                      help="flowers: skip training from scratch (minutes)")
  args = parser.parse_args(argv)
  os.makedirs(args.work, exist_ok=True)
  rows = []
  for part in args.parts.split(","):
    if part == "write":
      rows += part_write(args.work, args.repeats)
    elif part == "search":
      rows += part_search(args.work, args.repeats, args.slow_repeats,
                          args.rows, args.kinds.split(","))
    elif part == "flowers":
      rows += part_flowers(args.work, args.heads.split(","),
                           not args.no_baseline)
    else:
      parser.error(f"unknown part {part!r}")
  columns = sorted({key for row in rows for key in row},
                   key=["what", "runs", "seconds", "bytes", "ratio",
                        "accuracy", "embed_seconds", "load"].index)
  print(f"{os.cpu_count()} cores; 1-minute load average per row "
        "(before the first run - after the last)")
  print(" | ".join(columns))
  for row in rows:
    print(" | ".join(str(row.get(column, "")) for column in columns))
  return 0


if __name__ == "__main__":
  sys.exit(main())
