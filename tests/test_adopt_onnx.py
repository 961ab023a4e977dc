"""ONNX sources through model.adopt, end to end: tiny PyTorch-style graphs
(tests/onnx_builders.py, no torch) adopted with the torchvision flags or the
author's preprocessing file, then served; labels and confidences must equal
what ONNX Runtime gives the author on the same image files fed the author's
way (the PIL pipeline written out below). Refusals are one line, exit 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnx")  # model.adopt reads ONNX with the onnx extra.

from beam_jobs import config as config_lib
from beam_jobs import predict
from beam_jobs import preflight
from model import adopt
from model import card as card_lib
from model import engines
from model import preprocessing
from tests import onnx_builders as build
from tests.helpers import DATAFLOW_ARGS
from tests.helpers import REPO
from tests.helpers import SLIM_PYTHON
from tests.helpers import TENSORFLOW_BLOCKER
from tests.helpers import listed_rows
from tests.helpers import needs_the_gcp_extra

CLASSES = ["cat", "dog", "fox"]
MEAN = np.asarray(preprocessing.TORCH_MEAN, np.float32)
STD = np.asarray(preprocessing.TORCH_STD, np.float32)
FILTERS = {"bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC,
           "nearest": Image.Resampling.NEAREST}


def write_photos(root, sizes=((20, 14), (14, 21), (17, 17), (31, 12))):
  """Photos of noise in a folder per class: RGB JPEGs, an RGBA PNG and a
  grayscale JPEG, of sizes whose centre crops round both ways."""
  rng = np.random.default_rng(7)
  files = []
  for number, name in enumerate(CLASSES):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for index, (width, height) in enumerate(sizes):
      pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
      pixels[..., number] //= 3
      path = os.path.join(root, name, f"{index}")
      if index == 1:
        alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
        image, path = (Image.fromarray(np.concatenate([pixels, alpha], 2)),
                       path + ".png")
      elif index == 2:
        image, path = Image.fromarray(pixels[..., 0]), path + ".jpg"
      else:
        image, path = Image.fromarray(pixels), path + ".jpg"
      image.save(path)
      files.append(path)
  return sorted(files)


def write_squares(root, size, color_mode):
  """Images already at the model's size, as a Fashion-MNIST author has."""
  rng = np.random.default_rng(8)
  files = []
  for name in CLASSES:
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for index in range(3):
      shape = (size, size) if color_mode == "grayscale" else (size, size, 3)
      path = os.path.join(root, name, f"{index}.png")
      Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
      files.append(path)
  return sorted(files)


def author_inputs(files, color_mode, layout, normalize, resize=None,
                  crop=None, interpolation="bilinear", rounding="half_even"):
  """The author's evaluation loader, written out: ImageFolder's pil_loader
  (open, convert("RGB")), Grayscale(), Resize, CenterCrop, ToTensor(),
  Normalize(mean, std); a batch in the graph's layout."""
  mean, std = {"torch": (MEAN, STD), "symmetric": (0.5, 0.5),
               "unit": (0.0, 1.0)}[normalize]
  rows = []
  for path in files:
    with open(path, "rb") as handle:
      image = Image.open(handle).convert("RGB")
    if color_mode == "grayscale":
      image = image.convert("L")
    if resize is not None:
      width, height = image.size
      if width <= height:
        size = (resize, int(resize * height / width))
      else:
        size = (int(resize * width / height), resize)
      if size != image.size:
        image = image.resize(size, FILTERS[interpolation])
    if crop is not None:
      width, height = image.size
      if rounding == "half_even":
        top, left = int(round((height - crop) / 2.0)), int(round(
            (width - crop) / 2.0))
      else:
        top, left = (height - crop) // 2, (width - crop) // 2
      image = image.crop((left, top, left + crop, top + crop))
    pixels = np.asarray(image, np.float32) / np.float32(255)
    if pixels.ndim == 2:
      pixels = pixels[..., np.newaxis]
    rows.append((pixels - np.asarray(mean, np.float32)) /
                np.asarray(std, np.float32))
  batch = np.stack(rows).astype(np.float32)
  if layout == "NCHW":
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
  if layout == "NHW":
    return np.ascontiguousarray(batch[..., 0])
  return batch


def author_probabilities(source, inputs, batch, softmax):
  outputs = build.author_outputs(source, inputs, batch).astype(np.float64)
  return outputs if softmax else engines.softmax(outputs)


def served_probabilities(model_dir, files):
  """The pipeline's two steps on files: the card's decoder, its engine."""
  card = card_lib.load_card(model_dir)
  decoder = preprocessing.card_decoder(card)
  pixels, good, errors = decoder.decode([open(f, "rb").read() for f in files])
  assert not errors and good == list(range(len(files))), errors
  return engines.load_engine(model_dir).probabilities(pixels)


def assert_same_as_author(served, expected):
  np.testing.assert_array_equal(served.argmax(1), expected.argmax(1))
  np.testing.assert_allclose(served.max(1), expected.max(1), atol=1e-5)
  np.testing.assert_allclose(served, expected, atol=1e-5)


def adopt_quietly(source, out, **flags):
  said = []
  card = adopt.adopt(source, str(out), CLASSES, say=said.append,
                     warn=said.append, **flags)
  return card, said


# name: (builder arguments, adopt flags, the author's recipe, batch mode)
PHOTO_MODELS = {
    "nchw_dynamic_logits": (
        {}, {"input_scale": "torch", "resize": 10, "center_crop": (8, 8)},
        {"normalize": "torch", "resize": 10, "crop": 8}, "dynamic"),
    "nchw_fixed_1_softmax_dynamo": (
        {"batch": 1, "flatten": "dynamo_flatten", "softmax": True},
        {"input_scale": "torch", "resize": 9, "center_crop": (8, 8),
         "interpolation": "bicubic"},
        {"normalize": "torch", "resize": 9, "crop": 8,
         "interpolation": "bicubic"}, "made_dynamic"),
    "nhwc_fixed_1": (
        {"layout": "NHWC", "batch": 1, "flatten": "reshape"},
        {"input_scale": "symmetric", "resize": 11, "center_crop": (8, 8)},
        {"normalize": "symmetric", "resize": 11, "crop": 8}, "made_dynamic"),
    "grayscale_fixed_1_one_at_a_time": (
        {"channels": 1, "batch": 1, "batch_mixing": True},
        {"input_scale": "unit", "resize": 8, "center_crop": (8, 8),
         "interpolation": "nearest"},
        {"normalize": "unit", "resize": 8, "crop": 8,
         "interpolation": "nearest"}, "one_at_a_time"),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("photos"))
  return root, write_photos(root)


@pytest.mark.parametrize("name", sorted(PHOTO_MODELS))
def test_photos_are_labelled_as_onnx_runtime_labels_them_for_the_author(
    name, tmp_path, photos):
  arguments, flags, recipe, batch = PHOTO_MODELS[name]
  source = build.classifier(str(tmp_path / "model.onnx"), classes=3,
                            **arguments)
  card, said = adopt_quietly(source, tmp_path / "folder", **flags)
  assert card.engines == ["onnx"] and card.decoder == "torchvision"
  assert card.adopted["onnx"]["batch"] == batch
  assert card.output == ("probabilities" if arguments.get("softmax") else
                         "logits")
  assert said[0].startswith("source: ONNX model")
  color_mode = "grayscale" if arguments.get("channels") == 1 else "rgb"
  assert card.color_mode == color_mode
  expected = author_probabilities(
      source, author_inputs(photos[1], color_mode,
                            arguments.get("layout", "NCHW"), **recipe),
      arguments.get("batch"), arguments.get("softmax"))
  assert_same_as_author(served_probabilities(str(tmp_path / "folder"),
                                             photos[1]), expected)


@pytest.mark.parametrize("layout, color_mode, normalize", [
    ("NCHW", "grayscale", "symmetric"), ("NHW", "grayscale", "unit"),
    ("NHWC", "rgb", "torch")])
def test_images_at_the_model_size_need_no_resize(tmp_path, layout,
                                                 color_mode, normalize):
  # Fashion-MNIST's recipe: Compose([ToTensor(), Normalize(0.5, 0.5)]).
  channels = 1 if color_mode == "grayscale" else 3
  source = build.classifier(str(tmp_path / "model.onnx"), layout=layout,
                            channels=channels, size=(12, 12), classes=3,
                            conv=False)
  files = write_squares(str(tmp_path / "images"), 12, color_mode)
  card, _ = adopt_quietly(source, tmp_path / "folder", input_scale=normalize)
  assert card.preprocessing["layout"] == layout
  assert (card.preprocessing["resize"], card.preprocessing["center_crop"]) == (
      None, None)
  expected = author_probabilities(
      source, author_inputs(files, color_mode, layout, normalize), None,
      False)
  assert_same_as_author(served_probabilities(str(tmp_path / "folder"),
                                             files), expected)
  # Another size is an error row, not a silent resize the author never did.
  other = str(tmp_path / "other.png")
  Image.new("RGB", (13, 12)).save(other)
  decoder = preprocessing.card_decoder(card)
  _, good, errors = decoder.decode([open(other, "rb").read()])
  assert not good and "recipe has no resize" in str(errors[0][1])


def test_external_data_is_inlined_and_model_id_hashes_what_is_served(
    tmp_path, photos):
  source = build.with_external_data(build.classifier(
      str(tmp_path / "model.onnx"), classes=3, batch=1))
  card, _ = adopt_quietly(source, tmp_path / "folder", input_scale="torch",
                          resize=10, center_crop=(8, 8))
  folder = str(tmp_path / "folder")
  assert sorted(os.listdir(folder)) == sorted([card_lib.CARD_FILE,
                                               card_lib.ONNX_FILE])
  served = (tmp_path / "folder" / card_lib.ONNX_FILE).read_bytes()
  assert served != (tmp_path / "model.onnx").read_bytes()
  assert card.adopted["onnx"]["external_data_bytes"] > 0
  assert card.model_id == card_lib.compute_model_id(card, served)
  card_lib.check_model_files(folder, card)
  expected = author_probabilities(source, author_inputs(
      photos[1], "rgb", "NCHW", "torch", resize=10, crop=8), 1, False)
  # The folder serves with nothing beside it: the data moved in.
  os.remove(tmp_path / "weights.bin")
  assert_same_as_author(served_probabilities(folder, photos[1]), expected)
  # Another byte in the served file no longer matches the card.
  (tmp_path / "folder" / card_lib.ONNX_FILE).write_bytes(served + b"\0")
  with pytest.raises(ValueError, match="hash to"):
    card_lib.check_model_files(folder, card)


def _write_json(path, content):
  with open(path, "w", encoding="utf-8") as handle:
    json.dump(content, handle)
  return str(path)


def test_a_timm_config_sets_the_recipe_and_the_card_says_so(tmp_path,
                                                            photos):
  source = build.classifier(str(tmp_path / "model.onnx"), classes=3,
                            batch=1, flatten="dynamo")
  config = _write_json(tmp_path / "config.json", {
      "architecture": "tiny", "num_classes": 3, "pretrained_cfg": {
          "input_size": [3, 8, 8], "interpolation": "bicubic",
          "crop_pct": 0.75, "crop_mode": "center", "mean": [0.5] * 3,
          "std": [0.5] * 3}})
  card, _ = adopt_quietly(source, tmp_path / "folder",
                          preprocessing_config=config)
  recipe = card.preprocessing
  assert (recipe["resize"], recipe["center_crop"], recipe["interpolation"],
          recipe["crop_rounding"], recipe["input_scale"]) == (
              10, [8, 8], "bicubic", "half_even", "symmetric")
  came_from = card.adopted["preprocessing_from"]
  assert came_from["file"] == "config.json" and len(came_from["sha256"]) == 64
  for name in ("resize", "center_crop", "interpolation", "input_scale"):
    assert came_from["values"][name].startswith("config.json pretrained_cfg")
  assert card.adopted["input_scale"] == "config.json pretrained_cfg: mean, std"
  expected = author_probabilities(source, author_inputs(
      photos[1], "rgb", "NCHW", "symmetric", resize=10, crop=8,
      interpolation="bicubic"), 1, False)
  assert_same_as_author(served_probabilities(str(tmp_path / "folder"),
                                             photos[1]), expected)


def test_a_hugging_face_config_crops_the_hugging_face_way(tmp_path, photos):
  source = build.classifier(str(tmp_path / "model.onnx"), classes=3,
                            size=(7, 7), layout="NHWC")
  config = _write_json(tmp_path / "preprocessor_config.json", {
      "image_processor_type": "BitImageProcessor", "do_resize": True,
      "size": {"shortest_edge": 10}, "resample": 2, "do_center_crop": True,
      "crop_size": {"height": 7, "width": 7}, "do_rescale": True,
      "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": list(preprocessing.TORCH_MEAN),
      "image_std": list(preprocessing.TORCH_STD)})
  card, _ = adopt_quietly(source, tmp_path / "folder",
                          preprocessing_config=config)
  assert (card.preprocessing["crop_rounding"], card.input_scale) == (
      "floor", "torch")
  expected = author_probabilities(source, author_inputs(
      photos[1], "rgb", "NHWC", "torch", resize=10, crop=7,
      rounding="floor"), None, False)
  assert_same_as_author(served_probabilities(str(tmp_path / "folder"),
                                             photos[1]), expected)
  # Some photos have an odd excess to crop, where torchvision's rounding
  # starts a pixel later: the check above tells the two apart.
  assert not np.array_equal(
      author_inputs(photos[1], "rgb", "NHWC", "torch", resize=10, crop=7,
                    rounding="floor"),
      author_inputs(photos[1], "rgb", "NHWC", "torch", resize=10, crop=7))


def _adopt_cli(capsys, *argv):
  """model.adopt's main: (exit code, stderr lines)."""
  code = adopt.main(list(argv))
  error = capsys.readouterr().err
  return code, error.splitlines()


def _refused(capsys, source, out, *flags) -> str:
  code, lines = _adopt_cli(capsys, source, "--output", str(out),
                           "--class_names", ",".join(CLASSES), *flags)
  assert code == 2, lines
  assert len(lines) == 1 and lines[0].startswith("model.adopt: error: "), (
      lines)
  assert not os.path.exists(os.path.join(str(out), card_lib.CARD_FILE))
  return lines[0]


def test_refusals_are_one_line_with_exit_2(tmp_path, capsys):
  out = tmp_path / "out"
  plain = build.classifier(str(tmp_path / "plain.onnx"), classes=3)
  two_inputs = build.classifier(str(tmp_path / "two.onnx"), classes=3,
                                extra_input=True)
  two_outputs = build.classifier(str(tmp_path / "outputs.onnx"), classes=3,
                                 extra_output=True)
  custom = build.classifier(str(tmp_path / "custom.onnx"), classes=3,
                            custom_op_domain="com.example")
  contrib = build.classifier(str(tmp_path / "contrib.onnx"), classes=3,
                             custom_op_domain="com.microsoft")
  os.makedirs(tmp_path / "inner")
  outside = build.point_external_data(build.with_external_data(
      build.classifier(str(tmp_path / "inner" / "outside.onnx"), classes=3)),
                                      "../weights.bin")
  os.rename(tmp_path / "inner" / "weights.bin", tmp_path / "weights.bin")
  absolute = build.point_external_data(build.with_external_data(
      build.classifier(str(tmp_path / "absolute.onnx"), classes=3),
      "abs.bin"), str(tmp_path / "abs.bin"))
  dynamic = build.classifier(str(tmp_path / "dynamic.onnx"), classes=3,
                             dynamic_size=True)
  scale = ["--input_scale", "torch"]

  message = _refused(capsys, plain, out)
  assert "--input_scale torch" in message and "symmetric" in message
  for choice in preprocessing.INPUT_SCALES:
    assert choice in message
  assert "2 inputs (input, mask)" in _refused(capsys, two_inputs, out, *scale)
  assert "--output_name" in _refused(capsys, two_outputs, out, *scale)
  assert "no output 'scores'" in _refused(capsys, two_outputs, out, *scale,
                                          "--output_name", "scores")
  assert "'com.example'" in _refused(capsys, custom, out, *scale)
  assert "'com.microsoft'" in _refused(capsys, contrib, out, *scale)
  assert "outside the model's folder" in _refused(capsys, outside, out,
                                                  *scale)
  assert "outside the model's folder" in _refused(capsys, absolute, out,
                                                  *scale)
  assert "--image_size" in _refused(capsys, dynamic, out, *scale)
  assert "--layout NHWC contradicts" in _refused(capsys, plain, out, *scale,
                                                 "--layout", "NHWC")
  assert "--center_crop [6, 6] does not give the model's input size 8x8" in (
      _refused(capsys, plain, out, *scale, "--resize", "8",
               "--center_crop", "6"))
  assert "--resize 10 alone sets only the shorter side" in _refused(
      capsys, plain, out, *scale, "--resize", "10")
  assert "not of --decoder pillow" in _refused(
      capsys, plain, out, *scale, "--decoder", "pillow", "--resize", "8")
  assert "--class_names has 2 names" in _refused(
      capsys, plain, out, *scale, "--class_names", "a,b")
  (tmp_path / "text.onnx").write_text("name,label\nx,1\n")
  assert "is not a model this can read" in _refused(
      capsys, str(tmp_path / "text.onnx"), out, *scale)
  # The one that passes writes the folder.
  code, lines = _adopt_cli(capsys, plain, "--output", str(out),
                           "--class_names", ",".join(CLASSES), *scale)
  assert code == 0 and not lines


def test_an_onnx_source_and_its_data_are_never_replaced(tmp_path, capsys):
  """Fails on the code before the fix: `DIR/model.onnx --output DIR`
  deleted the source before failing."""
  folder = tmp_path / "folder"
  folder.mkdir()
  source = build.with_external_data(build.classifier(
      str(folder / card_lib.ONNX_FILE), classes=3))
  before = {name: (folder / name).read_bytes()
            for name in os.listdir(folder)}
  assert sorted(before) == [card_lib.ONNX_FILE, "weights.bin"]
  for out in (folder, tmp_path):
    assert "holds the source" in _refused(capsys, source, out,
                                          "--input_scale", "torch")
    assert {name: (folder / name).read_bytes()
            for name in os.listdir(folder)} == before


def test_an_onnx_model_with_non_finite_outputs_is_refused(tmp_path, capsys):
  import onnx  # pylint: disable=import-outside-toplevel
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  path = build.classifier(str(tmp_path / "nan.onnx"), classes=3)
  model = onnx.load(path)
  for index, tensor in enumerate(model.graph.initializer):
    if tensor.name == "fc.bias":
      model.graph.initializer[index].CopyFrom(numpy_helper.from_array(
          np.full(3, np.nan, np.float32), "fc.bias"))
  onnx.save(model, path)
  assert "not finite" in _refused(capsys, path, tmp_path / "out",
                                  "--input_scale", "torch")


def test_without_the_onnx_package_adopting_names_the_extra(tmp_path, capsys,
                                                          monkeypatch):
  import model  # pylint: disable=import-outside-toplevel
  source = build.classifier(str(tmp_path / "model.onnx"), classes=3)
  # As in the slim install, where model/onnx_checks.py cannot import onnx.
  monkeypatch.setitem(sys.modules, "model.onnx_checks", None)
  monkeypatch.delattr(model, "onnx_checks", raising=False)
  message = _refused(capsys, source, tmp_path / "out", "--input_scale",
                     "torch")
  assert "pip install '.[onnx]'" in message


def test_preprocessing_config_contradictions_are_refused(tmp_path, capsys):
  source = build.classifier(str(tmp_path / "model.onnx"), classes=3)
  config = _write_json(tmp_path / "config.json", {"pretrained_cfg": {
      "input_size": [3, 8, 8], "crop_pct": 0.8, "mean": [0.5] * 3,
      "std": [0.5] * 3}})
  out = tmp_path / "out"
  with_config = ["--preprocessing_config", config]
  message = _refused(capsys, source, out, *with_config, "--input_scale",
                     "torch")
  assert "--input_scale torch contradicts config.json" in message
  assert "gives symmetric" in message
  assert "--center_crop 6,6 contradicts" in _refused(
      capsys, source, out, *with_config, "--center_crop", "6")
  assert "--interpolation bilinear contradicts" in _refused(
      capsys, source, out, *with_config, "--interpolation", "bilinear")
  assert "not of --decoder tensorflow" in _refused(
      capsys, source, out, *with_config, "--decoder", "tensorflow")
  larger = _write_json(tmp_path / "larger.json", {"pretrained_cfg": {
      "input_size": [3, 16, 16]}})
  message = _refused(capsys, source, out, "--preprocessing_config", larger)
  assert "contradicts" in message and "larger.json" in message
  assert "no such file" in _refused(capsys, source, out,
                                    "--preprocessing_config",
                                    str(tmp_path / "missing.json"))
  _write_json(tmp_path / "other.json", {"model": "resnet"})
  assert "neither a timm config" in _refused(
      capsys, source, out, "--preprocessing_config",
      str(tmp_path / "other.json"))
  # Flags the file agrees with, or leaves unset, are taken.
  code, _ = _adopt_cli(capsys, source, "--output", str(out), "--class_names",
                       ",".join(CLASSES), *with_config, "--input_scale",
                       "symmetric", "--resize", "10")
  assert code == 0
  card = card_lib.load_card(str(out))
  assert card.adopted["preprocessing_from"]["values"]["input_scale"] == (
      "config.json pretrained_cfg: mean, std")


def test_torchvision_normalize_numbers_given_as_pixel_units_are_refused(
    tmp_path, capsys):
  # An author's Normalize((0.1307,), (0.3081,)) copied as is: in pixel
  # units it would feed (x - 0.13) / 0.31, up to 827, and serve other labels.
  source = build.classifier(str(tmp_path / "model.onnx"), classes=3)
  out = tmp_path / "out"
  custom = ("--input_scale", "custom")
  message = _refused(capsys, source, out, *custom, "--input_mean",
                     "0.1307,0.1307,0.1307", "--input_std",
                     "0.3081,0.3081,0.3081")
  assert "pixel units" in message
  assert message.endswith("pass --input_scale custom --input_mean "
                          "33.3285,33.3285,33.3285 --input_std "
                          "78.5655,78.5655,78.5655"), message
  # Numbers that are a named scale are answered with it, as
  # --preprocessing_config reads them (torch's arithmetic, not custom's),
  # with or without --input_scale custom.
  imagenet = ("--input_mean", "0.485,0.456,0.406",
              "--input_std", "0.229,0.224,0.225")
  for given in (custom, ()):
    message = _refused(capsys, source, out, *given, *imagenet)
    assert message.endswith("pass --input_scale torch"), message
  message = _refused(capsys, source, out, *custom, "--input_mean",
                     "0.5,0.5,0.5", "--input_std", "0.5,0.5,0.5")
  assert message.endswith("pass --input_scale symmetric"), message
  # Pixel units without --input_scale custom are refused naming it.
  message = _refused(capsys, source, out, "--input_mean",
                     "123.675,116.28,103.53", "--input_std",
                     "58.395,57.12,57.375")
  assert message.endswith("pass --input_scale custom"), message
  # Pixel units are taken, and so is a mean with a std of 1 (x - mean).
  for mean, std in (("123.675,116.28,103.53", "58.395,57.12,57.375"),
                    ("0.5,0.5,0.5", "1,1,1")):
    code, lines = _adopt_cli(capsys, source, "--output", str(out),
                             "--class_names", ",".join(CLASSES), *custom,
                             "--input_mean", mean, "--input_std", std)
    assert code == 0, lines
    with open(out / card_lib.CARD_FILE, encoding="utf-8") as handle:
      recipe = json.load(handle)["preprocessing"]
    assert recipe["input_mean"] == [float(v) for v in mean.split(",")]


def test_predict_serves_an_onnx_folder_with_the_onnx_engine(tmp_path, photos):
  source = build.classifier(str(tmp_path / "model.onnx"), classes=3, batch=1,
                            flatten="reshape")
  adopt_quietly(source, tmp_path / "folder", input_scale="torch", resize=10,
                center_crop=(8, 8))
  folder = str(tmp_path / "folder")
  for engine in ("auto", "onnx"):
    plan = preflight.check(config_lib.PredictConfig(
        photos[0], folder, str(tmp_path / "out"), engine=engine))
    assert plan.config.engine == "onnx"
    assert not engines.needs_tensorflow(plan.card, plan.config.engine)
  with pytest.raises(config_lib.ConfigError, match="holds no tflite model"):
    preflight.check(config_lib.PredictConfig(
        photos[0], folder, str(tmp_path / "out"), engine="tflite"))
  # A bare .onnx given to predict is pointed at model.adopt.
  with pytest.raises(config_lib.ConfigError, match="--input_scale torch"):
    preflight.check(config_lib.PredictConfig(photos[0], source,
                                             str(tmp_path / "out")))
  # Threads reach ONNX Runtime's intra-op pool.
  engine = engines.load_engine(folder, "onnx", threads=1)
  assert engine._session.get_session_options().intra_op_num_threads == 1  # pylint: disable=protected-access


@pytest.mark.slow
def test_beam_run_from_files_and_raw_pixel_shards_gives_the_authors_labels(
    tmp_path, photos):
  from tools import make_shards  # pylint: disable=import-outside-toplevel
  source = build.classifier(str(tmp_path / "model.onnx"), classes=3, batch=1,
                            flatten="dynamo")
  card, _ = adopt_quietly(source, tmp_path / "folder", input_scale="torch",
                          resize=10, center_crop=(8, 8))
  folder = str(tmp_path / "folder")
  expected = author_probabilities(source, author_inputs(
      photos[1], "rgb", "NCHW", "torch", resize=10, crop=8), 1, False)
  files = predict.run(config_lib.PredictConfig(
      photos[0], folder, str(tmp_path / "files"), write_probabilities=True),
                      ["--runner", "DirectRunner"])
  assert files["counts"]["predictions"] == 12 and files["accounted"]
  rows = {row["id"]: row for row in listed_rows(
      tmp_path / "files", "predictions")}
  assert {row["engine"] for row in rows.values()} == {"onnx"}
  assert {row["model_id"] for row in rows.values()} == {card.model_id}
  served = np.array([rows[path]["probabilities"] for path in photos[1]])
  assert_same_as_author(served, expected)
  # Raw pixels through the card's decoder make the same rows.
  make_shards.make_shards(photos[0], str(tmp_path / "shards"), card=card)
  shards = predict.run(config_lib.PredictConfig(
      str(tmp_path / "shards" / "*.parquet"), folder,
      str(tmp_path / "from_shards"), label_column="label"),
                       ["--runner", "DirectRunner"])
  assert shards["counts"]["predictions"] == 12
  for row in listed_rows(tmp_path / "from_shards", "predictions"):
    assert row["label"] == rows[row["id"]]["label"]
    assert abs(row["confidence"] - rows[row["id"]]["confidence"]) < 1e-6


def _run(python, module, *args, env=None):
  return subprocess.run([python, "-m", module, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600,
                        check=False, env=env)


def _blocked_env(tmp_path):
  site = tmp_path / "site"
  site.mkdir(exist_ok=True)
  (site / "sitecustomize.py").write_text(TENSORFLOW_BLOCKER)
  return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), REPO]))


@pytest.mark.slow
def test_adopted_and_served_where_tensorflow_cannot_be_imported(tmp_path,
                                                                photos):
  """model.adopt with TensorFlow blocked, then beam_jobs.predict from the
  slim install (Beam, LiteRT, ONNX Runtime; no TensorFlow, no onnx), then
  query and report on the results."""
  pytest.importorskip("duckdb")  # The query tool needs the tools extra.
  pytest.importorskip("matplotlib")
  from tools import query  # pylint: disable=import-outside-toplevel
  from tools import report  # pylint: disable=import-outside-toplevel
  if not os.path.exists(SLIM_PYTHON):
    pytest.fail(f"{SLIM_PYTHON} is missing: ./run_tests.sh creates it "
                "(scripts/ensure_venv.sh)")
  probe = _run(SLIM_PYTHON, "tensorflow")
  assert "No module named tensorflow" in probe.stderr, probe.stderr
  env = _blocked_env(tmp_path)
  outputs = {}
  for name, arguments, flags, recipe in (
      ("rgb", {"batch": 1, "flatten": "dynamo_flatten"},
       ["--input_scale", "torch", "--resize", "10", "--center_crop", "8"],
       {"normalize": "torch", "resize": 10, "crop": 8}),
      ("gray", {"layout": "NHWC", "channels": 1, "softmax": True},
       ["--input_scale", "symmetric", "--resize", "9", "--center_crop", "8",
        "--interpolation", "bicubic"],
       {"normalize": "symmetric", "resize": 9, "crop": 8,
        "interpolation": "bicubic"})):
    source = build.classifier(str(tmp_path / f"{name}.onnx"), classes=3,
                              **arguments)
    adopted = _run(sys.executable, "model.adopt", source, "--output",
                   str(tmp_path / name), "--class_names", ",".join(CLASSES),
                   *flags, env=env)
    assert adopted.returncode == 0, adopted.stderr[-3000:]
    output = str(tmp_path / f"out_{name}")
    served = _run(SLIM_PYTHON, "beam_jobs.predict", "--input", photos[0],
                  "--model", str(tmp_path / name), "--output", output,
                  "--write_probabilities", "--inference_threads", "1")
    assert served.returncode == 0, served.stderr[-3000:]
    assert "Traceback" not in served.stderr
    rows = {row["id"]: row for row in listed_rows(
        output, "predictions")}
    color_mode = "grayscale" if arguments.get("channels") == 1 else "rgb"
    expected = author_probabilities(source, author_inputs(
        photos[1], color_mode, arguments.get("layout", "NCHW"), **recipe),
                                    arguments.get("batch"),
                                    arguments.get("softmax"))
    assert_same_as_author(
        np.array([rows[path]["probabilities"] for path in photos[1]]),
        expected)
    assert [rows[path]["label"] for path in photos[1]] == [
        CLASSES[k] for k in expected.argmax(1)]
    outputs[name] = output
  assert query.main([outputs["rgb"], "accuracy", "--json"]) == 0
  assert query.main([outputs["rgb"], "compare", outputs["gray"]]) == 0
  report_dir = str(tmp_path / "report")
  assert report.main([outputs["gray"], "--out", report_dir]) == 0
  assert os.path.exists(os.path.join(report_dir, "index.html"))
  manifest = json.loads((tmp_path / "out_rgb" / "_run.json").read_text())
  assert manifest["counts"]["predictions"] == 12


@pytest.mark.slow
def test_dataflow_dry_run_of_an_onnx_folder_needs_no_tensorflow(tmp_path,
                                                                photos):
  needs_the_gcp_extra()
  source = build.classifier(str(tmp_path / "model.onnx"), classes=3)
  adopt_quietly(source, tmp_path / "folder", input_scale="torch", resize=10,
                center_crop=(8, 8))
  result = _run(sys.executable, "beam_jobs.predict", "--input",
                "gs://fake-bucket/photos/", "--model",
                str(tmp_path / "folder"), "--output",
                "gs://fake-bucket/out", "--engine", "onnx",
                "--inference_threads", "1", *DATAFLOW_ARGS,
                env=_blocked_env(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "dry run: the Dataflow job was built"), result.stdout
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_adopt_cli_process_refuses_in_one_line_without_a_traceback(
    tmp_path):
  source = build.classifier(str(tmp_path / "model.onnx"), classes=3,
                            extra_output=True)
  result = _run(sys.executable, "model.adopt", source, "--output",
                str(tmp_path / "out"), "--class_names", ",".join(CLASSES),
                "--input_scale", "torch", env=_blocked_env(tmp_path))
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(errors) == 1 and "--output_name" in errors[0], result.stderr
  assert "Traceback" not in result.stderr
