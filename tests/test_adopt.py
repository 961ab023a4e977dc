"""Bring your own model: models made the way their authors make them, adopted
with model.adopt and served by the pipeline, must give the labels and
confidences the author's own predict gives on the same images."""

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystem import MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem
from PIL import Image

# Without the tensorflow extra these tests skip.
pytest.importorskip("tensorflow")
# pylint: disable=wrong-import-position

from beam_jobs import config as config_lib
from beam_jobs import predict
from beam_jobs import preflight
from benchmarks import tutorials
from model import adopt
from model import adopt_flags
from model import card as card_lib
from model import model_checks
from model import datasets
from model import engines
from model import keras_decoding
from model import model_formats
from model import preprocessing
from tests.helpers import DATAFLOW_ARGS
from tests.helpers import REPO
from tests.helpers import SLIM_PYTHON
from tests.helpers import needs_the_gcp_extra
from tests.helpers import predict_cli
from tests.helpers import png_ids
from tests.helpers import read_parquet_rows
from tests.helpers import run_predict

FASHION = datasets.FASHION_MNIST_CLASSES


def _softmax(logits):
  return engines.softmax(np.asarray(logits, np.float64))


class Author:
  """The TensorFlow Fashion-MNIST tutorial, as its reader runs it: pixels
  divided by 255 outside the model, a (28, 28) input, logits out."""

  def __init__(self, root, sample):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    train_images = sample.train.images[..., 0]
    self.test_images = sample.test.images[..., 0]
    model = tutorials.fashion_mlp(train_images, sample.train.labels, epochs=3)
    self.model = model
    self.logits = model.predict(self.test_images / 255.0, verbose=0)
    self.files = {}
    self.files["keras"] = str(root / "my.keras")
    model.save(self.files["keras"])
    self.files["h5"] = str(root / "my.h5")
    model.save(self.files["h5"])
    self.files["export"] = str(root / "exported")
    model.export(self.files["export"], verbose=False)
    self.files["tf_saved_model"] = str(root / "tf_saved")
    tf.saved_model.save(model, self.files["tf_saved_model"])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    self.files["tflite"] = str(root / "model.tflite")
    (root / "model.tflite").write_bytes(converter.convert())
    self.files["int8"] = str(root / "model_int8.tflite")
    (root / "model_int8.tflite").write_bytes(
        tutorials.int8_tflite(model, train_images[:100]))

  def tflite_logits(self, kind):
    """What the author's own interpreter loop gives (TF's TFLite guide)."""
    return tutorials.interpreter_logits(
        self.files[kind], (self.test_images / 255.0).astype(np.float32))


@pytest.fixture(scope="module")
def author(tmp_path_factory, sample):
  return Author(tmp_path_factory.mktemp("author"), sample)


def _adopt(source, out, names=FASHION, **flags):
  said, warned = [], []
  card = adopt.adopt(source, str(out), names, say=said.append,
                     warn=warned.append, **flags)
  return card, said, warned


def _assert_same_as_author(rows, ids, logits, exact=True):
  probabilities = _softmax(logits)
  labels = [rows[i]["label"] for i in ids]
  expected = [FASHION[k] for k in probabilities.argmax(1)]
  agreement = np.mean([a == b for a, b in zip(labels, expected)])
  if exact:
    assert agreement == 1.0
    confidences = np.array([rows[i]["confidence"] for i in ids])
    np.testing.assert_allclose(confidences, probabilities.max(1), atol=1e-5)
  return agreement


@pytest.mark.parametrize("kind", [
    "keras", "tflite",
    pytest.param("h5", marks=pytest.mark.slow),
    pytest.param("export", marks=pytest.mark.slow),
    pytest.param("tf_saved_model", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_float_models_serve_exactly_as_their_author_predicts(
    tmp_path, author, png_dir, sample, kind):
  card, said, _ = _adopt(author.files[kind], tmp_path / "model",
                         input_scale="unit")
  assert card.input_shape == [28, 28, 1] and card.color_mode == "grayscale"
  assert card.output == "logits" and card.decoder == "tensorflow"
  assert card.adopted["format"] == {"export": "savedmodel",
                                    "tf_saved_model": "savedmodel"}.get(
                                        kind, kind)
  expected_engines = {"keras": ["keras", "tflite"], "h5": ["keras", "tflite"],
                      "tflite": ["tflite"]}.get(kind,
                                                ["savedmodel", "tflite"])
  # Every conversion is checked against the source: even the SavedModel that
  # from_saved_model would turn into a NaN model serves a TFLite that agrees.
  assert card.engines == expected_engines, said
  assert card.default_engine == "tflite"
  run = run_predict(tmp_path / "out", input=png_dir,
                    model=str(tmp_path / "model"))
  rows = run.predictions_by_id
  assert run.manifest["counts"]["predictions"] == 200
  assert {row["engine"] for row in rows.values()} == {"tflite"}
  _assert_same_as_author(rows, png_ids(png_dir, sample), author.logits)
  # The source's own engine serves the same labels.
  source_engine = card.engines[0]
  probabilities = engines.load_engine(
      str(tmp_path / "model"), source_engine).probabilities(
          sample.test.images)
  np.testing.assert_array_equal(probabilities.argmax(1),
                                _softmax(author.logits).argmax(1))


@pytest.mark.slow
def test_int8_model_quantises_its_input_and_dequantises_its_output(
    tmp_path, author, png_dir, sample):
  # No --input_scale: the int8 input's quantisation range (0..1) implies unit.
  card, said, _ = _adopt(author.files["int8"], tmp_path / "model")
  assert card.input_scale == "unit" and card.engines == ["tflite"]
  assert "quantisation" in card.adopted["input_scale"]
  rows = run_predict(tmp_path / "out", input=png_dir,
                     model=str(tmp_path / "model")).predictions_by_id
  ids = png_ids(png_dir, sample)
  # Exactly what the author's interpreter loop gives...
  _assert_same_as_author(rows, ids, author.tflite_logits("int8"))
  # ...and at least 97% of the float original's labels.
  agreement = _assert_same_as_author(rows, ids, author.logits, exact=False)
  assert agreement >= 0.97, said


def test_model_and_class_list_problems_are_one_line(tmp_path, author):
  with pytest.raises(adopt.AdoptError,
                     match="has 3 names but the model outputs 10 classes"):
    _adopt(author.files["keras"], tmp_path / "a", ["a", "b", "c"])
  with pytest.raises(adopt.AdoptError, match="repeats Bag"):
    adopt_flags.parse_class_names("Bag,Coat,Bag")
  (tmp_path / "notes.txt").write_text("not a model")
  with pytest.raises(adopt.AdoptError, match="is not a model this can read"):
    _adopt(str(tmp_path / "notes.txt"), tmp_path / "b")
  with pytest.raises(adopt.AdoptError, match="no such file"):
    _adopt(str(tmp_path / "missing.keras"), tmp_path / "b")
  with pytest.raises(adopt.AdoptError, match="the model's input is 28x28"):
    _adopt(author.files["keras"], tmp_path / "c", image_size=(32, 32))
  with pytest.raises(adopt.AdoptError, match="needs an rgb model"):
    _adopt(author.files["keras"], tmp_path / "d", input_scale="caffe")
  assert not os.path.exists(tmp_path / "a" / card_lib.CARD_FILE)


def test_class_names_from_a_file(tmp_path):
  (tmp_path / "names.txt").write_text("daisy\ndandelion\n\nroses\n")
  (tmp_path / "names.json").write_text(json.dumps(["a", "b"]))
  assert adopt_flags.parse_class_names(str(tmp_path / "names.txt")) == [
      "daisy", "dandelion", "roses"]
  assert adopt_flags.parse_class_names(str(tmp_path / "names.json")) == ["a", "b"]
  assert adopt_flags.parse_class_names("x, y") == ["x", "y"]


def test_several_inputs_or_a_non_classifier_output_are_refused(tmp_path):
  import keras  # pylint: disable=import-outside-toplevel
  first, second = keras.Input((8, 8, 1)), keras.Input((4,))
  joined = keras.layers.Concatenate()([keras.layers.Flatten()(first), second])
  two_inputs = keras.Model([first, second], keras.layers.Dense(2)(joined))
  two_inputs.save(tmp_path / "two.keras")
  with pytest.raises(adopt.AdoptError, match="2 inputs and 1 outputs"):
    _adopt(str(tmp_path / "two.keras"), tmp_path / "a", ["x", "y"])
  inputs = keras.Input((8, 8, 3))
  segmenter = keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs))
  segmenter.save(tmp_path / "seg.keras")
  with pytest.raises(adopt.AdoptError,
                     match=r"output of shape \(batch, 8, 8, 2\) is not "
                     r"\(batch, classes\)"):
    _adopt(str(tmp_path / "seg.keras"), tmp_path / "b", ["x", "y"])
  flat = keras.Sequential([keras.Input((64,)), keras.layers.Dense(2)])
  flat.save(tmp_path / "flat.keras")
  with pytest.raises(adopt.AdoptError, match="is not an image"):
    _adopt(str(tmp_path / "flat.keras"), tmp_path / "c", ["x", "y"])


def test_dynamic_size_needs_image_size(tmp_path):
  import keras  # pylint: disable=import-outside-toplevel
  inputs = keras.Input((None, None, 3))
  pooled = keras.layers.GlobalAveragePooling2D()(
      keras.layers.Rescaling(1 / 255)(inputs))
  model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(
      pooled))
  model.save(tmp_path / "any_size.keras")
  with pytest.raises(adopt.AdoptError, match="pass --image_size"):
    _adopt(str(tmp_path / "any_size.keras"), tmp_path / "a", ["x", "y"])
  card, _, warned = _adopt(str(tmp_path / "any_size.keras"), tmp_path / "b",
                           ["x", "y"], image_size=(20, 30))
  assert card.input_shape == [20, 30, 3] and card.output == "probabilities"
  assert "softmax" in card.adopted["output"]
  assert warned == []  # It rescales inside, so raw is no surprise.


def test_lambda_and_file_writing_savedmodels_are_refused_before_loading(
    tmp_path):
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  inputs = keras.Input((4, 4, 1))
  hidden = keras.layers.Lambda(lambda t: t / 255.0)(inputs)
  model = keras.Model(inputs, keras.layers.Dense(2)(
      keras.layers.Flatten()(hidden)))
  for name in ("lambda.keras", "lambda.h5"):
    model.save(tmp_path / name)
    with pytest.raises(adopt.AdoptError, match="Lambda layer"):
      _adopt(str(tmp_path / name), tmp_path / "out", ["x", "y"])

  written = tmp_path / "written_on_load.txt"

  class WritesOnLoad(tf.saved_model.experimental.TrackableResource):
    def _create_resource(self):
      return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[])

    def _initialize(self):
      tf.io.write_file(str(written), "x")
      tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=1.0)

  class Module(tf.Module):
    def __init__(self):
      super().__init__()
      self.resource = WritesOnLoad()

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 1], tf.float32)])
    def serve(self, x):
      scale = tf.raw_ops.ReadVariableOp(resource=self.resource.resource_handle,
                                        dtype=tf.float32)
      return {"y": tf.reshape(x, [-1, 16])[:, :2] * scale}

  module = Module()
  tf.saved_model.save(module, str(tmp_path / "evil"),
                      signatures={"serving_default": module.serve})
  if written.exists():
    written.unlink()
  with pytest.raises(adopt.AdoptError, match="WriteFile"):
    _adopt(str(tmp_path / "evil"), tmp_path / "out", ["x", "y"])
  assert not written.exists()


def test_savedmodel_ops_of_clean_exports_pass(author):
  for kind in ("export", "tf_saved_model"):
    with open(os.path.join(author.files[kind], "saved_model.pb"), "rb") as f:
      assert model_checks.saved_model_unsafe_ops(f.read()) == []


def test_near_chance_eval_data_warns(tmp_path, author, png_dir):
  card, said, warned = _adopt(author.files["tflite"], tmp_path / "right",
                              input_scale="unit", eval_data=png_dir)
  assert card.metrics["eval_images"] == 200
  assert card.metrics["eval_accuracy"] > 0.6 and warned == []
  assert any(line.startswith("eval: accuracy") for line in said)
  assert "warnings" not in card.adopted
  # Reversed class names are refused with the order to pass; confirmed,
  # they are adopted with the near-chance warning, recorded in the card.
  with pytest.raises(adopt.AdoptError, match="--confirm_class_names"):
    _adopt(author.files["tflite"], tmp_path / "wrong",
           list(reversed(FASHION)), input_scale="unit", eval_data=png_dir)
  card, _, warned = _adopt(author.files["tflite"], tmp_path / "wrong",
                           list(reversed(FASHION)), input_scale="unit",
                           eval_data=png_dir, confirm_class_names=True)
  assert card.metrics["eval_accuracy"] < 0.2
  assert len(warned) == 2 and warned[0].startswith("--confirm_class_names")
  assert "near chance" in warned[1]
  assert "--input_scale" in warned[1] and "--class_names" in warned[1]
  assert card.adopted["warnings"] == warned
  # Folders named otherwise than the classes are left out, and said so.
  renamed = tmp_path / "renamed"
  shutil.copytree(png_dir, renamed)
  os.rename(renamed / "Bag", renamed / "Bags")
  card, _, warned = _adopt(author.files["tflite"], tmp_path / "renamed_model",
                           input_scale="unit", eval_data=str(renamed))
  bags = len(os.listdir(renamed / "Bags"))
  assert card.metrics["eval_images"] == 200 - bags
  assert warned == [f"--eval_data: {bags} files in folders not named for a "
                    "class were left out (Bags); name the folders as "
                    "--class_names names the classes"]


def test_an_eval_file_that_cannot_be_read_is_one_decode_failure(
    tmp_path, author, png_dir):
  """Fails on the code before the fix: a FIFO among the --eval_data files
  ended adopting with an OSError."""
  images = tmp_path / "images"
  shutil.copytree(png_dir, images)
  os.mkfifo(images / "Bag" / "fifo.png")
  os.symlink(tmp_path / "missing.png", images / "Coat" / "dangling.png")
  card, _, _ = _adopt(author.files["tflite"], tmp_path / "model",
                      input_scale="unit", eval_data=str(images))
  assert card.metrics["eval_images"] == 200
  assert card.metrics["eval_decode_failures"] == 2


def test_predict_refuses_a_bare_model_file_with_the_adopt_command(
    tmp_path, author, png_dir):
  config = config_lib.PredictConfig(png_dir, author.files["keras"],
                                    str(tmp_path / "out"))
  with pytest.raises(config_lib.ConfigError) as raised:
    preflight.check(config)
  message = str(raised.value)
  assert "\n" not in message
  assert f"python -m model.adopt {author.files['keras']} --output " in message
  config = config_lib.PredictConfig(png_dir, author.files["export"],
                                    str(tmp_path / "out"))
  with pytest.raises(config_lib.ConfigError, match="python -m model.adopt"):
    preflight.check(config)


def test_engine_must_be_one_the_folder_holds(tmp_path, author, png_dir):
  _adopt(author.files["tflite"], tmp_path / "model", input_scale="unit")
  config = config_lib.PredictConfig(png_dir, str(tmp_path / "model"),
                                    str(tmp_path / "out"), engine="keras")
  with pytest.raises(config_lib.ConfigError, match="holds no keras model"):
    preflight.check(config)
  config = config_lib.PredictConfig(png_dir, str(tmp_path / "model"),
                                    str(tmp_path / "out"))
  assert preflight.check(config).config.engine == "tflite"


def test_adopted_folder_is_hashed_like_a_trained_one(tmp_path, author,
                                                     png_dir):
  card, _, _ = _adopt(author.files["export"], tmp_path / "model",
                      input_scale="unit")
  folder = tmp_path / "model"
  assert card.model_id == card_lib.compute_model_id(
      card, *card_lib.model_payloads(str(folder), card))
  assert card.adopted["sha256"] and card.adopted["source"] == "exported"
  # A changed SavedModel file, or a card fed another way, no longer serves.
  edited = tmp_path / "edited"
  shutil.copytree(folder, edited)
  fields = json.loads((edited / card_lib.CARD_FILE).read_text())
  fields["preprocessing"]["input_scale"] = "raw"
  (edited / card_lib.CARD_FILE).write_text(json.dumps(fields))
  with pytest.raises(config_lib.ConfigError, match="does not describe"):
    preflight.check(config_lib.PredictConfig(png_dir, str(edited), str(tmp_path / "o")
                            ))
  shutil.copytree(folder, tmp_path / "swapped")
  variables = glob.glob(str(tmp_path / "swapped" / "saved_model" /
                            "variables" / "variables.data-*"))[0]
  with open(variables, "ab") as handle:
    handle.write(b"\0")
  with pytest.raises(config_lib.ConfigError, match="does not describe"):
    preflight.check(config_lib.PredictConfig(png_dir, str(tmp_path / "swapped"),
                             str(tmp_path / "o")))


def _photo_classes(root, per_class=8):
  """JPEG photos of three colours in class folders, of mixed sizes."""
  rng = np.random.default_rng(5)
  for name, channel in (("blue", 2), ("green", 1), ("red", 0)):
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      height, width = rng.integers(40, 90, 2)
      pixels = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
      pixels[..., channel] += rng.integers(80, 160, dtype=np.uint8)
      Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)


@pytest.mark.slow
def test_keras_applications_model_on_photos_decoded_the_keras_way(tmp_path):
  """A MobileNetV2 fed keras.applications' preprocess_input ("tf" mode:
  symmetric) on image_dataset_from_directory photos, served from the photo
  files: the same labels and confidences."""
  import keras  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(1)
  photos = tmp_path / "photos"
  _photo_classes(photos)
  dataset = keras.utils.image_dataset_from_directory(
      photos, image_size=(32, 32), shuffle=False, batch_size=64,
      verbose=False)
  images = np.concatenate([x.numpy() for x, _ in dataset])
  preprocess = keras.applications.mobilenet_v2.preprocess_input
  model = keras.applications.MobileNetV2(
      input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=3)
  # Instead of training (slow): batch-norm statistics from these photos, so
  # that the untrained network's answers differ from image to image and
  # depend on the scaling.
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.momentum = 0.0
  model(preprocess(images.copy()), training=True)
  model.save(tmp_path / "mobilenet.keras")
  expected = model.predict(preprocess(images.copy()), verbose=0)
  assert len(set(expected.argmax(1))) > 1
  unscaled = model.predict(images.copy(), verbose=0)
  assert (unscaled.argmax(1) != expected.argmax(1)).mean() > 0.1

  card, said, _ = _adopt(str(tmp_path / "mobilenet.keras"), tmp_path / "model",
                         dataset.class_names, input_scale="symmetric",
                         eval_data=str(photos))
  assert card.output == "probabilities", said
  assert card.engines == ["keras", "tflite"], said
  rows = run_predict(tmp_path / "out", input=str(photos),
                     model=str(tmp_path / "model")).predictions_by_id
  ids = [os.path.abspath(p) for p in dataset.file_paths]
  assert [rows[i]["label"] for i in ids] == [
      dataset.class_names[k] for k in expected.argmax(1)]
  # Fifty-odd layers in LiteRT's kernels rather than TensorFlow's.
  np.testing.assert_allclose([rows[i]["confidence"] for i in ids],
                             expected.max(1), atol=1e-4)
  # Pillow's JPEG decoder and antialiased resize give other pixels: that is
  # why adopted models default to the TensorFlow decoder.
  pillow = np.stack([preprocessing.decode_image(open(p, "rb").read(), 32, 32,
                                                "rgb")
                     for p in dataset.file_paths]).astype(np.float32)
  assert np.abs(pillow - images).max() > 4


def test_tensorflow_decoder_is_image_dataset_from_directory(tmp_path,
                                                            monkeypatch):
  import keras  # pylint: disable=import-outside-toplevel
  _photo_classes(tmp_path / "photos", per_class=4)
  for color_mode, size in (("rgb", (24, 20)), ("grayscale", (64, 64))):
    dataset = keras.utils.image_dataset_from_directory(
        tmp_path / "photos", image_size=size, color_mode=color_mode,
        shuffle=False, batch_size=64, verbose=False)
    expected = np.concatenate([x.numpy() for x, _ in dataset])
    decoder = preprocessing.BatchDecoder("tensorflow", *size, color_mode)
    payloads = [open(p, "rb").read() for p in dataset.file_paths]
    pixels, good, errors = decoder.decode(payloads)
    assert errors == [] and good == list(range(len(payloads)))
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, expected)
    # Unrounded: the model saw fractions in training, and gets them here.
    assert (pixels != np.round(pixels)).mean() > 0.1
    # Images wait for their resize in groups of a bounded size: groups of
    # one image give the same pixels.
    with monkeypatch.context() as patch:
      patch.setattr(keras_decoding, "RESIZE_GROUP_BYTES", 1)
      one_by_one, _, _ = decoder.decode(payloads)
    np.testing.assert_array_equal(one_by_one, expected)


def test_tensorflow_decoder_isolates_bad_and_oversized_images(tmp_path):
  _photo_classes(tmp_path / "photos", per_class=2)
  good = [p.read_bytes() for p in sorted((tmp_path / "photos").glob("*/*"))]
  big = Image.new("RGB", (400, 300))
  import io  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  big.save(buffer, "JPEG")
  payloads = [good[0], b"", b"not an image", good[1], good[2][:300],
              buffer.getvalue(), None, good[3]]
  decoder = preprocessing.BatchDecoder("tensorflow", 16, 16, "rgb",
                                       max_pixels=100_000)
  pixels, kept, errors = decoder.decode(payloads)
  assert kept == [0, 3, 7] and pixels.shape == (3, 16, 16, 3)
  failed = dict(errors)
  assert sorted(failed) == [1, 2, 4, 5, 6]
  assert "DecompressionBomb" in type(failed[5]).__name__
  assert "400x300" in str(failed[5])
  # The survivors are what decoding them alone gives.
  alone, _, _ = decoder.decode([good[1]])
  np.testing.assert_array_equal(pixels[1], alone[0])


@pytest.mark.parametrize("mode", ["symmetric", "caffe", "torch"])
def test_input_scales_are_keras_applications_preprocess_input(mode):
  from keras.applications import imagenet_utils  # pylint: disable=import-outside-toplevel
  pixels = np.random.default_rng(0).uniform(0, 255, (4, 5, 6, 3)).astype(
      np.float32)
  keras_mode = {"symmetric": "tf"}.get(mode, mode)
  expected = imagenet_utils.preprocess_input(pixels.copy(), mode=keras_mode)
  np.testing.assert_array_equal(preprocessing.scale_pixels(pixels, mode),
                                expected)
  custom = preprocessing.scale_pixels(pixels, "custom", [127.5] * 3,
                                      [127.5] * 3)
  np.testing.assert_allclose(custom, preprocessing.scale_pixels(
      pixels, "symmetric"), atol=1e-6)


@pytest.mark.slow
def test_own_models_state_their_feeding_recipe(tiny_model):
  card = card_lib.load_card(tiny_model)
  assert card.preprocessing["decoder"] == "pillow"
  assert card.preprocessing["input_scale"] == "raw"
  assert card.engines == ["keras", "tflite"] and card.adopted == {}
  with pytest.raises(ValueError, match="input_mean with 1 number"):
    card_lib.check_input_scale("custom", "grayscale", [1, 2], [1])


@pytest.mark.slow
def test_tflite_with_pillow_decoder_never_imports_tensorflow(tmp_path,
                                                             tiny_model,
                                                             png_dir):
  """A later slim worker install has no TensorFlow: serving a TFLite model
  with this project's decoder must not import it."""
  script = (
      "import sys\n"
      "from beam_jobs import config, predict\n"
      f"c = config.PredictConfig({png_dir!r}, {tiny_model!r}, "
      f"{str(tmp_path / 'out')!r})\n"
      "m = predict.run(c, ['--runner', 'DirectRunner'])\n"
      "assert m['counts']['predictions'] == 200, m\n"
      "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == "False False"


@pytest.mark.slow
def test_an_adopted_tflite_folder_serves_from_the_slim_install(
    tmp_path, author, png_dir, sample):
  """Its `tensorflow` decoder recipe needs no TensorFlow: served from
  .venv-slim (no TensorFlow installed), it gives the author's predictions,
  and a Dataflow dry run with --setup_file (the slim install) accepts it."""
  card, _, _ = _adopt(author.files["tflite"], tmp_path / "model",
                      input_scale="unit")
  assert card.decoder == "tensorflow" and card.engines == ["tflite"]
  model, out = str(tmp_path / "model"), tmp_path / "out"
  if not os.path.exists(SLIM_PYTHON):
    pytest.fail(f"{SLIM_PYTHON} is missing: "
                "./run_tests.sh creates it (scripts/ensure_venv.sh)")
  served = predict_cli(
      ["--input", png_dir, "--model", model, "--output", str(out)],
      python=SLIM_PYTHON)
  assert served.returncode == 0, served.stderr[-3000:]
  rows = {row["id"]: row for row in read_parquet_rows(
      os.path.join(str(out), "predictions", "*.parquet"))}
  _assert_same_as_author(rows, png_ids(png_dir, sample), author.logits)
  needs_the_gcp_extra()
  dry_run = predict_cli(["--input", "gs://fake-bucket/images/", "--model",
                         model, "--output", "gs://fake-bucket/dry"]
                        + DATAFLOW_ARGS)
  assert dry_run.returncode == 0, dry_run.stderr


@pytest.mark.slow
def test_a_savedmodel_folder_served_by_tflite_needs_no_tensorflow_to_check(
    tmp_path, author, png_dir, monkeypatch):
  """The SavedModel's op check parses with TensorFlow, which a slim install
  lacks: it runs only when the SavedModel is what serves."""
  _adopt(author.files["export"], tmp_path / "model", input_scale="unit")

  def no_tensorflow(_):
    raise ModuleNotFoundError("No module named 'tensorflow'")

  monkeypatch.setattr(model_checks, "saved_model_unsafe_ops", no_tensorflow)
  model, out = str(tmp_path / "model"), str(tmp_path / "out")
  config = config_lib.PredictConfig(png_dir, model, out)
  plan = preflight.check(config)
  assert plan.card.engines == ["savedmodel", "tflite"]
  assert plan.config.engine == "tflite"
  with pytest.raises(ModuleNotFoundError):
    preflight.check(config_lib.PredictConfig(png_dir, model, out,
                             engine="savedmodel"))


@pytest.mark.slow
def test_adopt_cli_errors_are_one_line_and_exit_2(tmp_path):
  (tmp_path / "notes.keras").write_text("not a model")
  result = subprocess.run(
      [sys.executable, "-m", "model.adopt", str(tmp_path / "notes.keras"),
       "--output", str(tmp_path / "out"), "--class_names", "a,b"],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if l.startswith("model.adopt")]
  assert lines == [f"model.adopt: error: {tmp_path / 'notes.keras'} is not a "
                   "model this can read: expected a .keras, .h5, .tflite or "
                   ".onnx file or a SavedModel folder"]
  assert "Traceback" not in result.stderr


class _RemoteFileSystem(LocalFileSystem):
  """An object-store stand-in: `remote://PATH` is the local PATH, so a model
  folder is read through Beam's FileSystems as a gs:// one would be."""
  PREFIX = "remote://"

  @classmethod
  def scheme(cls):
    return "remote"

  def _local(self, path):
    # The base class calls these methods again with the local paths.
    return path[len(self.PREFIX):] if path.startswith(self.PREFIX) else path

  def match(self, patterns, limits=None):
    return [MatchResult(self.PREFIX + result.pattern, [
        FileMetadata(self.PREFIX + m.path, m.size_in_bytes)
        for m in result.metadata_list])
            for result in super().match([self._local(p) for p in patterns],
                                        limits)]

  def open(self, path, *args, **kwargs):
    return super().open(self._local(path), *args, **kwargs)

  def exists(self, path):
    return super().exists(self._local(path))


def test_remote_savedmodel_folder_is_checked_and_copied_whole(
    tmp_path, author, png_dir, sample):
  from beam_jobs import inference  # pylint: disable=import-outside-toplevel
  _adopt(author.files["export"], tmp_path / "model", input_scale="unit")
  remote = _RemoteFileSystem.PREFIX + str(tmp_path / "model")
  config = config_lib.PredictConfig(png_dir, remote, str(tmp_path / "out"),
                                    engine="savedmodel")
  card = preflight.check(config).card
  local = inference.local_model_dir(remote, "savedmodel")
  assert sorted(os.listdir(local)) == [card_lib.CARD_FILE, "saved_model"]
  copied = card_lib.model_files(local, card, ["savedmodel"])
  assert copied == card_lib.model_files(str(tmp_path / "model"), card,
                                        ["savedmodel"])
  assert "saved_model/saved_model.pb" in copied and len(copied) >= 3
  probabilities = engines.load_engine(local, "savedmodel").probabilities(
      sample.test.images)
  np.testing.assert_array_equal(probabilities.argmax(1),
                                _softmax(author.logits).argmax(1))


def test_raw_pixel_shards_refuse_a_tensorflow_decoder_model(tmp_path, author,
                                                            png_dir):
  from tools import make_shards  # pylint: disable=import-outside-toplevel
  card, _, _ = _adopt(author.files["tflite"], tmp_path / "model",
                      input_scale="unit")
  with pytest.raises(ValueError, match="unrounded float pixels"):
    make_shards.make_shards(png_dir, str(tmp_path / "shards"), card=card)


@pytest.mark.slow
def test_a_tflite_conversion_that_fails_or_disagrees_is_not_served(
    tmp_path, author, png_dir, sample, monkeypatch):
  import keras  # pylint: disable=import-outside-toplevel
  from model import export  # pylint: disable=import-outside-toplevel

  convert = export.convert_to_tflite

  def fails(model):
    raise RuntimeError("op FancyOp is neither a TFLite builtin nor custom")

  monkeypatch.setattr(export, "convert_to_tflite", fails)
  card, said, _ = _adopt(author.files["keras"], tmp_path / "failed",
                         input_scale="unit")
  assert card.engines == ["keras"] and card.default_engine == "keras"
  assert "FancyOp" in card.tflite["reason"]
  assert any("not served" in line and "FancyOp" in line for line in said)
  assert not (tmp_path / "failed" / card_lib.TFLITE_FILE).exists()
  rows = run_predict(tmp_path / "out", input=png_dir,
                     model=str(tmp_path / "failed")).predictions_by_id
  assert {row["engine"] for row in rows.values()} == {"keras"}
  _assert_same_as_author(rows, png_ids(png_dir, sample), author.logits)

  # A conversion of another model (same shapes, other weights) disagrees.
  other = keras.models.clone_model(author.model)
  monkeypatch.setattr(export, "convert_to_tflite",
                      lambda model: convert(other))
  card, said, _ = _adopt(author.files["keras"], tmp_path / "disagrees",
                         input_scale="unit", eval_data=png_dir)
  assert card.engines == ["keras"]
  assert card.tflite["top1_agreement"] < 0.999
  assert "agrees with keras on only" in card.tflite["reason"]


# A user's first day: the mistakes adopting must catch ----------------------


def _cli(capsys, source, out, *flags):
  """model.adopt's main, in this process: (exit code, stderr lines)."""
  code = adopt.main([str(source), "--output", str(out), *flags])
  return code, capsys.readouterr().err.splitlines()


def _one_line(code, lines) -> str:
  assert code == 2 and len(lines) == 1, lines
  assert lines[0].startswith("model.adopt: error: ")
  return lines[0]


NAMES = ["--class_names", ",".join(FASHION)]


def test_the_tutorial_mlp_without_its_scale_is_refused_or_measured(
    tmp_path, author, png_dir, sample, capsys):
  """Fails on the code before the fix: adopted as raw with a warning that
  scrolled by, then served with confidences near 1 (eval accuracy looked
  healthy: argmax barely moves with the scale)."""
  message = _one_line(*_cli(capsys, author.files["keras"], tmp_path / "a",
                            *NAMES))
  assert "no Rescaling or Normalization layer" in message
  assert "pass --input_scale unit (the author divided by 255)" in message
  assert "--eval_data" in message
  assert not (tmp_path / "a").exists()
  # With --eval_data the scale is measured: log loss tells unit from raw.
  card, said, warned = _adopt(author.files["keras"], tmp_path / "b",
                              eval_data=png_dir)
  assert card.input_scale == "unit" and warned == [], said
  assert card.adopted["input_scale"].startswith("chosen by --eval_data")
  scales = card.adopted["eval_check"]["scales"]
  assert abs(scales["raw"]["accuracy"] - scales["unit"]["accuracy"]) < 0.1
  assert scales["raw"]["log_loss"] > 2 * scales["unit"]["log_loss"] + 0.5
  served = engines.load_engine(str(tmp_path / "b")).probabilities(
      sample.test.images)
  np.testing.assert_allclose(served.max(1), _softmax(author.logits).max(1),
                             atol=1e-4)
  # The wrong scale given is refused, named; confirmed, it is kept, and the
  # warning is recorded in the card.
  message = _one_line(*_cli(capsys, author.files["tflite"], tmp_path / "c",
                            *NAMES, "--input_scale", "raw", "--eval_data",
                            png_dir))
  assert message.endswith("pass --input_scale unit, or --confirm_input_scale "
                          "to keep yours")
  card, _, warned = _adopt(author.files["tflite"], tmp_path / "c",
                           input_scale="raw", eval_data=png_dir,
                           confirm_input_scale=True)
  assert card.input_scale == "raw"
  assert warned[0].startswith("--confirm_input_scale: input_scale raw kept "
                              "although --eval_data fits unit clearly better")
  assert card.adopted["warnings"] == warned


def test_sorted_class_names_are_refused_with_the_order_to_pass(
    tmp_path, author, png_dir, capsys):
  """Fails on the code before the fix: sorted folder names for a model
  trained in another order were adopted without a word."""
  right = "--class_names " + shlex.quote(",".join(FASHION))
  message = _one_line(*_cli(
      capsys, author.files["keras"], tmp_path / "a", "--class_names",
      ",".join(sorted(FASHION)), "--input_scale", "unit", "--eval_data",
      png_dir))
  assert message.endswith(f"pass {right}, or --confirm_class_names to keep "
                          "yours")
  assert "each half scored in the order found on the other" in message
  # Neither the scale nor the order: both named at once.
  message = _one_line(*_cli(
      capsys, author.files["keras"], tmp_path / "a", "--class_names",
      ",".join(sorted(FASHION)), "--eval_data", png_dir))
  assert f"pass --input_scale unit {right}, or --confirm_class_names" in (
      message)
  assert not (tmp_path / "a" / card_lib.CARD_FILE).exists()
  # What it names is adopted.
  code, lines = _cli(capsys, author.files["tflite"], tmp_path / "a",
                     *shlex.split(right), "--input_scale", "unit",
                     "--eval_data", png_dir)
  assert code == 0, lines


def test_a_declared_output_kind_the_probe_contradicts_is_refused(
    tmp_path, author):
  """Fails on the code before the fix: --output_kind probabilities on a
  logits model served confidences up to 1.84 without a word."""
  with pytest.raises(adopt.AdoptError,
                     match=r"--output_kind probabilities contradicts the "
                     r"model: the probe batch's 64 rows are not "
                     r"probabilities .* pass --output_kind logits \(or "
                     r"auto\), or --confirm_output_kind to keep "
                     r"probabilities$"):
    _adopt(author.files["tflite"], tmp_path / "a", input_scale="unit",
           output_kind="probabilities")
  assert not (tmp_path / "a" / card_lib.CARD_FILE).exists()
  card, _, warned = _adopt(author.files["tflite"], tmp_path / "b",
                           input_scale="unit", output_kind="probabilities",
                           confirm_output_kind=True)
  assert card.output == "probabilities"
  assert warned == ["--confirm_output_kind: served as probabilities, "
                    "although the probe batch's 64 rows are not "
                    "probabilities (negative, or not summing to 1)"]
  assert card.adopted["warnings"] == warned
  card, _, _ = _adopt(author.files["tflite"], tmp_path / "c",
                      input_scale="unit", output_kind="logits")
  assert card.adopted["output"].startswith("declared with --output_kind, as")
  import keras  # pylint: disable=import-outside-toplevel
  softmax = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                              keras.layers.Rescaling(1 / 255),
                              keras.layers.Dense(2, activation="softmax")])
  softmax.save(tmp_path / "softmax.keras")
  with pytest.raises(adopt.AdoptError,
                     match="--output_kind logits contradicts the model: the "
                     "Keras config ends in a softmax"):
    _adopt(str(tmp_path / "softmax.keras"), tmp_path / "d", ["x", "y"],
           output_kind="logits")


def _nan_model():
  """A classifier whose every output is NaN: its bias is."""
  import keras  # pylint: disable=import-outside-toplevel
  model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                            keras.layers.Dense(2)])
  kernel, bias = model.layers[-1].get_weights()
  model.layers[-1].set_weights([kernel, np.full_like(bias, np.nan)])
  return model


@pytest.mark.parametrize("kind", ["keras", "h5", "savedmodel", "tflite"])
def test_a_model_with_non_finite_outputs_is_refused(tmp_path, kind):
  """Every kind (ONNX: tests/test_adopt_onnx.py) is probed for NaN."""
  model = _nan_model()
  if kind in ("keras", "h5"):
    source = str(tmp_path / f"nan.{kind}")
    model.save(source)
  elif kind == "savedmodel":
    source = str(tmp_path / "nan")
    model.export(source, verbose=False)
  else:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    source = str(tmp_path / "nan.tflite")
    with open(source, "wb") as handle:
      handle.write(tf.lite.TFLiteConverter.from_keras_model(model).convert())
  with pytest.raises(adopt.AdoptError, match="outputs NaN or infinity"):
    _adopt(source, tmp_path / "out", ["x", "y"], input_scale="unit")
  assert not (tmp_path / "out" / card_lib.CARD_FILE).exists()


def test_adopt_never_deletes_or_overwrites_its_source(tmp_path, author,
                                                      capsys, monkeypatch):
  """Fails on the code before the fix: `DIR/model.keras --output DIR`
  deleted the user's only copy of the model, then failed."""
  folder = tmp_path / "folder"
  folder.mkdir()
  keras_file, tflite_file = folder / "model.keras", folder / "model.tflite"
  shutil.copyfile(author.files["keras"], keras_file)
  shutil.copyfile(author.files["tflite"], tflite_file)
  saved = folder / "saved_model"
  shutil.copytree(author.files["export"], saved)
  os.symlink(keras_file, tmp_path / "link.keras")
  os.symlink(folder, tmp_path / "linked")
  sources = [keras_file, tflite_file, saved]
  before = [model_formats.sha256_of(str(path)) for path in sources]
  monkeypatch.chdir(folder)
  for source, out in [
      (keras_file, folder), ("model.tflite", "."), (saved, folder),
      (saved, saved / "variables"), (tmp_path / "link.keras", folder),
      (keras_file, tmp_path / "linked"), (keras_file, tmp_path)]:
    message = _one_line(*_cli(capsys, source, out, *NAMES, "--input_scale",
                              "unit"))
    assert "the source" in message, (source, out)
    assert [model_formats.sha256_of(str(p)) for p in sources] == before
  # A model folder of ours whose model file is the source under another
  # name: a hard link or a link.
  ours = tmp_path / "ours"
  _adopt(author.files["tflite"], ours, input_scale="unit")
  for make_link in (os.link, os.symlink):
    os.remove(ours / card_lib.TFLITE_FILE)
    make_link(tflite_file, ours / card_lib.TFLITE_FILE)
    message = _one_line(*_cli(capsys, tflite_file, ours, *NAMES,
                              "--input_scale", "unit"))
    assert "its model.tflite is the source" in message
    assert "under another name" in message
    assert [model_formats.sha256_of(str(p)) for p in sources] == before


def _listing(folder) -> dict:
  return {name: model_formats.sha256_of(os.path.join(folder, name))
          for name in sorted(os.listdir(folder))}


def test_a_folder_adopt_did_not_write_keeps_its_files(tmp_path, author,
                                                      png_dir, capsys):
  """Fails on the code before the fix: a folder holding the user's own
  model.tflite lost it, and a failed re-adoption cleared the model folder
  it was to replace."""
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / card_lib.TFLITE_FILE).write_bytes(b"the user's own")
  (foreign / "notes.txt").write_text("mine")
  listing = _listing(foreign)
  message = _one_line(*_cli(capsys, author.files["keras"], foreign, *NAMES,
                            "--input_scale", "unit"))
  assert "holds model.tflite but no model_card.json" in message
  (foreign / card_lib.CARD_FILE).write_text("{}")
  message = _one_line(*_cli(capsys, author.files["keras"], foreign, *NAMES,
                            "--input_scale", "unit"))
  assert "its model_card.json is not a model card" in message
  os.remove(foreign / card_lib.CARD_FILE)
  assert _listing(foreign) == listing
  # A folder of ours: a failed adoption leaves it as it was...
  ours = tmp_path / "ours"
  _adopt(author.files["keras"], ours, input_scale="unit")
  (ours / "notes.txt").write_text("mine")
  listing = _listing(ours)
  _nan_model().save(tmp_path / "nan.keras")
  with pytest.raises(adopt.AdoptError, match="NaN"):
    _adopt(str(tmp_path / "nan.keras"), ours, ["x", "y"], input_scale="unit")
  assert _listing(ours) == listing
  preflight.check(config_lib.PredictConfig(png_dir, str(ours),
                                           str(tmp_path / "out")))
  # ...and a successful one replaces its model files, removes those the new
  # card does not list, and keeps the rest.
  card, _, _ = _adopt(author.files["int8"], ours)
  assert sorted(os.listdir(ours)) == sorted([card_lib.CARD_FILE,
                                             card_lib.TFLITE_FILE,
                                             "notes.txt"])
  assert preflight.check(config_lib.PredictConfig(
      png_dir, str(ours), str(tmp_path / "out"))).card.model_id == (
          card.model_id)


def test_class_names_that_name_a_missing_file_are_refused(tmp_path):
  """Fails on the code before the fix: one class named "classes.txt"."""
  for value in ("classes.txt", "labels.JSON", "names.csv", "data/classes",
                str(tmp_path / "missing")):
    with pytest.raises(adopt.AdoptError,
                       match=f"--class_names {value}: no such file"):
      adopt_flags.parse_class_names(value)
  with pytest.raises(adopt.AdoptError, match="is not a regular file"):
    adopt_flags.parse_class_names(str(tmp_path))
  assert adopt_flags.parse_class_names("a.b,c") == ["a.b", "c"]


def test_adopt_help_says_each_default_once():
  """Fails on the code before the fix: "default raw ... (default: none)"."""
  text = adopt.build_parser().format_help()
  options = " ".join(text[text.index("\noptions:"):].split())
  scale_help = options[options.index("--input_scale {"):
                       options.index("--input_mean")]
  assert scale_help.count("default") == 1 and "(default: none)" not in (
      scale_help), scale_help
  for flag in ("--confirm_output_kind", "--confirm_input_scale",
               "--confirm_class_names"):
    assert flag in text


@pytest.mark.slow
def test_predict_repeats_the_adoption_warnings(tmp_path, author, png_dir,
                                               capsys):
  """Fails on the code before the fix: predict never repeated them."""
  _adopt(author.files["tflite"], tmp_path / "model", input_scale="raw",
         eval_data=png_dir, confirm_input_scale=True)
  code = predict.main(["--input", png_dir, "--model", str(tmp_path / "model"),
                       "--output", str(tmp_path / "out"), "--runner",
                       "DirectRunner", "--progress_seconds", "0"])
  assert code == 0
  lines = capsys.readouterr().err.splitlines()
  repeated = [line for line in lines if "model.adopt warned" in line]
  assert len(repeated) == 1, lines
  assert repeated[0].startswith(
      "beam_jobs.predict: warning: model.adopt warned: --confirm_input_scale:"
      " input_scale raw kept although --eval_data fits unit clearly better")
