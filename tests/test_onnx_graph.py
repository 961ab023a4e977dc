"""ONNX sources: the checks (model.onnx_checks), what the graph says
(model.onnx_graph) and the onnx engine, on tiny PyTorch-style graphs built
in the test (tests/onnx_builders.py). No torch, no TensorFlow."""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # model.adopt's onnx extra.
from onnx import TensorProto  # pylint: disable=wrong-import-position
from onnx import helper  # pylint: disable=wrong-import-position

from model import card as card_lib
from model import engines
from model import onnx_checks
from model import onnx_graph
from tests import onnx_builders as build

MEAN = np.asarray((0.485, 0.456, 0.406), np.float32)
STD = np.asarray((0.229, 0.224, 0.225), np.float32)
ROWS = 8


def author_inputs(pixels: np.ndarray, layout: str, input_scale: str,
                  dtype=np.float32) -> np.ndarray:
  """The author's feeding, written out: ToTensor() (x / 255) and, for
  "torch", Normalize(ImageNet mean, std), in the graph's layout."""
  x = pixels.astype(np.float32) / np.float32(255)
  if input_scale == "torch":
    x = (x - MEAN) / STD
  if layout == "NCHW":
    x = x.transpose(0, 3, 1, 2)
  elif layout == "NHW":
    x = x[..., 0]
  return np.ascontiguousarray(x, dtype=dtype)


def serve(classifier, folder, input_scale: str, threads: int = 1):
  """The onnx engine on a folder holding the served bytes and a card."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, card_lib.ONNX_FILE), "wb") as handle:
    handle.write(classifier.model_bytes)
  fields = classifier.card_fields()
  card = card_lib.ModelCard(
      model_id="test", architecture="adopted",
      class_names=[f"class{i}" for i in range(classifier.num_classes)],
      input_shape=fields["input_shape"], color_mode=fields["color_mode"],
      output=fields["output"], engines=["onnx"], adopted=fields["adopted"],
      preprocessing={"decoder": "torchvision", "input_scale": input_scale,
                     **fields["preprocessing"]})
  return engines.load_engine(str(folder), "onnx", threads, card=card)


def one_line_error(call, *args, **kwargs) -> str:
  with pytest.raises(ValueError) as raised:
    call(*args, **kwargs)
  message = str(raised.value)
  assert "\n" not in message and message
  return message


# (builder arguments, layout, batch mode, output kind)
SERVED = {
    "nchw_dynamic_logits": ({}, "NCHW", "dynamic", "logits"),
    "nchw_dynamic_softmax": ({"softmax": True}, "NCHW", "dynamic",
                             "probabilities"),
    "nchw_view_size0": ({"flatten": "shape"}, "NCHW", "dynamic", "logits"),
    "nchw_fixed_view_1": ({"batch": 1, "flatten": "reshape"}, "NCHW",
                          "made_dynamic", "logits"),
    "nchw_fixed_view_constant_node": (
        {"batch": 1, "flatten": "reshape_node", "softmax": True}, "NCHW",
        "made_dynamic", "probabilities"),
    "nchw_fixed_flatten": ({"batch": 1}, "NCHW", "made_dynamic", "logits"),
    "nchw_fixed_dynamo_view": ({"batch": 1, "flatten": "dynamo"}, "NCHW",
                               "made_dynamic", "logits"),
    "nchw_fixed_dynamo_flatten": ({"batch": 1, "flatten": "dynamo_flatten"},
                                  "NCHW", "made_dynamic", "logits"),
    "nchw_fixed_batch_4": ({"batch": 4, "flatten": "reshape"}, "NCHW",
                           "made_dynamic", "logits"),
    "nchw_fixed_batch_statistics": ({"batch": 1, "batch_mixing": True},
                                    "NCHW", "one_at_a_time", "logits"),
    "nchw_fixed_class_token": ({"batch": 1, "constant_concat": True}, "NCHW",
                               "one_at_a_time", "logits"),
    "nhwc_fixed": ({"layout": "NHWC", "batch": 1, "flatten": "reshape"},
                   "NHWC", "made_dynamic", "logits"),
    "nhwc_dynamic_softmax": ({"layout": "NHWC", "softmax": True}, "NHWC",
                             "dynamic", "probabilities"),
    "grayscale_mlp_fixed": ({"channels": 1, "conv": False, "size": (28, 28),
                             "classes": 10, "batch": 1}, "NCHW",
                            "made_dynamic", "logits"),
    "grayscale_no_channel_axis": ({"layout": "NHW", "channels": 1,
                                   "size": (6, 10)}, "NHW", "dynamic",
                                  "logits"),
    "old_opset_initializers_as_inputs": ({"initializers_as_inputs": True,
                                          "batch": 1}, "NCHW",
                                         "made_dynamic", "logits"),
    "float16_input": ({"input_type": TensorProto.FLOAT16}, "NCHW", "dynamic",
                      "logits"),
}


@pytest.mark.parametrize("name", sorted(SERVED))
def test_served_graph_gives_what_onnx_runtime_gives_the_author(name, tmp_path):
  arguments, layout, batch, output_kind = SERVED[name]
  source = build.classifier(str(tmp_path / "source.onnx"), **arguments)
  classifier = onnx_graph.read_classifier(source)
  assert (classifier.layout, classifier.batch, classifier.output_kind) == (
      layout, batch, output_kind)
  height, width, channels = classifier.input_shape
  input_scale = "torch" if channels == 3 else "unit"
  engine = serve(classifier, tmp_path / "served", input_scale)
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (ROWS, height, width, channels)).astype(
      np.float32)
  dtype = (np.float16 if arguments.get("input_type") == TensorProto.FLOAT16
           else np.float32)
  expected = build.author_outputs(
      source, author_inputs(pixels, layout, input_scale, dtype),
      arguments.get("batch"))
  served = engine.outputs(pixels)
  assert served.shape == expected.shape == (ROWS, classifier.num_classes)
  np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(served.argmax(1), expected.argmax(1))
  if output_kind == "logits":
    np.testing.assert_allclose(engine.probabilities(pixels),
                               engines.softmax(expected.astype(np.float64)),
                               rtol=1e-5, atol=1e-7)


def test_the_source_bytes_are_served_when_nothing_changes(tmp_path):
  source = build.classifier(str(tmp_path / "source.onnx"))
  classifier = onnx_graph.read_classifier(source)
  with open(source, "rb") as handle:
    assert classifier.model_bytes == handle.read()


def test_a_fixed_batch_made_symbolic_runs_whole_batches(tmp_path):
  source = build.classifier(str(tmp_path / "source.onnx"), batch=1,
                            flatten="reshape")
  classifier = onnx_graph.read_classifier(source)
  served = onnx.load_model_from_string(classifier.model_bytes)
  assert served.graph.input[0].type.tensor_type.shape.dim[0].dim_param == (
      onnx_graph.BATCH_DIM)
  engine = serve(classifier, tmp_path / "served", "torch")
  assert not engine._one_at_a_time  # pylint: disable=protected-access
  calls = []
  run = engine._session.run  # pylint: disable=protected-access
  engine._session = type("Counting", (), {  # pylint: disable=protected-access
      "run": lambda self, *a: calls.append(a) or run(*a)})()
  engine.outputs(np.zeros((5, 8, 8, 3), np.float32))
  assert len(calls) == 1
  assert "agree" in classifier.record["batch_detail"]


def test_a_graph_that_mixes_its_batch_keeps_its_fixed_batch(tmp_path):
  source = build.classifier(str(tmp_path / "source.onnx"), batch=1,
                            batch_mixing=True)
  classifier = onnx_graph.read_classifier(source)
  assert classifier.batch == "one_at_a_time"
  assert "differ" in classifier.record["batch_detail"]
  with open(source, "rb") as handle:
    assert classifier.model_bytes == handle.read()


def test_a_fixed_batch_above_1_that_cannot_be_made_symbolic_is_refused(
    tmp_path):
  source = build.classifier(str(tmp_path / "source.onnx"), batch=2,
                            batch_mixing=True)
  message = one_line_error(onnx_graph.read_classifier, source)
  assert "fixed batch of 2" in message


def test_make_batch_symbolic_leaves_the_model_it_is_given_alone(tmp_path):
  source = build.classifier(str(tmp_path / "source.onnx"), batch=1,
                            flatten="reshape")
  model = onnx.load_model(source)
  before = model.SerializeToString()
  onnx_graph.make_batch_symbolic(model, "input", 1)
  assert model.SerializeToString() == before


def test_several_inputs_are_refused(tmp_path):
  source = build.classifier(str(tmp_path / "m.onnx"), extra_input=True)
  message = one_line_error(onnx_graph.read_classifier, source)
  assert "2 inputs (input, mask)" in message


def test_several_outputs_need_output_name(tmp_path):
  source = build.classifier(str(tmp_path / "m.onnx"), extra_output=True)
  message = one_line_error(onnx_graph.read_classifier, source)
  assert "output_name" in message and "logits, flat" in message
  assert "no output 'scores'" in one_line_error(
      onnx_graph.read_classifier, source, output_name="scores")
  classifier = onnx_graph.read_classifier(source, output_name="logits")
  served = onnx.load_model_from_string(classifier.model_bytes)
  assert [value.name for value in served.graph.output] == ["logits"]
  assert classifier.record["outputs"] == ["logits", "flat"]
  engine = serve(classifier, tmp_path / "served", "torch")
  pixels = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 3)).astype(
      np.float32)
  expected = build.author_outputs(source, author_inputs(pixels, "NCHW",
                                                        "torch"))
  np.testing.assert_allclose(engine.outputs(pixels), expected, rtol=1e-5,
                             atol=1e-6)


def test_huge_declared_input_sizes_are_refused_before_any_probe(tmp_path):
  # A hostile file declaring a 10^6 x 10^6 input, or a fixed batch of 10^9,
  # ended adopting in a MemoryError (exit 1) while making its probe rows.
  for axes, match in (((2, 3), "input of 1000000x1000000 pixels is above "
                       "the limit of 16,777,216 pixels"),
                      ((0,), "fixed batch of 1000000000: probing it takes")):
    path = build.classifier(str(tmp_path / "model.onnx"), classes=3,
                            batch=1)
    model = onnx.load(path)
    for axis in axes:
      model.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = (
          10**6 if len(axes) == 2 else 10**9)
    onnx.save(model, path)
    with pytest.raises(ValueError, match=match):
      onnx_graph.read_classifier(path)


def test_layout_from_the_graph_or_the_argument(tmp_path):
  # (batch, 3, 3, 3): channels could be first or last.
  source = build.classifier(str(tmp_path / "m.onnx"), size=(3, 3))
  assert "pass --layout" in one_line_error(onnx_graph.read_classifier, source)
  classifier = onnx_graph.read_classifier(source, layout="NCHW")
  assert (classifier.layout, classifier.record["layout_from"]) == (
      "NCHW", "argument")
  nchw = build.classifier(str(tmp_path / "nchw.onnx"))
  assert "contradicts" in one_line_error(onnx_graph.read_classifier, nchw,
                                         layout="NHWC")
  assert "contradicts" in one_line_error(onnx_graph.read_classifier, nchw,
                                         color_mode="grayscale")


def test_dynamic_height_and_width_need_image_size(tmp_path):
  source = build.classifier(str(tmp_path / "m.onnx"), dynamic_size=True)
  assert "image_size" in one_line_error(onnx_graph.read_classifier, source)
  classifier = onnx_graph.read_classifier(source, image_size=(12, 10))
  assert classifier.input_shape == [12, 10, 3]
  assert classifier.record["size_from"] == "argument"
  fixed = build.classifier(str(tmp_path / "fixed.onnx"))
  assert "contradicts" in one_line_error(onnx_graph.read_classifier, fixed,
                                         image_size=(9, 8))


def _write(model: onnx.ModelProto, path) -> str:
  onnx.save_model(model, str(path))
  return str(path)


def _tiny_model(input_shape, nodes, output_shape, input_type=TensorProto.FLOAT,
                initializers=()):
  graph = helper.make_graph(
      nodes, "g", [helper.make_tensor_value_info("x", input_type,
                                                 input_shape)],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
      list(initializers))
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_inputs_and_outputs_that_are_not_an_image_classifier_are_refused(
    tmp_path):
  flat = _write(_tiny_model(["batch", 784], [helper.make_node(
      "Relu", ["x"], ["y"])], ["batch", 784]), tmp_path / "flat.onnx")
  assert "not an image" in one_line_error(onnx_graph.read_classifier, flat)
  integers = _write(_tiny_model(["batch", 3, 4, 4], [helper.make_node(
      "Cast", ["x"], ["y"], to=TensorProto.FLOAT)], ["batch", 3, 4, 4],
                                TensorProto.UINT8), tmp_path / "uint8.onnx")
  assert "UINT8" in one_line_error(onnx_graph.read_classifier, integers)
  image_out = _write(_tiny_model(["batch", 3, 4, 4], [helper.make_node(
      "Relu", ["x"], ["y"])], ["batch", 3, 4, 4]), tmp_path / "image.onnx")
  assert "(batch, classes)" in one_line_error(onnx_graph.read_classifier,
                                              image_out)
  pooled = _write(_tiny_model(["batch", 3, 4, 4], [
      helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
      helper.make_node("Flatten", ["m"], ["y"])], [1, 48]),
                  tmp_path / "pooled.onnx")
  assert "for a batch of 3" in one_line_error(onnx_graph.read_classifier,
                                              pooled)
  zero = onnx.numpy_helper.from_array(np.zeros((1,), np.float32), "zero")
  nan = _write(_tiny_model(["batch", 3, 4, 4], [
      helper.make_node("Flatten", ["x"], ["f"]),
      helper.make_node("Div", ["f", "zero"], ["y"])], ["batch", 48],
                           initializers=[zero]), tmp_path / "nan.onnx")
  assert "not finite" in one_line_error(onnx_graph.read_classifier, nan)


@pytest.mark.parametrize("domain", ["com.example", "com.microsoft"])
def test_operators_outside_the_standard_domains_are_refused(tmp_path, domain):
  source = build.classifier(str(tmp_path / "m.onnx"),
                            custom_op_domain=domain)
  message = one_line_error(onnx_checks.read_model, source)
  assert f"'Mystery' from domain '{domain}'" in message


def test_a_function_the_model_defines_from_standard_ops_is_allowed(tmp_path):
  function = helper.make_function(
      "pkg.torch.local", "Gelu2", ["a"], ["b"],
      [helper.make_node("Relu", ["a"], ["b"])], [helper.make_opsetid("", 17)])
  model = _tiny_model(["batch", 3, 2, 2], [
      helper.make_node("Flatten", ["x"], ["f"]),
      helper.make_node("Gelu2", ["f"], ["y"], domain="pkg.torch.local")],
                      ["batch", 12])
  model.opset_import.append(helper.make_opsetid("pkg.torch.local", 1))
  model.functions.append(function)
  checked = onnx_checks.read_model(_write(model, tmp_path / "f.onnx"))
  assert checked.proto.functions[0].name == "Gelu2"
  function.node[0].domain = "com.example"
  model.functions[0].CopyFrom(function)
  assert "com.example" in one_line_error(
      onnx_checks.read_model, _write(model, tmp_path / "g.onnx"))


def test_external_data_beside_the_model_is_inlined(tmp_path, monkeypatch):
  source_dir = tmp_path / "source"
  source_dir.mkdir()
  source = build.with_external_data(build.classifier(
      str(source_dir / "m.onnx"), batch=1))
  assert os.path.getsize(source_dir / "weights.bin") > 0
  pixels = np.random.default_rng(3).integers(0, 256, (4, 8, 8, 3)).astype(
      np.float32)
  expected = build.author_outputs(source, author_inputs(pixels, "NCHW",
                                                        "torch"), 1)
  classifier = onnx_graph.read_classifier(source)
  assert classifier.record["external_data_bytes"] > 0
  served = onnx.load_model_from_string(classifier.model_bytes)
  assert not any(t.external_data for t in served.graph.initializer)
  # The folder needs nothing else: the source's weights are gone and the
  # engine runs from elsewhere.
  os.remove(source_dir / "weights.bin")
  monkeypatch.chdir(tmp_path)
  engine = serve(classifier, tmp_path / "served", "torch")
  np.testing.assert_allclose(engine.outputs(pixels), expected, rtol=1e-5,
                             atol=1e-6)


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
  inside = tmp_path / "models"
  inside.mkdir()
  source = build.with_external_data(build.classifier(str(inside / "m.onnx")))
  os.replace(inside / "weights.bin", tmp_path / "weights.bin")
  for location in ("../weights.bin", str(tmp_path / "weights.bin"),
                   "sub/../../weights.bin"):
    build.point_external_data(source, location)
    message = one_line_error(onnx_graph.read_classifier, source)
    assert "outside the model's folder" in message
  os.symlink(tmp_path / "weights.bin", inside / "link.bin")
  build.point_external_data(source, "link.bin")
  assert "outside the model's folder" in one_line_error(
      onnx_checks.read_model, source)
  build.point_external_data(source, "missing.bin")
  assert "not a file beside" in one_line_error(onnx_checks.read_model,
                                               source)


def test_the_engine_reads_no_external_file_whatever_the_bytes_say(
    tmp_path, monkeypatch):
  source = build.with_external_data(build.classifier(str(tmp_path /
                                                         "m.onnx")))
  monkeypatch.chdir(tmp_path)  # weights.bin is in the working directory
  classifier = onnx_graph.read_classifier(source)
  external = dataclass_replace(classifier, model_bytes=open(source,
                                                            "rb").read())
  message = one_line_error(serve, external, tmp_path / "served", "torch")
  assert "ONNX Runtime cannot load" in message


def dataclass_replace(instance, **changes):
  import dataclasses  # pylint: disable=import-outside-toplevel
  return dataclasses.replace(instance, **changes)


def test_files_that_are_not_onnx_are_refused_before_parsing(tmp_path):
  cases = {"empty.onnx": b"", "zip.onnx": b"PK\x03\x04" + bytes(60),
           "tflite.onnx": b"\x1c\x00\x00\x00TFL3" + bytes(40),
           # A SavedModel's saved_model.pb: field 1 varint, field 2 bytes.
           "saved_model.onnx": b"\x08\x01\x12\x03abc",
           "noise.onnx": np.random.default_rng(4).bytes(300)}
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
    message = one_line_error(onnx_checks.read_model, str(tmp_path / name))
    assert "is not an ONNX model" in message, name
  real = build.classifier(str(tmp_path / "real.bin"))
  with open(real, "rb") as handle:
    data = handle.read()
  assert onnx_checks.looks_like_onnx(data)
  assert onnx_checks.looks_like_onnx(data[:40], complete=False)
  assert not onnx_checks.looks_like_onnx(data[:40])
  assert "above the limit" in one_line_error(onnx_checks.read_model, real,
                                             max_bytes=100)


def test_check_onnx_model_shapes_compares_the_card_with_the_model(tmp_path):
  source = build.classifier(str(tmp_path / "m.onnx"), batch=1)
  classifier = onnx_graph.read_classifier(source)
  engine = serve(classifier, tmp_path / "served", "torch")
  card = engine.card
  engines.check_onnx_model_shapes(card, classifier.model_bytes)
  fewer = dataclass_replace(card, class_names=card.class_names[:-1])
  assert "5 classes" in one_line_error(engines.check_onnx_model_shapes, fewer,
                                       classifier.model_bytes)
  fixed = build.classifier(str(tmp_path / "fixed4.onnx"), batch=4)
  with open(fixed, "rb") as handle:
    assert "fixed batch of 4" in one_line_error(
        engines.OnnxEngine, card, model_content=handle.read())
  larger = dataclass_replace(card, input_shape=[9, 8, 3])
  assert "card says" in one_line_error(engines.check_onnx_model_shapes,
                                       larger, classifier.model_bytes)


def test_images_to_labels_as_the_author_gets_them(tmp_path):
  # A fixed-batch NCHW model fed 24x24 crops of Resize(27, bicubic): files
  # through the torchvision decoder and the onnx engine, against the
  # author's loop (PIL pipeline, ToTensor, Normalize, one image at a time).
  from model import torchvision_decoding  # pylint: disable=import-outside-toplevel
  from tests import test_torchvision_decoding as pil  # pylint: disable=import-outside-toplevel
  source = build.classifier(str(tmp_path / "m.onnx"), size=(24, 24),
                            classes=7, batch=1, flatten="reshape")
  classifier = onnx_graph.read_classifier(source)
  engine = serve(classifier, tmp_path / "served", "torch", threads=2)
  decoder = torchvision_decoding.TorchvisionDecoder(27, 24, "bicubic", "rgb",
                                                    24, 24)
  payloads = [pil.encoded(w, h, seed) for seed, (w, h) in enumerate(
      pil.SIZES + [(640, 480), (375, 500)])]
  pixels, good, errors = decoder.decode(payloads)
  assert not errors and len(good) == len(payloads)
  served = engine.probabilities(pixels.astype(np.float32))
  authors = np.stack([pil.reference(data, "rgb", 27, 24, "bicubic")
                      for data in payloads])
  logits = build.author_outputs(source, author_inputs(authors, "NCHW",
                                                      "torch"), 1)
  expected = engines.softmax(logits.astype(np.float64))
  np.testing.assert_array_equal(served.argmax(1), expected.argmax(1))
  np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
