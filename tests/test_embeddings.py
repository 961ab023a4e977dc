"""The embedding a model folder serves: chosen at train and adopt time,
recorded in the card, and equal in every engine to the model's own
intermediate tensor (Keras `Model(inputs, layer.output)`; ONNX Runtime on
the source graph with that tensor as an output) to 1e-5."""

import dataclasses
import json
import os

import numpy as np
import pytest

from model import card as card_lib
from model import embeddings
from model import engines
from tests.helpers import SAMPLE_DIR

TOLERANCE = embeddings.EMBEDDING_TOLERANCE


def _within(actual, expected):
  scale = max(1.0, float(np.abs(expected).max()))
  assert np.abs(np.asarray(actual, np.float64) - expected).max() <= (
      TOLERANCE * scale)


# Keras: model.train's folders ---------------------------------------------------


def test_a_trained_folder_serves_the_layer_before_the_classifier(tiny_model,
                                                                 sample):
  keras = pytest.importorskip("keras")
  card = card_lib.load_card(tiny_model)
  model = keras.saving.load_model(os.path.join(tiny_model,
                                               card_lib.MODEL_FILE))
  # The tutorial MLP's hidden Dense layer (its name depends on how many
  # models this process built before it).
  hidden, = [layer for layer in model.layers if isinstance(
      layer, keras.layers.Dense) and layer.name != "logits"]
  assert card.embedding["layer"] == hidden.name
  assert card.embedding["dimension"] == 128
  assert card.embedding_engines == ["tflite", "keras"]
  assert card.embedding["engines"]["tflite"]["max_difference"] <= TOLERANCE * (
      card.embedding["engines"]["tflite"]["scale"])
  images = sample.test.images[:100]
  expected = keras.Model(model.inputs, hidden.output
                         ).predict(images.astype(np.float32), verbose=0)
  for name in ("keras", "tflite"):
    engine = engines.load_engine(tiny_model, name)
    probabilities, values = engine.probabilities_and_embeddings(images)
    assert values.shape == (100, 128) and values.dtype == np.float32
    _within(values, expected)
    # The scores are the ones served without the embedding.
    np.testing.assert_array_equal(probabilities, engine.probabilities(images))


def _functional(keras, dropout=True):
  from keras import layers  # pylint: disable=import-outside-toplevel
  inputs = keras.Input(shape=(8, 8, 1), name="image")
  x = layers.Conv2D(3, 3, name="conv")(inputs)
  x = layers.GlobalAveragePooling2D(name="pool")(x)
  if dropout:
    x = layers.Dropout(0.5, name="head_dropout")(x)
  x = layers.Dense(4, name="logits")(x)
  outputs = layers.Softmax(name="softmax")(x)
  return keras.Model(inputs, outputs)


def test_the_default_guess_skips_softmax_and_dropout(tmp_path):
  keras = pytest.importorskip("keras")
  model = _functional(keras)
  assert embeddings.keras_layer(model) == (
      "pool", "the input of the final Dense layer 'logits'")
  assert embeddings.keras_layer(model, "conv")[0] == "conv"
  sequential = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3,
                                                                       name="h"),
                                 keras.layers.Dense(2, name="out")])
  assert embeddings.keras_layer(sequential)[0] == "h"
  # A Dense on the input itself has no feature layer before it.
  plain = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
  layer, why = embeddings.keras_layer(plain)
  assert layer is None and "no feature layer" in why


def test_a_named_layer_that_is_not_there_is_refused_in_one_line():
  keras = pytest.importorskip("keras")
  with pytest.raises(embeddings.EmbeddingError) as raised:
    embeddings.keras_layer(_functional(keras), "nope")
  assert "no top-level layer" in str(raised.value)
  assert "\n" not in str(raised.value)


def test_export_takes_embedding_layer(tmp_path):
  keras = pytest.importorskip("keras")
  from model import export  # pylint: disable=import-outside-toplevel
  images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1)).astype(
      np.float32)
  card = export.export_model(
      _functional(keras), str(tmp_path / "m"), architecture="test",
      class_names=list("abcd"), color_mode="grayscale", test_images=images,
      dataset={}, metrics={}, training={}, embedding_layer="conv")
  assert card.embedding["layer"] == "conv"
  assert card.embedding["chosen"] == "--embedding_layer"
  assert card.embedding["flattened_from"] == ["batch", 6, 6, 3]
  assert card_lib.load_card(str(tmp_path / "m")).embedding == card.embedding
  for name in ("tflite", "keras"):
    values = engines.load_engine(str(tmp_path / "m"), name
                                 ).probabilities_and_embeddings(images)[1]
    assert values.shape == (20, 108)


def test_a_straying_tflite_embedding_keeps_the_file_and_serves_its_scores(
    tmp_path, monkeypatch):
  """Deep networks' TFLite embeddings stray past the tolerance: the file
  converted with both outputs is kept (one conversion, not two), serves the
  scores output the card names, and the Keras engine the embedding."""
  keras = pytest.importorskip("keras")
  from model import export  # pylint: disable=import-outside-toplevel
  converted = []
  convert = export.convert_to_tflite
  monkeypatch.setattr(export, "convert_to_tflite",
                      lambda model: converted.append(model) or convert(model))
  monkeypatch.setattr(embeddings, "EMBEDDING_TOLERANCE", -1.0)  # all stray
  images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1)).astype(
      np.float32)
  out = str(tmp_path / "m")
  card = export.export_model(
      _functional(keras), out, architecture="test", class_names=list("abcd"),
      color_mode="grayscale", test_images=images, dataset={}, metrics={},
      training={}, embedding_layer="conv")
  assert len(converted) == 1
  assert card.embedding_engines == ["keras"]
  assert "differs from Keras'" in card.embedding["not_served"]["tflite"]
  assert card.embedding["scores_output"]["tflite"]
  assert card_lib.load_card(out).embedding == card.embedding
  card_lib.check_model_files(out, card_lib.load_card(out))
  tflite = engines.load_engine(out, "tflite").probabilities(images)
  reference = engines.load_engine(out, "keras").probabilities(images)
  np.testing.assert_allclose(tflite, reference, atol=1e-5)
  with pytest.raises(ValueError, match="serves no embedding"):
    engines.load_engine(out, "tflite").probabilities_and_embeddings(images)


def test_train_refuses_a_wrong_embedding_layer_before_training(sample):
  pytest.importorskip("keras")
  from model import train  # pylint: disable=import-outside-toplevel
  with pytest.raises(embeddings.EmbeddingError, match="no top-level layer"):
    # 1,000 epochs would take minutes: the refusal comes first.
    train.train(sample, "tutorial_mlp", "/nonexistent/out", epochs=1000,
                verbose=0, embedding_layer="nope")


# The card ------------------------------------------------------------------


def _card(**fields):
  base = dict(model_id="", architecture="a", class_names=["a", "b"],
              input_shape=[4, 4, 1], color_mode="grayscale", output="logits")
  base.update(fields)
  return card_lib.ModelCard(**base)


def test_a_card_without_an_embedding_keeps_its_model_id():
  card = _card()
  before = card_lib.compute_model_id(card, b"model")
  with_embedding = dataclasses.replace(card, embedding={
      "layer": "x", "dimension": 3, "engines": {"keras": {"layer": "x"}}})
  assert card_lib.compute_model_id(with_embedding, b"model") != before
  # The id of a card that has none is computed as before embeddings.
  import hashlib  # pylint: disable=import-outside-toplevel
  serving = json.dumps({name: getattr(card, name)
                        for name in card_lib.SERVING_FIELDS},
                       sort_keys=True).encode()
  digest = hashlib.sha256()
  for payload in (serving, b"model"):
    digest.update(hashlib.sha256(payload).digest())
  assert before == digest.hexdigest()[:16]


@pytest.mark.parametrize("embedding, message", [
    ({"layer": "", "dimension": 3, "engines": {"keras": {}}}, "layer"),
    ({"layer": "x", "dimension": 0, "engines": {"keras": {}}}, "dimension"),
    ({"layer": "x", "dimension": 3, "engines": {"onnx": {}}}, "engines"),
])
def test_a_card_embedding_that_does_not_fit_is_refused(embedding, message):
  with pytest.raises(ValueError, match=message):
    _card(embedding=embedding).validate()


# ONNX: model.adopt's folders ------------------------------------------------------


@pytest.fixture(name="onnx_source")
def _onnx_source(tmp_path):
  pytest.importorskip("onnx")
  from tests import onnx_builders  # pylint: disable=import-outside-toplevel
  return onnx_builders


def _adopt(path, out, **flags):
  from model import adopt  # pylint: disable=import-outside-toplevel
  said = []
  card = adopt.adopt(str(path), str(out), ["a", "b", "c"],
                     input_scale="unit", decoder="pillow", say=said.append,
                     **flags)
  return card, said


def _source_tensor(path, name, inputs, batch=None):
  """ONNX Runtime on the author's own file with `name` as its only output,
  in batches of its fixed size."""
  import onnx  # pylint: disable=import-outside-toplevel
  import onnxruntime  # pylint: disable=import-outside-toplevel
  model = onnx.load(str(path))
  del model.graph.output[:]
  model.graph.output.append(onnx.helper.make_tensor_value_info(
      name, onnx.TensorProto.FLOAT, None))
  session = onnxruntime.InferenceSession(model.SerializeToString(),
                                         providers=["CPUExecutionProvider"])
  step = batch or len(inputs)
  return np.concatenate([session.run([name], {"input": inputs[i:i + step]})[0]
                         for i in range(0, len(inputs), step)])


@pytest.mark.parametrize("variant", [
    {}, {"batch": 1, "flatten": "dynamo"}, {"softmax": True},
    {"layout": "NHWC"}, {"batch": 1, "flatten": "shape"}])
def test_an_adopted_onnx_graph_serves_the_input_of_its_final_gemm(
    tmp_path, onnx_source, variant):
  path = onnx_source.classifier(str(tmp_path / "m.onnx"), classes=3,
                                **variant)
  card, said = _adopt(path, tmp_path / "folder")
  assert card.embedding["layer"] == "flat"
  assert card.embedding["dimension"] == onnx_source.FEATURES * 64
  assert any(line.startswith("embedding: 'flat'") for line in said)
  engine = engines.load_engine(str(tmp_path / "folder"))
  pixels = np.random.default_rng(1).integers(0, 256, (7, 8, 8, 3)).astype(
      np.uint8)
  probabilities, values = engine.probabilities_and_embeddings(pixels)
  feed = engine.model_inputs(pixels)
  if variant.get("layout") != "NHWC":
    feed = feed.transpose(0, 3, 1, 2)
  expected = _source_tensor(path, "flat", np.ascontiguousarray(feed),
                            variant.get("batch"))
  _within(values, expected)
  np.testing.assert_array_equal(probabilities, engine.probabilities(pixels))
  # The folder passes predict's checks with its two outputs.
  engines.check_onnx_model_shapes(card, open(
      tmp_path / "folder" / card_lib.ONNX_FILE, "rb").read())


def test_a_named_onnx_tensor_is_served_flattened(tmp_path, onnx_source):
  path = onnx_source.classifier(str(tmp_path / "m.onnx"), classes=3)
  card, _ = _adopt(path, tmp_path / "folder", embedding_layer="relu")
  assert card.embedding["layer"] == "relu"
  assert card.embedding["flattened_from"] == ["batch", 4, 8, 8]
  engine = engines.load_engine(str(tmp_path / "folder"))
  pixels = np.full((2, 8, 8, 3), 100, np.uint8)
  values = engine.probabilities_and_embeddings(pixels)[1]
  feed = np.ascontiguousarray(engine.model_inputs(pixels).transpose(0, 3, 1,
                                                                    2))
  _within(values, _source_tensor(path, "relu", feed).reshape(2, -1))


@pytest.mark.parametrize("name, message", [
    ("nothing_here", "not a tensor any node"),
    ("input", "the graph's input"),
    ("logits", "the classifier's output"),
])
def test_an_onnx_tensor_that_cannot_serve_is_refused(tmp_path, onnx_source,
                                                     name, message):
  from model.model_formats import AdoptError  # pylint: disable=import-outside-toplevel
  path = onnx_source.classifier(str(tmp_path / "m.onnx"), classes=3)
  with pytest.raises(AdoptError, match=message):
    _adopt(path, tmp_path / "folder", embedding_layer=name)
  assert not os.path.exists(tmp_path / "folder" / card_lib.CARD_FILE)


def _pooling_classifier(path):
  """(batch, 3, 8, 8) -> GlobalAveragePool -> Flatten: three scores, and
  no Gemm or MatMul to find."""
  import onnx  # pylint: disable=import-outside-toplevel
  from onnx import helper  # pylint: disable=import-outside-toplevel
  graph = helper.make_graph(
      [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
       helper.make_node("Flatten", ["pooled"], ["scores"], axis=1)],
      "pooling",
      [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT,
                                     ["batch", 3, 8, 8])],
      [helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT,
                                     ["batch", 3])])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  model.ir_version = 8
  onnx.save(model, path)
  return path


def test_without_a_gemm_the_folder_has_no_embedding_and_says_why(
    tmp_path, onnx_source):
  path = _pooling_classifier(str(tmp_path / "m.onnx"))
  card, said = _adopt(path, tmp_path / "folder")
  assert card.embedding == {}
  assert card.adopted["embedding"].startswith("none: no Gemm or MatMul")
  assert any(line.startswith("embedding: none") for line in said)
  written = card_lib.load_card(str(tmp_path / "folder"))
  message = embeddings.refusal(str(tmp_path / "folder"), written)
  assert "\n" not in message and "--embedding_layer NAME" in message
  with pytest.raises(ValueError, match="serves no embedding"):
    engines.load_engine(str(tmp_path / "folder")
                        ).probabilities_and_embeddings(
                            np.zeros((1, 8, 8, 3), np.uint8))
