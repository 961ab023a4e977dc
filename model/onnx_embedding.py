"""An ONNX classifier's embedding as a second output of the served graph.

`default_tensor` finds the tensor that feeds the classifier: walking back
from the scores output over what only passes values through (Softmax,
Identity, Cast, Dropout, a bias Add), to the final Gemm or MatMul node,
whose data input it is (`view` or `/Reshape_output_0` in what
`torch.onnx.export` writes for torchvision-style models). `attach` adds it
as a graph output, runs the served graph, and checks the embedding against
the source graph run in its own (fixed) batch.
"""

import dataclasses
from typing import Optional

import numpy as np
import onnx

from model import embeddings
from model import engines
from model import onnx_checks
from model.embeddings import EmbeddingError

# Nodes the walk back from the output passes over: they change no feature.
_PASS_THROUGH = ("Softmax", "LogSoftmax", "Identity", "Cast", "Dropout")
_CLASSIFIERS = ("Gemm", "MatMul")
# Nodes walked at most, so a cyclic or odd graph cannot keep the walk going.
_MAX_STEPS = 32


def _constants(graph: onnx.GraphProto) -> set:
  names = {tensor.name for tensor in graph.initializer}
  names.update(node.output[0] for node in graph.node
               if node.op_type == "Constant" and node.output)
  return names


def default_tensor(model: onnx.ModelProto, output: str) -> tuple:
  """(tensor name, why) of the input of the final Gemm or MatMul before
  `output`; (None, why not) when the walk finds none."""
  graph = model.graph
  producers = {name: node for node in graph.node for name in node.output}
  constants = _constants(graph)
  name = output
  for _ in range(_MAX_STEPS):
    node = producers.get(name)
    if node is None:
      break
    data = [value for value in node.input if value and value not in constants]
    if node.op_type in _PASS_THROUGH and data:
      name = data[0]
    elif node.op_type == "Add" and len(data) == 1:
      name = data[0]  # the bias of a MatMul
    elif node.op_type in _CLASSIFIERS and len(data) == 1:
      return data[0], (f"the input of the final {node.op_type} node "
                       f"{node.name or node.output[0]!r}")
    else:
      break
  return None, (f"no Gemm or MatMul with constant weights was found before "
                f"the output {output!r}; pass --embedding_layer TENSOR")


def with_output(model_bytes: bytes, tensor: str) -> bytes:
  """The graph with `tensor` as an extra output (its type from the graph's
  shape inference, float when unknown)."""
  model = onnx.ModelProto()
  model.ParseFromString(model_bytes)
  graph = model.graph
  produced = {name for node in graph.node for name in node.output}
  outputs = [value.name for value in graph.output]
  if tensor in outputs:
    raise EmbeddingError(f"--embedding_layer {tensor} is the classifier's "
                         "output, not the features that feed it")
  if tensor not in produced:
    inputs = {value.name for value in graph.input}
    what = ("the graph's input" if tensor in inputs else
            "not a tensor any node of the graph produces")
    raise EmbeddingError(f"--embedding_layer {tensor}: {what}")
  elem_type = _elem_type(model, tensor)
  graph.output.append(onnx.helper.make_tensor_value_info(tensor, elem_type,
                                                         None))
  return model.SerializeToString()


def _elem_type(model: onnx.ModelProto, tensor: str) -> int:
  try:
    inferred = onnx.shape_inference.infer_shapes(model)
  except Exception:  # pylint: disable=broad-except
    return onnx.TensorProto.FLOAT
  for value in list(inferred.graph.value_info) + list(inferred.graph.output):
    if value.name == tensor and value.type.tensor_type.elem_type:
      return value.type.tensor_type.elem_type
  return onnx.TensorProto.FLOAT


def attach(source, card, name: Optional[str], check_pixels: np.ndarray,
           checked_on: str) -> tuple:
  """(the OnnxClassifier serving `name` or the default tensor as a second
  output, the card's embedding record, why that tensor); (the classifier
  unchanged, None, why none) when there is no default guess. Raises
  EmbeddingError when a named tensor cannot serve or the embedding
  disagrees with the source."""
  classifier = source.model
  output = classifier.record["output"]
  served = onnx.ModelProto()
  served.ParseFromString(classifier.model_bytes)
  chosen = "--embedding_layer"
  if name is None:
    name, chosen = default_tensor(served, output)
    if name is None:
      return classifier, None, chosen
  served_bytes = with_output(classifier.model_bytes, name)
  record = {"layer": name, "dimension": None, "chosen": chosen,
            "engines": {"onnx": {"scores": output, "embedding": name}}}
  probe = check_pixels[:embeddings.CHECK_ROWS]
  trial = dataclasses.replace(card, embedding=record, engines=["onnx"])
  engine = engines.OnnxEngine(trial, model_content=served_bytes)
  try:
    _, values = engine.outputs_and_embeddings(probe)
  except Exception as error:  # pylint: disable=broad-except
    raise EmbeddingError(f"ONNX Runtime cannot serve {name!r} as an output: "
                         f"{onnx_checks.first_line(error)}") from None
  shape = [int(d) for d in np.shape(values)]
  if len(shape) < 2 or shape[0] != len(probe):
    raise EmbeddingError(f"the tensor {name!r} has shape {shape} for a batch "
                         f"of {len(probe)}; an embedding has a row per image")
  reference = _source_values(source, name, engine.model_inputs(probe),
                             card.preprocessing["layout"])
  check = embeddings.difference(reference.reshape(len(probe), -1),
                                np.reshape(values, (len(probe), -1)))
  if not check.pop("within"):
    raise EmbeddingError(
        f"the served {name!r} differs from the source graph's by up to "
        f"{check['max_difference']:.3g} (allowed: "
        f"{embeddings.EMBEDDING_TOLERANCE:g} x {check['scale']:.3g})")
  record["dimension"] = int(np.prod(shape[1:]))
  if len(shape) > 2:
    record["flattened_from"] = ["batch"] + shape[1:]
  batch = classifier.record["input"]["shape"][0]
  record["engines"]["onnx"].update(
      check, images=len(probe), checked_on=checked_on,
      against=f"the source graph, run in its own batch ({batch})")
  return (dataclasses.replace(classifier, model_bytes=served_bytes), record,
          chosen)


def _source_values(source, name: str, model_inputs: np.ndarray,
                   layout: str) -> np.ndarray:
  """The tensor `name` of the source graph as its author runs it: every
  output but it dropped, in batches of its fixed batch size."""
  model = onnx_checks.read_model(source.path).proto
  del model.graph.output[:]
  model.graph.output.append(onnx.helper.make_tensor_value_info(
      name, _elem_type(model, name), None))
  session = engines.onnx_session(model.SerializeToString())
  feed_input = session.get_inputs()[0]
  dtype = engines.ONNX_INPUT_TYPES.get(feed_input.type, np.float32)
  feed = engines.onnx_layout(model_inputs, layout, dtype)
  batch = feed_input.shape[0] if isinstance(feed_input.shape[0], int) else (
      len(feed))
  return np.concatenate([
      np.asarray(session.run([name], {feed_input.name:
                                      feed[start:start + batch]})[0],
                 np.float64)
      for start in range(0, len(feed), batch)])
