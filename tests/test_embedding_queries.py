"""tools.query neighbours, near-duplicates and compare's mean cosine, and
the report's embedding map, against numpy computed apart on the same
embeddings."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("duckdb")  # tools.query needs the tools extra.

from beam_jobs import outputs
from tools import query
from tools import similarity

DIMENSION = 24
ROWS = 700


def _write_run(folder, values, ids, labels=None, shards=3):
  """Shards in the output's layout: OUT/predictions/ and OUT/errors/."""
  for kind in outputs.KINDS:
    os.makedirs(os.path.join(folder, kind), exist_ok=True)
  count = len(ids)
  rng = np.random.default_rng(1)
  probabilities = rng.dirichlet(np.ones(3), count).astype(np.float32)
  bounds = np.linspace(0, count, shards + 1).astype(int)
  for shard, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
    table = outputs.predictions_table(
        ids[start:stop], ids[start:stop],
        (labels or [None] * count)[start:stop], probabilities[start:stop],
        ["a", "b", "c"], 2, "m", "tflite", False,
        embeddings=values[start:stop])
    pq.write_table(table, os.path.join(
        folder, "predictions",
        f"predictions-{shard:05d}-of-{shards:05d}.parquet"),
                   row_group_size=64)
  pq.write_table(outputs.ERRORS_SCHEMA.empty_table(), os.path.join(
      folder, "errors", "errors-00000-of-00001.parquet"))
  return str(folder)


def _embeddings(seed=0):
  """ReLU-like rows, some in tight pairs and triples, one all zero."""
  rng = np.random.default_rng(seed)
  values = np.abs(rng.standard_normal((ROWS, DIMENSION))).astype(np.float32)
  for i in range(0, 90, 3):
    values[i + 1] = values[i] + 0.03 * rng.standard_normal(DIMENSION)
    values[i + 2] = values[i] * 2.5
  values[ROWS - 1] = 0
  return values


@pytest.fixture(name="run")
def _run(tmp_path):
  values = _embeddings()
  ids = [f"img_{i:04d}" for i in range(ROWS)]
  labels = [("a", "b", "c")[i % 3] for i in range(ROWS)]
  return _write_run(tmp_path / "out", values, ids, labels), values, ids


def _json(capsys, *argv):
  assert query.main([*argv, "--json"]) == 0
  return json.loads(capsys.readouterr().out)


def _cosines(values):
  norms = np.linalg.norm(values.astype(np.float64), axis=1)
  unit = values / np.where(norms > 0, norms, 1)[:, None]
  return unit @ unit.T, norms > 0


def test_neighbours_are_numpys_brute_force(run, capsys):
  folder, values, ids = run
  cosines, usable = _cosines(values)
  for query_index in (0, 5, 400):
    result = _json(capsys, folder, "neighbours", ids[query_index], "--k", "7")
    row = np.where(usable, cosines[query_index], -np.inf)
    row[query_index] = -np.inf
    order = sorted(range(ROWS), key=lambda i: (-row[i], ids[i]))[:7]
    assert [n["id"] for n in result["neighbours"]] == [ids[i] for i in order]
    np.testing.assert_allclose([n["similarity"] for n in result["neighbours"]],
                               row[order], atol=1e-6)
    assert result["rows"] == ROWS and result["zero_rows"] == 1


@pytest.mark.parametrize("threshold", [0.97, 0.9])
def test_near_duplicates_are_every_pair_numpy_finds(run, capsys, monkeypatch,
                                                    threshold):
  folder, values, ids = run
  cosines, usable = _cosines(values)
  first, second = np.triu_indices(ROWS, 1)
  keep = (cosines[first, second] >= threshold) & usable[first] & usable[
      second]
  expected = {(ids[a], ids[b]) for a, b in zip(first[keep], second[keep])}
  assert expected  # the planted pairs at least
  # Tiles and blocks far smaller than the rows: several passes.
  monkeypatch.setattr(similarity, "TILE_ROWS", 64)
  monkeypatch.setattr(similarity, "BLOCK_BYTES", 4 * DIMENSION * 150)
  result = _json(capsys, folder, "near-duplicates", "--min_similarity",
                 str(threshold), "--limit", "0")
  assert result["pairs"] == len(expected)
  assert {(p["id"], p["other_id"]) for p in result["shown"]} == expected
  assert result["method"].startswith("exact, every pair compared: 5 pass")
  similarities = [p["similarity"] for p in result["shown"]]
  assert similarities == sorted(similarities, reverse=True)
  # --limit shows the most similar, and still counts them all.
  limited = _json(capsys, folder, "near-duplicates", "--min_similarity",
                  str(threshold), "--limit", "5")
  assert limited["pairs"] == len(expected)
  assert limited["shown"] == result["shown"][:5]


def test_compare_gives_the_mean_cosine_of_the_same_ids(run, tmp_path,
                                                       capsys):
  folder, values, ids = run
  rng = np.random.default_rng(5)
  other_values = values + 0.3 * rng.standard_normal(values.shape).astype(
      np.float32)
  # The other run has the first 500 ids, in another order.
  order = rng.permutation(500)
  other = _write_run(tmp_path / "other", other_values[order],
                     [ids[i] for i in order])
  result = _json(capsys, folder, "compare", other)
  a, b = values[:500].astype(np.float64), other_values[:500].astype(
      np.float64)
  cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) *
                             np.linalg.norm(b, axis=1))
  assert result["embeddings"]["ids"] == 500
  assert abs(result["embeddings"]["mean_cosine"] - cosine.mean()) < 1e-5


def test_users_can_cast_the_column_to_duckdbs_fixed_size_array(run, capsys):
  folder, values, ids = run
  rows = _json(capsys, folder, "sql",
               f"SELECT b.id, array_cosine_similarity(a.embedding::FLOAT["
               f"{DIMENSION}], b.embedding::FLOAT[{DIMENSION}]) AS s FROM "
               "predictions a, predictions b WHERE a.id = 'img_0003' AND "
               "b.id = 'img_0004'")
  cosines, _ = _cosines(values)
  assert abs(rows[0]["s"] - cosines[3, 4]) < 1e-5


def test_without_embeddings_or_with_an_unknown_id_one_line(run, tmp_path,
                                                          capsys):
  folder, _, _ = run
  assert query.main([folder, "neighbours", "nobody"]) == 2
  assert capsys.readouterr().err.strip() == (
      "tools.query: error: no prediction with an embedding has the id "
      "'nobody'")
  # A run without the column, in the layout before the kinds' folders
  # (read too).
  plain = str(tmp_path / "plain")
  os.makedirs(plain)
  table = outputs.predictions_table(["x", "y"], ["s", "s"], [None, None],
                                    np.full((2, 3), 1 / 3, np.float32),
                                    ["a", "b", "c"], 2, "m", "tflite", False)
  pq.write_table(table, os.path.join(plain, "predictions-0-of-1.parquet"))
  for command in (["neighbours", "x"], ["near-duplicates"]):
    assert query.main([plain, *command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tools.query: error: the predictions have no embedding "
                   "column: run python -m beam_jobs.predict with "
                   "--write_embeddings"]
  assert query.main([folder, "neighbours", "img_0699"]) == 2
  assert "all-zero embedding" in capsys.readouterr().err


@pytest.mark.parametrize("command, message", [
    (["near-duplicates", "--min_similarity", "2"],
     "--min_similarity must be between -1 and 1, got 2.0"),
    (["near-duplicates", "--min_similarity", "nan"],
     "--min_similarity must be between -1 and 1, got nan"),
    (["near-duplicates", "--limit", "-1"],
     "--limit must be a whole number, 0 (every pair) or more, got -1"),
    (["neighbours", "img_0001", "--k", "0"], "--k must be at least 1, got 0"),
])
def test_out_of_range_settings_are_refused_in_one_line(run, capsys, command,
                                                       message):
  folder, _, _ = run
  assert query.main([folder, *command]) == 2
  assert capsys.readouterr().err.strip() == f"tools.query: error: {message}"


def test_the_report_maps_the_embeddings_where_there_are_some(run, tmp_path):
  pytest.importorskip("matplotlib")
  from tools import report  # pylint: disable=import-outside-toplevel
  folder, values, _ = run
  written = report.write_report(folder, str(tmp_path / "report"), samples=3)
  assert os.path.getsize(written["embedding_map"]) > 0
  coordinates, share = report.pca_2d(values)
  assert coordinates.shape == (ROWS, 2) and share[0] >= share[1]
