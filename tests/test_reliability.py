"""Bad models, bad configuration and bad input: refused early or accounted."""

import json
import os
import shutil

import numpy as np
import pytest

from beam_jobs import config as config_lib
from beam_jobs import preflight
from beam_jobs import predict
from model import card as card_lib
from model import engines
from model import export


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


def test_output_of_another_model_needs_overwrite(tmp_path, tiny_model,
                                                 png_dir):
  output = tmp_path / "out"
  output.mkdir()
  (output / "_run.json").write_text(json.dumps({"model_id": "someoneelse"}))
  config = config_lib.PredictConfig(png_dir, tiny_model, str(output))
  with pytest.raises(config_lib.ConfigError, match="--overwrite"):
    preflight.check(config)
  config = config_lib.PredictConfig(png_dir, tiny_model, str(output),
                                    overwrite=True)
  assert preflight.check(config).card.model_id == card_lib.load_card(tiny_model).model_id


def _save(image, fmt, **kwargs) -> bytes:
  import io  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
  """A PNG whose header declares width x height, with no pixel data."""
  import struct  # pylint: disable=import-outside-toplevel
  import zlib  # pylint: disable=import-outside-toplevel

  def chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body +
            struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
          chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def unusual_images() -> dict:
  """Valid images in awkward forms: each must be classified."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(5)
  rgb = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 6
  frames = [Image.new("L", (28, 28), v) for v in (30, 200)]
  animated = _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
  palette_alpha = rgb.convert("P")
  palette_alpha.info["transparency"] = 0
  return {
      "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
      "sixteen_bit.png": _save(Image.fromarray(
          rng.integers(0, 65535, (28, 28), dtype=np.uint16)), "PNG"),
      "palette.png": _save(rgb.convert("P"), "PNG"),
      "palette_alpha.png": _save(palette_alpha, "PNG"),
      "rgba.png": _save(rgb.convert("RGBA"), "PNG"),
      "grey_alpha.png": _save(rgb.convert("LA"), "PNG"),
      "animated.gif": animated,
      "one_pixel.png": _save(Image.new("L", (1, 1), 128), "PNG"),
      "exif_rotated.jpg": _save(rgb, "JPEG", exif=exif),
      "bitmap.bmp": _save(rgb, "BMP"),
      "photo.webp": _save(rgb, "WEBP"),
      "scan.tiff": _save(rgb, "TIFF"),
  }


def broken_files(sample) -> dict:
  """Files that are not images a model can see: each must be an error row."""
  from model import preprocessing  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  png = preprocessing.encode_png(sample.test.images[0])
  jpeg = _save(Image.fromarray(sample.test.images[0][..., 0]), "JPEG")
  return {
      "zero_bytes.png": b"",
      "truncated.png": png[:len(png) // 2],
      "truncated.jpg": jpeg[:len(jpeg) // 2],
      "not_an_image.jpg": b"Just some text that pretends to be a JPEG.\n",
      ".DS_Store": b"\x00\x00\x00\x01Bud1\x00\x00\x10\x00",
      "notes.txt": b"shot list, not a photo",
      "bomb.png": _png_header_only(100_000, 100_000),
  }


def test_bad_and_unusual_images_in_one_run(tmp_path, tiny_model, sample):
  from model import datasets  # pylint: disable=import-outside-toplevel
  from tests.conftest import read_parquet_rows  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "pile"
  good = datasets.Split(sample.test.images[:20], sample.test.labels[:20])
  datasets.write_png_folder(good, sample.class_names, str(folder))
  unusual, broken = unusual_images(), broken_files(sample)
  for name, data in {**unusual, **broken}.items():
    (folder / "Bag" / name).write_bytes(data)
  # A real 200x200 image over a tight pixel limit is refused as well.
  from PIL import Image  # pylint: disable=import-outside-toplevel
  (folder / "Coat" / "large.png").write_bytes(
      _save(Image.new("L", (200, 200), 90), "PNG"))

  config = config_lib.PredictConfig(str(folder), tiny_model,
                                    str(tmp_path / "out"), batch_size=64,
                                    max_image_pixels=150 * 150)
  manifest = predict.run(config, ["--runner", "DirectRunner"])
  rows = read_parquet_rows(os.path.join(config.output, "predictions-*.parquet"))
  errors = read_parquet_rows(os.path.join(config.output, "errors-*.parquet"))

  predicted = {os.path.basename(r["id"]) for r in rows}
  failed = {os.path.basename(e["id"]): e for e in errors}
  assert set(unusual) <= predicted, set(unusual) - predicted
  assert set(failed) == set(broken) | {"large.png"}
  assert len(rows) == 20 + len(unusual)
  for name in ("bomb.png", "large.png"):
    assert "DecompressionBombError" in failed[name]["error"]
    assert "exceeds the limit" in failed[name]["error"]
  assert "zero bytes" in failed["zero_bytes.png"]["error"]
  assert all(e["stage"] == "decode" and e["source"] == e["id"]
             for e in errors)
  counts = manifest["counts"]
  assert counts["inputs"] == counts["predictions"] + counts["errors"]
  assert counts["inputs"] == 20 + len(unusual) + len(broken) + 1


@pytest.mark.slow
def test_bad_parquet_rows_and_shards(tmp_path, tiny_model, sample):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from model import preprocessing  # pylint: disable=import-outside-toplevel
  from tests.conftest import read_parquet_rows  # pylint: disable=import-outside-toplevel
  shards = tmp_path / "shards"
  shards.mkdir()
  pngs = [preprocessing.encode_png(x) for x in sample.test.images[:6]]
  pq.write_table(pa.table({
      "id": ["e0", "e1", "null", "empty", "e4", "e5"],
      "image": [pngs[0], pngs[1], None, b"", pngs[4], pngs[5]],
  }), shards / "encoded.parquet")
  (shards / "broken.parquet").write_bytes(b"PAR1 not really parquet")
  raw = [list(x.ravel()) for x in sample.test.images[:3]]
  raw[1] = raw[1][:100]
  pq.write_table(pa.table({
      "id": ["r0", "short", "r2"],
      "image": pa.array(raw, pa.list_(pa.uint8())),
  }), tmp_path / "raw.parquet")

  for pattern, expected_errors, expected_predictions in (
      (str(shards / "*.parquet"),
       {"null": "null image cell", "empty": "zero bytes",
        str(shards / "broken.parquet"): "Parquet"}, 4),
      (str(tmp_path / "raw.parquet"), {"short": "length 100"}, 2)):
    output = tmp_path / f"out_{len(expected_errors)}"
    manifest = predict.run(config_lib.PredictConfig(
        pattern, tiny_model, str(output)), ["--runner", "DirectRunner"])
    rows = read_parquet_rows(str(output / "predictions-*.parquet"))
    errors = {e["id"]: e for e in read_parquet_rows(
        str(output / "errors-*.parquet"))}
    assert len(rows) == expected_predictions
    assert set(errors) == set(expected_errors)
    for error_id, fragment in expected_errors.items():
      assert fragment in errors[error_id]["error"], errors[error_id]
    counts = manifest["counts"]
    assert counts["inputs"] == counts["predictions"] + counts["errors"]


def _predict_cli(args, kill_at=None):
  """Runs the predict CLI; `kill_at` (TARGET, CALLS) kills it with SIGKILL
  at the CALLS-th call of TARGET (tests/kill_at.py)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from tests.conftest import REPO  # pylint: disable=import-outside-toplevel
  entry = (["-m", "beam_jobs.predict"] if kill_at is None else
           [os.path.join(REPO, "tests", "kill_at.py"), kill_at[0],
            str(kill_at[1]), "--"])
  return subprocess.run([sys.executable, *entry, *args], capture_output=True,
                        text=True, cwd=REPO, check=False,
                        env=dict(os.environ, PYTHONPATH=REPO))


@pytest.mark.slow
def test_crash_mid_run_leaves_nothing_and_a_rerun_completes(tmp_path, png_dir,
                                                            tiny_model):
  import signal  # pylint: disable=import-outside-toplevel
  from tests.conftest import read_parquet_rows  # pylint: disable=import-outside-toplevel
  output = tmp_path / "out"
  args = ["--input", png_dir, "--model", tiny_model, "--output", str(output),
          "--batch_size", "16"]
  # Killed as its fourth batch reaches FormatPredictions, mid-run.
  crashed = _predict_cli(
      args, kill_at=("beam_jobs.outputs:FormatPredictions.process", 4))
  assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
  visible = sorted(p.name for p in output.iterdir() if
                   not p.name.startswith("beam-temp-"))
  # No shard, no manifest: nothing half-written. The killed run's lock
  # stays, naming its run for the run that takes it over.
  assert visible == ["_run.lock"]
  # The killed run did write staging files, out of sight.
  assert any(p.name.startswith("beam-temp-") for p in output.iterdir())

  again = _predict_cli(args)
  assert again.returncode == 0, again.stderr[-2000:]
  rows = read_parquet_rows(str(output / "predictions-*.parquet"))
  ids = [r["id"] for r in rows]
  assert len(ids) == 200 and len(set(ids)) == 200
  assert not any(p.name.startswith("beam-temp-") for p in output.iterdir())
  assert not (output / "_run.lock").exists()


@pytest.mark.slow
def test_skip_existing_classifies_only_new_images(tmp_path, tiny_model,
                                                  sample):
  from model import datasets  # pylint: disable=import-outside-toplevel
  from tests.conftest import read_parquet_rows  # pylint: disable=import-outside-toplevel
  pile, output = tmp_path / "pile", tmp_path / "out"
  first = datasets.Split(sample.test.images[:60], sample.test.labels[:60])
  datasets.write_png_folder(first, sample.class_names, str(pile))
  config = dict(input=str(pile), model=tiny_model, output=str(output))
  before = predict.run(config_lib.PredictConfig(**config),
                       ["--runner", "DirectRunner"])
  assert before["counts"]["predictions"] == 60

  # The pile grows; its new files get names the first run never saw.
  more = datasets.Split(sample.test.images[60:100], sample.test.labels[60:100])
  datasets.write_png_folder(more, sample.class_names, str(tmp_path / "more"))
  for path in (tmp_path / "more").glob("*/*.png"):
    target = pile / path.parent.name / f"new_{path.name}"
    shutil.move(path, target)
  after = predict.run(config_lib.PredictConfig(**config, skip_existing=True),
                      ["--runner", "DirectRunner"])
  assert after["counts"]["skipped"] == 60
  assert after["counts"]["inputs"] == 40
  assert after["counts"]["predictions"] == 40 and after["accounted"]
  new_shards = [p for p in output.glob("predictions-*.parquet")
                if after["run_id"] in p.name]
  new_ids = {r["id"] for p in new_shards for r in read_parquet_rows(str(p))}
  assert all(os.path.basename(i).startswith("new_") for i in new_ids)
  rows = read_parquet_rows(str(output / "predictions-*.parquet"))
  ids = [r["id"] for r in rows]
  assert len(ids) == 100 and len(set(ids)) == 100
  assert set(ids) == {str(p) for p in pile.glob("*/*.png")}


@pytest.mark.slow
def test_skip_existing_on_parquet(tmp_path, tiny_model, png_dir):
  from tools import make_shards  # pylint: disable=import-outside-toplevel
  from tests.conftest import read_parquet_rows  # pylint: disable=import-outside-toplevel
  shards = tmp_path / "shards"
  make_shards.make_shards(png_dir, str(shards), rows_per_shard=80)
  paths = sorted(shards.glob("*.parquet"))
  output = str(tmp_path / "out")
  predict.run(config_lib.PredictConfig(str(paths[0]), tiny_model, output),
              ["--runner", "DirectRunner"])
  after = predict.run(config_lib.PredictConfig(
      str(shards / "*.parquet"), tiny_model, output, skip_existing=True),
                      ["--runner", "DirectRunner"])
  assert after["counts"]["skipped"] == 80
  assert after["counts"]["predictions"] == 120
  ids = [r["id"] for r in read_parquet_rows(output + "/predictions-*.parquet")]
  assert len(ids) == 200 and len(set(ids)) == 200


def test_ids_never_write_outside_the_output(tmp_path, tiny_model, sample):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from model import preprocessing  # pylint: disable=import-outside-toplevel
  work = tmp_path / "work"
  work.mkdir()
  hostile = ["../../escape.parquet", "/tmp/absolute_escape", "a/../../b",
             "predictions-evil.parquet", "gs://bucket/x"]
  pq.write_table(pa.table({
      "id": hostile,
      "image": [preprocessing.encode_png(x) for x in sample.test.images[:5]],
      "label": ["../" * 3 + "etc"] * 5,
  }), work / "input.parquet")
  before = {str(p) for p in tmp_path.rglob("*")}
  output = work / "out"
  manifest = predict.run(config_lib.PredictConfig(
      str(work / "input.parquet"), tiny_model, str(output),
      label_column="label"), ["--runner", "DirectRunner"])
  assert manifest["counts"]["predictions"] == 5
  created = {str(p) for p in tmp_path.rglob("*")} - before
  assert created and all(p.startswith(str(output)) for p in created)
  assert not os.path.exists("/tmp/absolute_escape")
