"""beam_jobs/preflight.py: bad configuration and unsafe or mismatched models
are refused before any work, in one line."""

import json
import os
import shutil
import time
import zipfile

import pytest

from beam_jobs import config as config_lib
from beam_jobs import preflight
from beam_jobs import predict
from model import card as card_lib
from model import engines
from model import export
from tests.helpers import DATAFLOW_ARGS
from tests.helpers import predict_cli
from tests.helpers import skip_unless_offline


# Configuration ----------------------------------------------------------------


def test_config_errors_fail_before_any_work(tmp_path, tiny_model, png_dir,
                                            sample_shards):
  with pytest.raises(config_lib.ConfigError, match="not a model folder"):
    preflight.check(config_lib.PredictConfig(png_dir, str(tmp_path),
                                             str(tmp_path / "o")))
  with pytest.raises(config_lib.ConfigError, match="matches no files"):
    preflight.check(config_lib.PredictConfig(str(tmp_path / "none"),
                                             tiny_model, str(tmp_path / "o")))
  with pytest.raises(config_lib.ConfigError, match="--label_column 'nope'"):
    preflight.check(config_lib.PredictConfig(
        os.path.join(sample_shards, "encoded", "*.parquet"), tiny_model,
        str(tmp_path / "o"), label_column="nope"))


def test_input_list_config_errors(tmp_path, lists, tiny_model, png_dir):
  folder = lists[0]
  with pytest.raises(config_lib.ConfigError, match="pass one of --input"):
    preflight.check(config_lib.PredictConfig(png_dir, tiny_model, str(tmp_path / "o"),
                             input_list=str(folder / "a.txt")))
  with pytest.raises(config_lib.ConfigError, match="--uri_column 'path'"):
    preflight.check(config_lib.PredictConfig(None, tiny_model, str(tmp_path / "o"),
                             input_list=str(folder / "b.csv"),
                             uri_column="path"))
  with pytest.raises(config_lib.ConfigError, match="text list"):
    preflight.check(config_lib.PredictConfig(None, tiny_model, str(tmp_path / "o"),
                             input_list=str(folder / "a.txt"),
                             label_column="label"))
  with pytest.raises(config_lib.ConfigError, match="matches no files"):
    preflight.check(config_lib.PredictConfig(None, tiny_model, str(tmp_path / "o"),
                             input_list=str(folder / "*.json")))


@pytest.mark.parametrize("flag, value", [
    ("--model", "http://example.com/model"),
    ("--model", "file:///tmp/model"),
    ("--input", "https://example.com/images/"),
    ("--output", "https://example.com/out"),
    ("--output", "s3://bucket/out"),
])
def test_url_paths_are_one_line_exit_2(tmp_path, tiny_model, png_dir, capsys,
                                       flag, value):
  args = {"--input": png_dir, "--model": tiny_model,
          "--output": str(tmp_path / "out")}
  args[flag] = value
  code = predict.main([part for pair in args.items() for part in pair])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and value in err


# Models -----------------------------------------------------------------------


def _lambda_model_folder(tmp_path, tiny_model):
  """A model folder whose Keras model carries a Lambda layer."""
  import keras  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel
  inputs = keras.Input((28, 28, 1))
  x = layers.Lambda(lambda t: t / 255.0)(inputs)
  outputs = layers.Dense(10)(layers.Flatten()(x))
  model = keras.Model(inputs, outputs)
  folder = tmp_path / "lambda_model"
  folder.mkdir()
  model.save(folder / card_lib.MODEL_FILE)
  tflite = export.convert_to_tflite(model)
  (folder / card_lib.TFLITE_FILE).write_bytes(tflite)
  card = card_lib.load_card(tiny_model)
  card.model_id = card_lib.compute_model_id(
      card, (folder / card_lib.MODEL_FILE).read_bytes(), tflite)
  (folder / card_lib.CARD_FILE).write_text(card.to_json())
  return str(folder)


def test_lambda_model_is_refused_before_any_work(tmp_path, tiny_model,
                                                 png_dir):
  folder = _lambda_model_folder(tmp_path, tiny_model)
  config = config_lib.PredictConfig(png_dir, folder, str(tmp_path / "out"))
  with pytest.raises(config_lib.ConfigError, match="Lambda layer"):
    preflight.check(config)
  # Keras itself refuses it too, should anything load it directly.
  with pytest.raises(ValueError, match="safe_mode|Lambda"):
    engines.load_engine(folder, "keras")
  assert not os.path.exists(tmp_path / "out")


def test_card_that_does_not_match_the_model_is_refused(tmp_path, tiny_model,
                                                      png_dir):
  folder = tmp_path / "swapped"
  shutil.copytree(tiny_model, folder)
  card = json.loads((folder / card_lib.CARD_FILE).read_text())
  card["model_id"] = "0123456789abcdef"
  (folder / card_lib.CARD_FILE).write_text(json.dumps(card))
  config = config_lib.PredictConfig(png_dir, str(folder), str(tmp_path / "o"))
  with pytest.raises(config_lib.ConfigError, match="does not describe"):
    preflight.check(config)


@pytest.mark.parametrize("edit", ["reverse class names", "rename a class",
                                  "change the feeding recipe"])
def test_model_id_covers_the_cards_serving_fields(tmp_path, tiny_model,
                                                  png_dir, edit):
  """A card edited after export (same model files) is refused: served under
  the old id, its labels would mix with the right ones."""
  folder = tmp_path / "edited"
  shutil.copytree(tiny_model, folder)
  card = json.loads((folder / card_lib.CARD_FILE).read_text())
  if edit == "reverse class names":
    card["class_names"] = card["class_names"][::-1]
  elif edit == "rename a class":
    card["class_names"][0] = "Something else"
  else:
    card["preprocessing"]["input_value_range"] = [0, 1]
  (folder / card_lib.CARD_FILE).write_text(json.dumps(card))
  config = config_lib.PredictConfig(png_dir, str(folder), str(tmp_path / "o"))
  with pytest.raises(config_lib.ConfigError, match="does not describe"):
    preflight.check(config)


def _edited_model(tmp_path, tiny_model, edit_config=None, edit_card=None):
  """A copy of the model folder with its Keras config or card edited and
  the model id recomputed, as an attacker who knows the hash would."""
  folder = tmp_path / "edited"
  shutil.copytree(tiny_model, folder)
  keras_path = folder / card_lib.MODEL_FILE
  if edit_config:
    with zipfile.ZipFile(keras_path) as archive:
      members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    edit_config(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(keras_path, "w") as archive:
      for name, data in members.items():
        archive.writestr(name, data)
  card = card_lib.load_card(str(folder))
  if edit_card:
    edit_card(card)
  card.model_id = card_lib.compute_model_id(
      card, keras_path.read_bytes(),
      (folder / card_lib.TFLITE_FILE).read_bytes())
  (folder / card_lib.CARD_FILE).write_text(card.to_json())
  return str(folder)


def _first_layer(config) -> dict:
  return config["config"]["layers"][1]


@pytest.mark.parametrize("spelling", [
    {"class_name": "layers.Lambda"},
    {"class_name": "keras.layers.Lambda"},
    {"class_name": "Lambda", "module": "keras.layers"},
    {"registered_name": "my_package>Lambda"},
    {"class_name": "__lambda__"},
    {"module": "os"},
])
def test_code_carrying_layers_are_refused_however_spelled(
    tmp_path, tiny_model, png_dir, spelling):
  folder = _edited_model(tmp_path, tiny_model,
                         edit_config=lambda c: _first_layer(c).update(spelling))
  config = config_lib.PredictConfig(png_dir, folder, str(tmp_path / "out"))
  with pytest.raises(config_lib.ConfigError, match="refused"):
    preflight.check(config)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda card: card.class_names.pop(), "outputs 10 classes"),
    (lambda card: card.class_names.append("Extra"), "outputs 10 classes"),
    (lambda card: card.input_shape.__setitem__(0, 32), "input of shape"),
])
def test_card_and_model_that_disagree_are_refused(tmp_path, tiny_model,
                                                 png_dir, edit, message):
  folder = _edited_model(tmp_path, tiny_model, edit_card=edit)
  config = config_lib.PredictConfig(png_dir, folder, str(tmp_path / "out"))
  with pytest.raises(config_lib.ConfigError, match=message):
    preflight.check(config)
  assert not (tmp_path / "out").exists()


# Remote paths without a network -----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("flag, dry_run", [
    ("--model", False), ("--model", True), ("--output", False),
    ("--input", False), ("--input_list", False)])
def test_an_unreachable_gcs_path_fails_fast_in_one_line(tmp_path, tiny_model,
                                                        png_dir, flag,
                                                        dry_run):
  """Fails on the code before the fix: with no network, Google's client
  retried for two minutes, then the command printed a traceback."""
  skip_unless_offline()
  args = {"--input": png_dir, "--model": tiny_model,
          "--output": str(tmp_path / "out")}
  if flag == "--input_list":
    del args["--input"]
  args[flag] = "gs://no-such-bucket/path/x.csv"
  argv = [part for pair in args.items() for part in pair]
  if dry_run:
    # Dataflow's workers read the input and write the output; the
    # launcher reads the model's card alone.
    argv = ["--input", "gs://bucket/images/", "--output", "gs://bucket/out",
            "--model", args["--model"]] + DATAFLOW_ARGS
  started = time.monotonic()
  result = predict_cli(argv, timeout=90)
  assert time.monotonic() - started < 60
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
  assert f"{flag} gs://no-such-bucket" in result.stderr
  assert "cannot reach Cloud Storage" in result.stderr
