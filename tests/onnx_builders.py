"""Tiny PyTorch-style ONNX classifiers, built with `onnx.helper` (no torch).

`classifier(path, ...)` writes what `torch.onnx.export` writes for a small
convolutional or MLP classifier: Conv, Relu, a flatten (Flatten, a Reshape
to a constant `[batch, -1]` as `x.view(1, -1)` exports, or the
Shape-Gather-Concat-Reshape of `x.view(x.size(0), -1)` with a dynamic
batch), Gemm with transB, and an optional Softmax. Variants cover NHWC
input, grayscale, a (batch, H, W) input, dynamic height and width, several
inputs or outputs, ops in other domains, and weights in external data.
"""

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper
from onnx import numpy_helper

OPSET = 17
FEATURES = 4  # Conv output channels


def _tensor(rng, name, shape, scale=0.3):
  return numpy_helper.from_array(
      (rng.standard_normal(shape) * scale).astype(np.float32), name)


def classifier(path: str, layout: str = "NCHW", channels: int = 3,
               size: tuple = (8, 8), classes: int = 5, batch=None,
               flatten: str = "flatten", softmax: bool = False,
               conv: bool = True, seed: int = 0, dynamic_size: bool = False,
               batch_mixing: bool = False, constant_concat: bool = False,
               extra_input: bool = False, extra_output: bool = False,
               initializers_as_inputs: bool = False,
               input_type: int = TensorProto.FLOAT,
               custom_op_domain: str = "") -> str:
  """Writes a classifier to `path` and returns `path`.

  batch: None for a symbolic "batch" axis, or the fixed batch size.
  flatten: "flatten", "reshape" (constant [batch, -1] initializer),
    "reshape_node" (the same from a Constant node), "dynamo" ([batch,
    features] with allowzero, as torch 2.9+ exports `x.view(1, -1)`),
    "dynamo_flatten" ([batch, -1] with allowzero, its `x.flatten(1)`), or
    "shape" (x.size(0)).
  batch_mixing: subtracts the batch mean first (a BatchNorm exported in
    training mode): a batch of N is not N single runs.
  constant_concat: concatenates a constant (1, 3) row to the features, as a
    class token does: a larger batch cannot run.
  """
  rng = np.random.default_rng(seed)
  height, width = size
  batch_dim = "batch" if batch is None else batch
  spatial = ["height", "width"] if dynamic_size else [height, width]
  if layout == "NCHW":
    input_shape = [batch_dim, channels] + spatial
  elif layout == "NHWC":
    input_shape = [batch_dim] + spatial + [channels]
  else:  # (batch, H, W), grayscale with no channel axis
    input_shape = [batch_dim] + spatial
  nodes, weights = [], []
  current = "input"
  if input_type == TensorProto.FLOAT16:
    nodes.append(helper.make_node("Cast", [current], ["input_f32"],
                                  to=TensorProto.FLOAT))
    current = "input_f32"
  if layout == "NHWC":
    nodes.append(helper.make_node("Transpose", [current], ["nchw"],
                                  perm=[0, 3, 1, 2]))
    current = "nchw"
  elif layout == "NHW":
    weights.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    nodes.append(helper.make_node("Unsqueeze", [current, "axis1"], ["nchw"]))
    current = "nchw"
  if batch_mixing:
    nodes.append(helper.make_node("ReduceMean", [current], ["batch_mean"],
                                  axes=[0], keepdims=1))
    nodes.append(helper.make_node("Sub", [current, "batch_mean"],
                                  ["centred"]))
    current = "centred"
  if custom_op_domain:
    nodes.append(helper.make_node("Mystery", [current], ["mystery"],
                                  domain=custom_op_domain))
    current = "mystery"
  if conv:
    weights += [_tensor(rng, "conv.weight", [FEATURES, channels, 3, 3]),
                _tensor(rng, "conv.bias", [FEATURES])]
    nodes.append(helper.make_node("Conv", [current, "conv.weight",
                                           "conv.bias"], ["conv"],
                                  pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
    nodes.append(helper.make_node("Relu", ["conv"], ["relu"]))
    current, depth = "relu", FEATURES
  else:
    depth = channels
  if dynamic_size:
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"]))
    current, features = "pooled", depth
  else:
    features = depth * height * width
  if flatten == "flatten":
    nodes.append(helper.make_node("Flatten", [current], ["flat"], axis=1))
  elif flatten == "reshape":
    weights.append(numpy_helper.from_array(
        np.array([batch or 1, -1], np.int64), "flat_shape"))
    nodes.append(helper.make_node("Reshape", [current, "flat_shape"],
                                  ["flat"]))
  elif flatten in ("dynamo", "dynamo_flatten"):
    # torch.onnx.export's default exporter since torch 2.9, allowzero set:
    # x.view(1, -1) with the target resolved, or x.flatten(1) as [1, -1].
    width = features if flatten == "dynamo" else -1
    weights.append(numpy_helper.from_array(
        np.array([batch or 1, width], np.int64), "flat_shape"))
    nodes.append(helper.make_node("Reshape", [current, "flat_shape"],
                                  ["flat"], allowzero=1))
  elif flatten == "reshape_node":
    nodes.append(helper.make_node(
        "Constant", [], ["flat_shape"], value=numpy_helper.from_array(
            np.array([batch or 1, -1], np.int64))))
    nodes.append(helper.make_node("Reshape", [current, "flat_shape"],
                                  ["flat"]))
  else:  # x.view(x.size(0), -1)
    weights += [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                numpy_helper.from_array(np.array([0], np.int64), "axes0"),
                numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    nodes += [helper.make_node("Shape", [current], ["shape"]),
              helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
              helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
              helper.make_node("Concat", ["n1", "minus1"], ["flat_shape"],
                               axis=0),
              helper.make_node("Reshape", [current, "flat_shape"], ["flat"])]
  current = "flat"
  if constant_concat:
    weights.append(_tensor(rng, "token", [1, 3]))
    nodes.append(helper.make_node("Concat", ["token", current], ["tokens"],
                                  axis=1))
    current, features = "tokens", features + 3
  weights += [_tensor(rng, "fc.weight", [classes, features], 0.5),
              _tensor(rng, "fc.bias", [classes])]
  nodes.append(helper.make_node("Gemm", [current, "fc.weight", "fc.bias"],
                                ["logits"], transB=1))
  output = "logits"
  if softmax:
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"],
                                  axis=1))
    output = "probabilities"
  inputs = [helper.make_tensor_value_info("input", input_type, input_shape)]
  if extra_input:
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT,
                                                [batch_dim, classes]))
    nodes.append(helper.make_node("Mul", [output, "mask"], ["masked"]))
    output = "masked"
  outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT,
                                           [batch_dim, classes])]
  if extra_output:
    outputs.append(helper.make_tensor_value_info(
        "flat", TensorProto.FLOAT, [batch_dim, features]))
  # torch.onnx.export writes shape hints for intermediate values too.
  value_info = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                              [batch_dim, classes])]
  if initializers_as_inputs:
    inputs += [helper.make_tensor_value_info(
        w.name, w.data_type, list(w.dims)) for w in weights]
  graph = helper.make_graph(nodes, "classifier", inputs, outputs, weights,
                            value_info=value_info if output != "logits"
                            else None)
  opsets = [helper.make_opsetid("", OPSET)]
  if custom_op_domain:
    opsets.append(helper.make_opsetid(custom_op_domain, 1))
  model = helper.make_model(graph, opset_imports=opsets,
                            producer_name="pytorch", producer_version="2.9")
  model.ir_version = 3 if initializers_as_inputs else 8
  onnx.save_model(model, path)
  return path


def with_external_data(path: str, location: str = "weights.bin") -> str:
  """Moves the model's weights at `path` into an external file beside it."""
  model = onnx.load_model(path)
  onnx.save_model(model, path, save_as_external_data=True,
                  all_tensors_to_one_file=True, location=location,
                  size_threshold=0)
  return path


def point_external_data(path: str, location: str) -> str:
  """Rewrites every external-data location in the model at `path`."""
  model = onnx.load_model(path, load_external_data=False)
  for tensor in model.graph.initializer:
    for entry in tensor.external_data:
      if entry.key == "location":
        entry.value = location
  with open(path, "wb") as handle:
    handle.write(model.SerializeToString())
  return path


def author_outputs(path: str, inputs: np.ndarray, batch=None) -> np.ndarray:
  """What the author gets: ONNX Runtime's own session on the source file
  (default options), fed `inputs` in the graph's layout, in batches of its
  fixed size."""
  import onnxruntime  # pylint: disable=import-outside-toplevel
  session = onnxruntime.InferenceSession(path,
                                         providers=["CPUExecutionProvider"])
  name = session.get_inputs()[0].name
  step = batch or len(inputs)
  return np.concatenate([session.run(None, {name: inputs[i:i + step]})[0]
                         for i in range(0, len(inputs), step)])
