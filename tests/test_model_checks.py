"""Hostile model files: sizes are checked as a file declares them before
anything is read or parsed, at adoption and when a folder is served
(preflight), and every refusal is one line (model/model_checks.py)."""

import io
import json
import os
import struct
import zipfile

import numpy as np
import pytest

pytest.importorskip("tensorflow")  # The sources are made with Keras.
# pylint: disable=wrong-import-position

from beam_jobs import config as config_lib
from beam_jobs import preflight
from model import adopt
from model import card as card_lib
from model import model_checks

CLASSES = ["a", "b"]


def _keras_model():
  import keras  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(0)
  return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                           keras.layers.Dense(2)])


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("keras") / "small.keras")
  _keras_model().save(path)
  return path


def _rezip(source, target, replace=None, extra=None):
  """A copy of the .keras zip `source` with members replaced or added,
  deflated (as a zip tool would write them)."""
  with zipfile.ZipFile(source) as archive:
    members = {name: archive.read(name) for name in archive.namelist()}
  members.update(replace or {})
  with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
    for name, data in members.items():
      archive.writestr(name, data)
    for name, data in (extra or {}).items():
      archive.writestr(name, data)
  return str(target)


def _declare_size(path, member, size):
  """Rewrites the uncompressed size the central directory declares for
  `member`, as a hand-made zip bomb does."""
  data = bytearray(open(path, "rb").read())
  name = member.encode()
  at = data.find(b"PK\x01\x02")
  while at >= 0:
    name_length = struct.unpack("<H", data[at + 28:at + 30])[0]
    if data[at + 46:at + 46 + name_length] == name:
      data[at + 24:at + 28] = struct.pack("<I", size)
    at = data.find(b"PK\x01\x02", at + 4)
  open(path, "wb").write(bytes(data))


def _refused(capsys, source, out, *flags) -> str:
  code = adopt.main([source, "--output", str(out), "--class_names",
                     ",".join(CLASSES), "--input_scale", "unit", *flags])
  lines = capsys.readouterr().err.splitlines()
  assert code == 2, lines
  assert len(lines) == 1 and lines[0].startswith("model.adopt: error: "), (
      lines)
  assert not os.path.exists(os.path.join(str(out), card_lib.CARD_FILE))
  return lines[0]


def test_keras_zip_bombs_are_refused_before_they_are_read(tmp_path, capsys,
                                                          keras_file):
  """Fails on the code before the fix: the first two were adopted (their
  config and weights read whole), the deep config raised RecursionError."""
  with zipfile.ZipFile(keras_file) as archive:
    config = archive.read("config.json")
  # config.json padded to 20 MB of spaces: 20 kB deflated, still JSON.
  padded = _rezip(keras_file, tmp_path / "padded.keras", replace={
      "config.json": config + b" " * (20 << 20)})
  assert os.path.getsize(padded) < 200_000
  message = _refused(capsys, padded, tmp_path / "out")
  assert (f"config.json inflates to {len(config) + (20 << 20):,} bytes, "
          "above the limit of 16,777,216 bytes") in message
  # A member inflating a thousand times.
  bomb = _rezip(keras_file, tmp_path / "bomb.keras",
                extra={"assets/zeros.bin": bytes(64 << 20)})
  message = _refused(capsys, bomb, tmp_path / "out")
  assert "'assets/zeros.bin' inflates" in message and "zip bomb" in message
  # A weights member declared at 3 GB.
  declared = _rezip(keras_file, tmp_path / "declared.keras")
  _declare_size(declared, "model.weights.h5", 3_000_000_000)
  assert "inflates" in _refused(capsys, declared, tmp_path / "out")
  # A config nested 100,000 deep.
  deep = _rezip(keras_file, tmp_path / "deep.keras", replace={
      "config.json": b"[" * 100_000 + b"]" * 100_000})
  assert "nests deeper than 64 levels" in _refused(capsys, deep,
                                                   tmp_path / "out")


def test_hostile_h5_tflite_and_savedmodel_files_are_one_line(
    tmp_path, capsys, keras_file, monkeypatch):
  """Fails on the code before the fix: the padded .h5 and the gzip bomb
  were read whole and adopted, and no limit held the SavedModel's graph."""
  import h5py  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  model = _keras_model()
  model.save(tmp_path / "model.h5")
  padded = str(tmp_path / "padded.h5")
  with h5py.File(tmp_path / "model.h5", "r") as original, h5py.File(
      padded, "w") as copy:
    for name in original:
      original.copy(name, copy)
    for key, value in original.attrs.items():
      copy.attrs[key] = value
    copy.attrs["model_config"] = original.attrs["model_config"] + " " * (
        40 << 20)
  assert "besides its weights" in _refused(capsys, padded, tmp_path / "out")
  bomb = str(tmp_path / "bomb.h5")
  with h5py.File(tmp_path / "model.h5", "r") as original, h5py.File(
      bomb, "w") as copy:
    for name in original:
      original.copy(name, copy)
    for key, value in original.attrs.items():
      copy.attrs[key] = value
    copy.create_dataset("model_weights/extra", data=np.zeros(16 << 20),
                        compression="gzip", chunks=(1 << 20,))
  assert os.path.getsize(bomb) < 2 << 20
  assert "'model_weights/extra' inflates" in _refused(capsys, bomb,
                                                      tmp_path / "out")
  # A .tflite that is not a flatbuffer.
  garbage = tmp_path / "garbage.tflite"
  garbage.write_bytes(b"\0\0\0\0TFL3" + np.random.default_rng(0).bytes(4000))
  assert "cannot load" in _refused(capsys, str(garbage), tmp_path / "out")
  # A SavedModel whose graph is above the limit (lowered here).
  model.export(str(tmp_path / "exported"), verbose=False)
  monkeypatch.setattr(model_checks, "MAX_SAVED_MODEL_PB_BYTES", 1000)
  assert "graph is" in _refused(capsys, str(tmp_path / "exported"),
                                tmp_path / "out")
  del tf


def test_an_input_too_large_to_probe_is_refused(tmp_path, capsys):
  """Fails on the code before the fix: 512 check images of 3000x6000 were
  allocated (36 GB)."""
  import keras  # pylint: disable=import-outside-toplevel
  inputs = keras.Input((3000, 6000, 1))
  pooled = keras.layers.GlobalAveragePooling2D()(inputs)
  keras.Model(inputs, keras.layers.Dense(2)(pooled)).save(
      tmp_path / "huge.keras")
  assert "above the limit of 16,777,216 pixels" in _refused(
      capsys, str(tmp_path / "huge.keras"), tmp_path / "out")


def _served_folder(tmp_path, keras_file) -> str:
  """A folder adopted from `keras_file`, served with the keras engine."""
  folder = str(tmp_path / "model")
  adopt.adopt(keras_file, folder, CLASSES, input_scale="unit",
              say=lambda _: None, warn=lambda _: None)
  return folder


def _replace_model(folder, name, data):
  """Swaps a model file, with the card's model id made to match, as a
  hostile folder would be made."""
  with open(os.path.join(folder, name), "wb") as handle:
    handle.write(data)
  card = card_lib.load_card(folder)
  card.model_id = card_lib.compute_model_id(
      card, *card_lib.model_payloads(folder, card))
  with open(os.path.join(folder, card_lib.CARD_FILE), "w") as handle:
    handle.write(card.to_json())


def test_a_served_folder_with_a_zip_bomb_is_refused_before_any_work(
    tmp_path, keras_file, png_dir):
  """Fails on the code before the fix: preflight read the 20 MB config
  whole and accepted it; the deep card raised RecursionError."""
  folder = _served_folder(tmp_path, keras_file)
  with zipfile.ZipFile(os.path.join(folder, card_lib.MODEL_FILE)) as archive:
    config = archive.read("config.json")
  buffer = io.BytesIO()
  _rezip(os.path.join(folder, card_lib.MODEL_FILE), buffer, replace={
      "config.json": config + b" " * (20 << 20)})
  _replace_model(folder, card_lib.MODEL_FILE, buffer.getvalue())
  for engine in ("keras", "auto"):
    with pytest.raises(config_lib.ConfigError) as raised:
      preflight.check(config_lib.PredictConfig(
          png_dir, folder, str(tmp_path / "out"), engine=engine))
    assert f"config.json inflates to {len(config) + (20 << 20):,} bytes" in (
        str(raised.value))
    assert "\n" not in str(raised.value)
  # A card nested too deep, or with a field of the wrong type.
  card_path = os.path.join(folder, card_lib.CARD_FILE)
  for text, expected in (("[" * 100_000 + "]" * 100_000, "nests deeper"),
                         (json.dumps({"class_names": "abc"}), "missing"),
                         (json.dumps(dict(json.loads(open(card_path).read()),
                                          class_names="abc")),
                          "class_names must be a list")):
    saved = open(card_path).read()
    open(card_path, "w").write(text)
    with pytest.raises(config_lib.ConfigError, match=expected):
      preflight.check(config_lib.PredictConfig(png_dir, folder,
                                               str(tmp_path / "out")))
    open(card_path, "w").write(saved)


def test_json_depth_counts_outside_strings():
  assert model_checks.json_depth('{"a": [1, {"b": "[[[{{"}]}') == 3
  assert model_checks.json_depth("") == 0
  with pytest.raises(ValueError, match="nests deeper than 2 levels"):
    model_checks.load_config_json(b"[[[1]]]", "x", max_depth=2)
  with pytest.raises(ValueError, match="above the limit"):
    model_checks.load_config_json(b"[1]", "x", max_bytes=2)
