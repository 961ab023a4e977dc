"""predict --write_embeddings: the `embedding` column is the engine's
embedding of each image, typed fixed_size_list<float32>[D] with D in the
manifest, and survives pyarrow, DuckDB and pandas round trips. A folder
without an embedding output is refused in one line that says how to add
one."""

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_jobs import config as config_lib
from beam_jobs import outputs
from beam_jobs import predict
from beam_jobs import preflight
from model import card as card_lib
from model import engines
from tests.helpers import png_ids
from tests.helpers import run_predict

DIMENSION = 5


def _table(rows=4, dimension=DIMENSION, seed=0):
  rng = np.random.default_rng(seed)
  probabilities = rng.dirichlet(np.ones(3), rows).astype(np.float32)
  values = rng.standard_normal((rows, dimension)).astype(np.float32)
  table = outputs.predictions_table(
      [f"id{i}" for i in range(rows)], ["s"] * rows, [None] * rows,
      probabilities, ["a", "b", "c"], 2, "m", "tflite", False,
      embeddings=values)
  return table, values


def test_the_column_is_a_fixed_size_list_of_float32():
  table, values = _table()
  assert table.schema.field("embedding").type == pa.list_(pa.float32(),
                                                          DIMENSION)
  assert table.schema == outputs.predictions_schema(False, DIMENSION)
  np.testing.assert_array_equal(
      np.stack(table.column("embedding").to_pylist()), values)
  # Without embeddings the schema is as it was.
  assert "embedding" not in outputs.predictions_schema(True).names


def test_the_column_survives_pyarrow_duckdb_and_pandas(tmp_path):
  duckdb = pytest.importorskip("duckdb")
  table, values = _table(rows=50)
  path = str(tmp_path / "p.parquet")
  pq.write_table(table, path)
  # pyarrow: the same type back, the same values.
  back = pq.read_table(path)
  assert back.schema.field("embedding").type == table.schema.field(
      "embedding").type
  np.testing.assert_array_equal(
      back.column("embedding").combine_chunks().flatten().to_numpy(
      ).reshape(-1, DIMENSION), values)
  # DuckDB: FLOAT[] (a list), castable to the fixed-size FLOAT[D], whose
  # cosine is numpy's.
  connection = duckdb.connect()
  kind, cosine = connection.execute(
      f"SELECT typeof(embedding), array_cosine_similarity("
      f"embedding::FLOAT[{DIMENSION}], (SELECT embedding::FLOAT[{DIMENSION}] "
      f"FROM read_parquet(?) WHERE id = 'id0')) FROM read_parquet(?) "
      f"WHERE id = 'id1'", [path, path]).fetchone()
  assert kind == "FLOAT[]"
  expected = values[0] @ values[1] / (np.linalg.norm(values[0]) *
                                      np.linalg.norm(values[1]))
  assert abs(cosine - expected) < 1e-6
  fetched = connection.execute(
      f"SELECT embedding::FLOAT[{DIMENSION}] FROM read_parquet(?) ORDER BY id",
      [path]).fetchall()
  order = np.argsort([f"id{i}" for i in range(50)])
  np.testing.assert_array_equal(
      np.array([row[0] for row in fetched], np.float32), values[order])
  # pandas: a column of float32 arrays; written back with the schema, the
  # fixed size holds.
  frame = pq.read_table(path).to_pandas()
  np.testing.assert_array_equal(np.stack(frame["embedding"].to_numpy()),
                                values)
  again = pa.Table.from_pandas(frame, schema=table.schema,
                               preserve_index=False)
  pq.write_table(again, str(tmp_path / "again.parquet"))
  assert pq.read_schema(str(tmp_path / "again.parquet")).field(
      "embedding").type == pa.list_(pa.float32(), DIMENSION)


@pytest.mark.parametrize("embedding", [
    {"column": "embedding", "dimension": "1280"},
    {"dimension": 1280, "layer": 7},
    [1280],
])
def test_a_manifest_whose_embedding_is_mistyped_is_damaged(tmp_path,
                                                           embedding):
  """Readers rely on the manifest's `embedding` as predict writes it (an
  object with an integer D, or null); anything else is one ManifestError."""
  manifest = {"manifest_version": 3, "run_id": "r", "embedding": None}
  outputs.write_manifest(str(tmp_path), manifest)
  assert outputs.read_manifest(str(tmp_path))["embedding"] is None
  outputs.write_manifest(str(tmp_path), dict(manifest, embedding=embedding))
  with pytest.raises(outputs.ManifestError, match="field embedding"):
    outputs.read_manifest(str(tmp_path))


def test_bigquery_gets_a_repeated_float():
  schema = outputs.bigquery_schema(outputs.predictions_schema(False, 3))
  assert schema["fields"][-1] == {"name": "embedding", "type": "FLOAT",
                                  "mode": "REPEATED"}


@pytest.mark.slow
def test_each_row_holds_the_engines_embedding_of_its_image(
    tmp_path, tiny_model, png_dir, sample):
  card = card_lib.load_card(tiny_model)
  by_id = dict(zip(png_ids(png_dir, sample), sample.test.images))
  for engine in ("tflite", "keras"):
    run = run_predict(tmp_path / engine, input=png_dir, model=tiny_model,
                      engine=engine, write_embeddings=True)
    assert run.manifest["embedding"] == {
        "column": "embedding", "dimension": 128,
        "type": "fixed_size_list<item: float>[128]",
        "duckdb_cast": "embedding::FLOAT[128]",
        "layer": card.embedding["layer"],
        "chosen": card.embedding["chosen"]}
    shard = os.path.join(run.output, run.manifest["files"]["predictions"][0][
        "name"])
    assert os.path.dirname(shard) == os.path.join(run.output, "predictions")
    assert pq.read_schema(shard).field("embedding").type == pa.list_(
        pa.float32(), 128)
    ids = [row["id"] for row in run.predictions]
    values = np.array([row["embedding"] for row in run.predictions],
                      np.float32)
    expected = engines.load_engine(tiny_model, engine
                                   ).probabilities_and_embeddings(
                                       np.stack([by_id[i] for i in ids]))[1]
    np.testing.assert_array_equal(values, expected)


def _keras_only_without_embedding(tiny_model, folder):
  """The tiny model as an older model.train wrote it: model.keras and a
  card without an embedding."""
  os.makedirs(folder)
  shutil.copy(os.path.join(tiny_model, card_lib.MODEL_FILE), folder)
  card = card_lib.load_card(tiny_model)
  card.embedding, card.engines = {}, ["keras"]
  card.model_id = card_lib.compute_model_id(
      card, *card_lib.model_payloads(folder, card))
  with open(os.path.join(folder, card_lib.CARD_FILE), "w") as handle:
    handle.write(card.to_json())
  return folder


def test_a_folder_without_an_embedding_is_refused_in_one_line(
    tmp_path, tiny_model, png_dir, capsys):
  model = _keras_only_without_embedding(tiny_model, str(tmp_path / "old"))
  code = predict.main(["--input", png_dir, "--model", model, "--output",
                       str(tmp_path / "out"), "--write_embeddings"])
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1
  assert err[0].startswith(f"beam_jobs.predict: error: --write_embeddings: "
                           f"{model} has no embedding output (its card "
                           "records none); to add one, adopt its model.keras")
  assert "--embedding_layer NAME" in err[0]
  assert not os.path.exists(tmp_path / "out" / outputs.MANIFEST_FILE)


def test_auto_picks_the_fastest_engine_that_serves_the_embedding(tiny_model):
  card = card_lib.load_card(tiny_model)
  config = config_lib.PredictConfig(input="x", model=tiny_model, output="o",
                                    write_embeddings=True)
  assert preflight.auto_engine(config, card) == "tflite"
  del card.embedding["engines"]["tflite"]
  assert preflight.auto_engine(config, card) == "keras"
  with pytest.raises(config_lib.ConfigError,
                     match="the tflite engine .* serves no embedding; pass "
                     "--engine keras"):
    preflight.check_embeddings(
        config_lib.PredictConfig(input="x", model=tiny_model, output="o",
                                 engine="tflite", write_embeddings=True),
        card)
