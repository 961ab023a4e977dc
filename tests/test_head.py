"""model.train --features_from: a head trained on a backbone's embeddings,
exported with it as one model folder. The composed file must give the
labels that backbone-then-head give when run apart in Python, and serve
the backbone's embedding."""

import os

import numpy as np
import pytest
from PIL import Image

from model import card as card_lib
from model import datasets
from model import engines
from model import preprocessing

pytest.importorskip("keras")  # The head is a Keras model.

CLASSES = ("circle", "cross", "plain")


def _generated_folders(root, count=16, size=8, mode="RGB"):
  """`count` images per class whose classes differ by colour and pattern,
  with noise; returns the folder."""
  rng = np.random.default_rng(11)
  channels = 3 if mode == "RGB" else 1
  for number, name in enumerate(CLASSES):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for index in range(count):
      pixels = rng.integers(0, 90, (size, size, channels)).astype(np.int32)
      pixels[:, :, number % channels] += 60 * number
      if number == 1:
        pixels[size // 2, :, :] += 120
        pixels[:, size // 2, :] += 120
      image = np.clip(pixels, 0, 255).astype(np.uint8)
      Image.fromarray(image if channels == 3 else image[..., 0]).save(
          os.path.join(root, name, f"{index}.png"))
  return str(root)


def _pixels(folder, card):
  decoder = preprocessing.card_decoder(card)
  files = sorted(os.path.join(folder, name, f)
                 for name in CLASSES for f in os.listdir(
                     os.path.join(folder, name)))
  pixels, good, _ = decoder.decode([open(f, "rb").read() for f in files])
  assert len(good) == len(files)
  return pixels


def _train_and_compose(data, backbone_dir, out, head_kind="linear",
                       embed_with="process"):
  from model import compose  # pylint: disable=import-outside-toplevel
  from model import head  # pylint: disable=import-outside-toplevel
  backbone = head.load_backbone(backbone_dir)
  trained = head.train_head(data, backbone, head_kind, epochs=3, verbose=0,
                            embed_with=embed_with)
  card = compose.export_composed(trained, backbone, out, {"name": "gen"})
  return backbone, trained, card


def _labels_apart(backbone, trained, pixels):
  embedded = engines.load_engine(backbone.model_dir, backbone.engine
                                 ).probabilities_and_embeddings(pixels)[1]
  return trained.model.predict(embedded, verbose=0).argmax(1), embedded


@pytest.fixture(name="onnx_backbone")
def _onnx_backbone(tmp_path):
  pytest.importorskip("onnx")
  from model import adopt  # pylint: disable=import-outside-toplevel
  from tests import onnx_builders  # pylint: disable=import-outside-toplevel
  path = onnx_builders.classifier(str(tmp_path / "backbone.onnx"), batch=1,
                                  flatten="dynamo", classes=5)
  out = str(tmp_path / "backbone")
  adopt.adopt(path, out, list("abcde"), input_scale="unit",
              decoder="pillow", say=lambda line: None)
  return out


@pytest.mark.parametrize("head_kind", ["linear", "mlp"])
def test_an_onnx_backbone_and_head_serve_as_one_graph(tmp_path, onnx_backbone,
                                                      head_kind):
  import onnx  # pylint: disable=import-outside-toplevel
  data = _generated_folders(tmp_path / "data")
  out = str(tmp_path / "composed")
  backbone, trained, card = _train_and_compose(data, onnx_backbone, out,
                                               head_kind)
  assert card.engines == ["onnx"] and card.output == "probabilities"
  assert card.class_names == list(CLASSES)
  assert card.architecture == f"adopted+{head_kind}_head"
  assert card.training["features_from"]["model_id"] == backbone.card.model_id
  assert card.training["composed"]["top1_agreement"] == 1.0
  graph = onnx.load(os.path.join(out, card_lib.ONNX_FILE)).graph
  assert [value.name for value in graph.output] == ["probabilities", "flat"]
  ops = [node.op_type for node in graph.node]
  assert ops[-1] == "Softmax" and "Gemm" not in ops[ops.index("Sub"):]
  # The backbone's own classifier is pruned: one Gemm fewer, its weights
  # gone.
  assert "fc.weight" not in {tensor.name for tensor in graph.initializer}
  pixels = _pixels(data, card)
  composed = engines.load_engine(out)
  probabilities, embedded = composed.probabilities_and_embeddings(pixels)
  apart, backbone_embedded = _labels_apart(backbone, trained, pixels)
  np.testing.assert_array_equal(probabilities.argmax(1), apart)
  np.testing.assert_array_equal(embedded, backbone_embedded)
  # The folder passes predict's checks.
  from beam_jobs import preflight  # pylint: disable=import-outside-toplevel
  assert preflight.load_card(out, "auto").model_id == card.model_id


@pytest.mark.slow
def test_a_keras_backbone_and_head_serve_as_one_model(tmp_path, tiny_model):
  data = _generated_folders(tmp_path / "data", size=28, mode="L")
  out = str(tmp_path / "composed")
  backbone, trained, card = _train_and_compose(data, tiny_model, out)
  assert card.engines == ["keras", "tflite"]
  assert card.embedding["layer"] == "embedding"
  assert card.embedding["dimension"] == 128
  pixels = _pixels(data, card)
  apart, backbone_embedded = _labels_apart(backbone, trained, pixels)
  for engine in ("tflite", "keras"):
    probabilities, embedded = engines.load_engine(
        out, engine).probabilities_and_embeddings(pixels)
    np.testing.assert_array_equal(probabilities.argmax(1), apart)
    np.testing.assert_allclose(embedded, backbone_embedded, atol=1e-5)


@pytest.mark.slow
def test_the_pipeline_embeds_as_the_process_does(tmp_path, onnx_backbone):
  from model import head  # pylint: disable=import-outside-toplevel
  data = _generated_folders(tmp_path / "data", count=6)
  backbone = head.load_backbone(onnx_backbone)
  subsets = datasets.split_image_folder(data, 0.2, 0)[1]
  by_pipeline = head.embed_with_pipeline(backbone, data, subsets,
                                         str(tmp_path / "work"))
  for (files, labels), features in zip(subsets, by_pipeline):
    alone = head.embed_files(backbone, list(files), labels)
    np.testing.assert_array_equal(features.labels, alone.labels)
    np.testing.assert_allclose(features.embeddings, alone.embeddings,
                               atol=1e-5)


def test_flags_that_do_not_go_with_features_from_are_refused(tmp_path,
                                                             capsys):
  from model import train  # pylint: disable=import-outside-toplevel
  data = _generated_folders(tmp_path / "data", count=2)
  cases = [
      (["--features_from", "m", "--architecture", "photo_cnn"],
       "drop --architecture"),
      (["--features_from", "m", "--image_size", "32"], "drop --image_size"),
      (["--head", "mlp"], "--head, --hidden_units and --embed_with need "
       "--features_from"),
      (["--features_from", "m", "--hidden_units", "9"],
       "--hidden_units is for --head mlp"),
      (["--features_from", str(tmp_path / "nothing")], "no model card"),
  ]
  for flags, message in cases:
    assert train.main(["--data", data, "--output", str(tmp_path / "o"),
                       *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_backbone_without_an_embedding_is_refused_in_one_line(tmp_path,
                                                                tiny_model):
  from model import head  # pylint: disable=import-outside-toplevel
  from tests.test_write_embeddings import _keras_only_without_embedding  # pylint: disable=import-outside-toplevel
  folder = _keras_only_without_embedding(tiny_model, str(tmp_path / "old"))
  with pytest.raises(head.HeadError) as raised:
    head.load_backbone(folder)
  assert str(raised.value).startswith(f"--features_from: {folder} has no "
                                      "embedding output")
