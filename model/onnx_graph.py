"""What an ONNX classifier takes and gives, read from its graph.

`read_classifier(path, ...)` reads a checked source (`model.onnx_checks`),
then decides, from the graph where it can and from the caller's arguments
where it cannot:

* the one image input (an initializer listed as an input, as old opsets
  do, is not one); its layout: NCHW (PyTorch's) or NHWC from where the 1- or
  3-wide axis sits, (batch, H, W) for grayscale without a channel axis,
  and `layout` only when the graph cannot say; height and width, with
  `image_size` only where they are dynamic; float32 or float16;
* the batch axis. `torch.onnx.export(model, dummy, path)` fixes it at the
  dummy's batch (usually 1). It is made symbolic (inputs, outputs, shape
  hints, and Reshape targets that hard-code it) and the result is kept only
  if it is proven: a batch of probe rows through the rewritten graph must
  agree with the original run on its fixed batch. Otherwise a batch of 1 is
  served one image at a time, and any other fixed batch is refused;
* the one output, `(batch, classes)`: a graph with several takes
  `output_name`, and the served graph keeps that one only;
* whether the outputs are probabilities or logits, from the probe.

The result holds the bytes to serve (and hash for `model_id`): the source's
own bytes when nothing had to change, else the rewritten model with its
external data inlined. The card contract is `OnnxClassifier.card_fields()`.
"""

import dataclasses
import os
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from model import engines
from model import image_limits
from model import onnx_checks
from model import output_shapes

# The name given to a batch axis made symbolic.
BATCH_DIM = "batch"
# How the served model handles a batch (recorded in the card, for people;
# the engine reads the served graph itself).
BATCH_MODES = ("dynamic", "made_dynamic", "one_at_a_time")
# Rows run through a model to prove a rewritten batch axis and to tell
# logits from probabilities.
PROBE_ROWS = 3
# The most memory the probe rows of a fixed batch may take.
MAX_PROBE_BYTES = 1 << 30
# A rewritten graph agrees with the original when every output is within
# RTOL of it, plus ATOL times the largest output: batched and single runs
# may sum in another order, while a mixed-up batch differs by far more.
AGREEMENT_RTOL = 1e-4
AGREEMENT_ATOL = 1e-5
# Rows within this of summing to 1, and never below -this, are probabilities.
PROBABILITY_TOLERANCE = 1e-3
_INPUT_TYPES = {onnx.TensorProto.FLOAT: np.float32,
                onnx.TensorProto.FLOAT16: np.float16}
_OUTPUT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                 onnx.TensorProto.DOUBLE)
_COLOR_MODES = {1: "grayscale", 3: "rgb"}
_CHANNEL_AXIS = {"NCHW": 1, "NHWC": 3}


@dataclasses.dataclass(frozen=True)
class OnnxClassifier:
  """An ONNX classifier as it will be served."""
  model_bytes: bytes  # model.onnx as served and hashed
  layout: str  # card.ONNX_LAYOUTS
  height: int
  width: int
  color_mode: str  # "grayscale" or "rgb"
  num_classes: int
  output_kind: str  # "logits" or "probabilities"
  batch: str  # BATCH_MODES
  # What the graph said and where each decision came from, for the card.
  record: dict

  @property
  def input_shape(self) -> list:
    return [self.height, self.width, 1 if self.color_mode == "grayscale"
            else 3]

  def card_fields(self) -> dict:
    """The card fields the onnx engine serves from: `preprocessing.layout`
    is the only one it reads beyond those of every model (input_shape,
    color_mode, output); `adopted.onnx` records the rest."""
    return {"input_shape": self.input_shape, "color_mode": self.color_mode,
            "output": self.output_kind,
            "preprocessing": {"layout": self.layout},
            "adopted": {"onnx": self.record}}


def read_classifier(path: str, layout: Optional[str] = None,
                    image_size: Optional[tuple] = None,
                    color_mode: Optional[str] = None,
                    output_name: Optional[str] = None,
                    probe_inputs: Optional[np.ndarray] = None
                   ) -> OnnxClassifier:
  """Reads, checks and prepares the ONNX classifier at `path`.

  `layout`, `image_size` (height, width) and `color_mode` are needed only
  where the graph cannot say, and refused where they contradict it.
  `probe_inputs` are model inputs (N, H, W, C), already scaled; by default
  seeded normal noise, the range of normalised images. Raises ValueError
  with one line for anything refused.
  """
  checked = onnx_checks.read_model(path)
  model, where = checked.proto, os.path.basename(path)
  changed = checked.inlined_bytes > 0
  image_input = _image_input(model.graph, where)
  dims = _dims(image_input)
  dtype = _input_dtype(image_input, where)
  layout, layout_from = _layout(dims, layout, where)
  height, width, channels, size_from = _image_size(
      dims, layout, image_size, color_mode, where)
  selected, outputs = _select_output(model, output_name, where)
  changed |= len(outputs) > 1
  _check_probe_size(dims[0], height, width, channels, where)
  rows = _probe(probe_inputs, height, width, channels, dims[0] or 1)
  feed = engines.onnx_layout(rows, layout, dtype)
  original = model.SerializeToString() if changed else checked.data
  reference = _run_in_fixed_batches(original, image_input.name, selected,
                                    feed, dims[0], where)
  num_classes = _check_outputs(reference, len(feed), selected, where)
  batch, detail, served = "dynamic", "", original
  if dims[0] is not None:
    batch, detail, served = _batch_axis(model, image_input.name, selected,
                                        dims[0], feed, reference, original,
                                        where)
  record = {
      "ir_version": model.ir_version,
      "opset": {entry.domain or "ai.onnx": entry.version
                for entry in model.opset_import},
      "producer": f"{model.producer_name} {model.producer_version}".strip(),
      "input": {"name": image_input.name, "shape": _shape_text(image_input),
                "dtype": np.dtype(dtype).name},
      "output": selected, "outputs": outputs,
      "layout_from": layout_from, "size_from": size_from,
      "batch": batch, "batch_detail": detail,
      "external_data_bytes": checked.inlined_bytes,
  }
  return OnnxClassifier(served, layout, height, width, _COLOR_MODES[channels],
                        num_classes, _output_kind(reference), batch, record)


def _image_input(graph: onnx.GraphProto, where: str) -> onnx.ValueInfoProto:
  """The graph's one real input; initializers that old opsets also list as
  inputs are weights, not inputs."""
  weights = {tensor.name for tensor in graph.initializer}
  weights.update(sparse.values.name for sparse in graph.sparse_initializer)
  inputs = [value for value in graph.input if value.name not in weights]
  if len(inputs) != 1:
    names = ", ".join(value.name for value in inputs) or "none"
    raise ValueError(f"{where} has {len(inputs)} inputs ({names}); a "
                     "classifier takes one image input")
  return inputs[0]


def _dims(value: onnx.ValueInfoProto) -> list:
  """The input's dimensions: a positive int where fixed, else None."""
  tensor = value.type.tensor_type
  if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
    return []
  return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
          for d in tensor.shape.dim]


def _shape_text(value: onnx.ValueInfoProto) -> list:
  return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
          for d in value.type.tensor_type.shape.dim]


def _input_dtype(value: onnx.ValueInfoProto, where: str):
  elem_type = value.type.tensor_type.elem_type
  if elem_type not in _INPUT_TYPES:
    name = (onnx.TensorProto.DataType.Name(elem_type) if elem_type in
            onnx.TensorProto.DataType.values() else "not a tensor")
    raise ValueError(f"{where}'s input {value.name!r} is {name}; an image "
                     "input is float32 or float16")
  return _INPUT_TYPES[elem_type]


def _layout(dims: list, layout: Optional[str], where: str) -> tuple:
  """(layout, "graph" or "argument"): where the channels are, from the
  position of the 1- or 3-wide axis; `layout` where the graph cannot say."""
  shape = "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
  if len(dims) == 3:
    if layout not in (None, "NHW"):
      raise ValueError(f"--layout {layout} contradicts {where}'s input "
                       f"{shape}, which is (batch, height, width)")
    return "NHW", "graph"
  if len(dims) != 4:
    raise ValueError(f"{where}'s input {shape} is not an image: expected "
                     "(batch, C, H, W), (batch, H, W, C) or (batch, H, W)")
  if layout is not None and layout not in _CHANNEL_AXIS:
    raise ValueError(f"--layout must be NCHW or NHWC, got {layout!r}")
  fits = [name for name, axis in _CHANNEL_AXIS.items()
          if dims[axis] in (1, 3, None)]
  certain = [name for name in fits if dims[_CHANNEL_AXIS[name]] is not None]
  if layout is not None:
    if layout not in fits or (len(certain) == 1 and certain != [layout]):
      raise ValueError(f"--layout {layout} contradicts {where}'s input "
                       f"{shape}, which is {(certain or fits or ['?'])[0]}")
    return layout, "argument"
  if len(certain) == 1 or (len(fits) == 1 and not certain):
    return (certain or fits)[0], "graph"
  if not fits:
    raise ValueError(f"{where}'s input {shape} has no 1- or 3-wide channel "
                     "axis (grayscale or RGB) in position 1 or 3")
  raise ValueError(f"{where}'s input {shape} does not say where its channels "
                   "are: pass --layout NCHW (PyTorch's) or NHWC")


def _image_size(dims: list, layout: str, image_size: Optional[tuple],
                color_mode: Optional[str], where: str) -> tuple:
  """(height, width, channels, where the size came from)."""
  height, width, channels = output_shapes.onnx_input_size(
      [-1 if d is None else d for d in dims], layout)
  wanted = {"grayscale": 1, "rgb": 3}.get(color_mode)
  if color_mode is not None and wanted is None:
    raise ValueError(f"--color_mode must be grayscale or rgb, got "
                     f"{color_mode!r}")
  if channels is None and wanted is None:
    raise ValueError(f"{where}'s input has a dynamic channel axis: pass "
                     "--color_mode grayscale or rgb")
  if channels is not None and wanted is not None and wanted != channels:
    raise ValueError(f"--color_mode {color_mode} contradicts {where}'s input, "
                     f"which has {channels} channel(s)")
  size_from = "graph"
  if image_size is not None:
    asked = [int(v) for v in image_size]
    if len(asked) != 2 or min(asked) <= 0:
      raise ValueError(f"--image_size must be HEIGHT,WIDTH, got "
                       f"{image_size!r}")
    for name, have, want in (("height", height, asked[0]),
                             ("width", width, asked[1])):
      if have is not None and have != want:
        raise ValueError(f"--image_size {asked[0]},{asked[1]} contradicts "
                         f"{where}'s input, whose {name} is {have}")
    if height is None or width is None:
      size_from = "argument"
    height, width = asked
  if height is None or width is None:
    raise ValueError(f"{where}'s input has a dynamic height or width: pass "
                     "--image_size HEIGHT,WIDTH")
  return height, width, channels or wanted, size_from


def _select_output(model: onnx.ModelProto, output_name: Optional[str],
                   where: str) -> tuple:
  """(the output served, every output's name); a graph with several keeps
  only the one named (ONNX Runtime then skips what only the others need)."""
  names = [value.name for value in model.graph.output]
  if output_name is None and len(names) > 1:
    raise ValueError(f"{where} has {len(names)} outputs ({', '.join(names)}): "
                     "pass --output_name, the one holding the class scores")
  selected = output_name or names[0]
  if selected not in names:
    raise ValueError(f"{where} has no output {selected!r}; its outputs are "
                     f"{', '.join(names)}")
  kept = [value for value in model.graph.output if value.name == selected]
  if kept[0].type.tensor_type.elem_type not in _OUTPUT_TYPES:
    raise ValueError(f"{where}'s output {selected!r} is not a float tensor")
  if len(names) > 1:
    del model.graph.output[:]
    model.graph.output.extend(kept)
  return selected, names


def _check_probe_size(batch: Optional[int], height: int, width: int,
                      channels: int, where: str) -> None:
  """Refuses an input whose declared size is too large to probe, before
  any probe row is made: height times width above the limit every adopted
  model has, or a fixed batch whose rows need above MAX_PROBE_BYTES."""
  image_limits.check_input_size(height, width, where)
  rows = -(-PROBE_ROWS // (batch or 1)) * (batch or 1)
  needed = rows * height * width * channels * 4
  if needed > MAX_PROBE_BYTES:
    raise ValueError(f"{where} has a fixed batch of {batch}: probing it "
                     f"takes {needed:,} bytes, above {MAX_PROBE_BYTES:,}; "
                     "export it with a batch of 1 or a dynamic batch axis")


def _probe(probe_inputs: Optional[np.ndarray], height: int, width: int,
           channels: int, batch: int) -> np.ndarray:
  """Probe rows (N, H, W, C): the caller's, or seeded normal noise; as many
  as fill whole fixed batches of `batch` rows."""
  rows = -(-PROBE_ROWS // batch) * batch
  if probe_inputs is None:
    rng = np.random.default_rng(0)
    return rng.standard_normal((rows, height, width, channels),
                               dtype=np.float32)
  probe = np.asarray(probe_inputs, np.float32)
  if probe.shape[1:] != (height, width, channels):
    raise ValueError(f"probe inputs of shape {probe.shape[1:]} do not fit "
                     f"the model's {(height, width, channels)}")
  return np.resize(probe, (max(rows, -(-len(probe) // batch) * batch),) +
                   probe.shape[1:])


def _run(session, input_name: str, output_name: str,
         feed: np.ndarray) -> np.ndarray:
  outputs = session.run([output_name], {input_name: feed})[0]
  return np.asarray(outputs, dtype=np.float64)


def _run_in_fixed_batches(model_bytes: bytes, input_name: str,
                          output_name: str, feed: np.ndarray,
                          batch: Optional[int], where: str) -> np.ndarray:
  """The model's outputs for `feed`, in batches of its fixed size (all at
  once if it has none): what its author gets from it."""
  session = engines.onnx_session(model_bytes)
  step = batch or len(feed)
  try:
    return np.concatenate([
        _run(session, input_name, output_name, feed[start:start + step])
        for start in range(0, len(feed), step)])
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"ONNX Runtime cannot run {where}: "
                     f"{onnx_checks.first_line(error)}") from None


def _batch_axis(model: onnx.ModelProto, input_name: str, output_name: str,
                batch: int, feed: np.ndarray, reference: np.ndarray,
                original: bytes, where: str) -> tuple:
  """(batch mode, why, bytes to serve) for a graph with a fixed batch."""
  served = make_batch_symbolic(model, input_name, batch).SerializeToString()
  try:
    session = engines.onnx_session(served)
    together = _run(session, input_name, output_name, feed)
    alone = _run(session, input_name, output_name, feed[:1])
    failure = _disagreement(np.concatenate([together, alone]),
                            np.concatenate([reference, reference[:1]]))
  except Exception as error:  # pylint: disable=broad-except
    failure = f"ONNX Runtime fails on it ({onnx_checks.first_line(error)})"
  if failure is None:
    return ("made_dynamic", f"the fixed batch of {batch} was made symbolic; "
            f"{len(feed)} rows at once and 1 alone agree with the original",
            served)
  if batch != 1:
    raise ValueError(f"{where} has a fixed batch of {batch}, which cannot be "
                     f"made symbolic: {failure}; export it with a batch of 1 "
                     "or a dynamic batch axis")
  return ("one_at_a_time", f"the fixed batch of 1 cannot be made symbolic: "
          f"{failure}; images run one at a time", original)


def _disagreement(actual: np.ndarray, expected: np.ndarray) -> Optional[str]:
  """None if the outputs agree (see AGREEMENT_RTOL), else how they differ."""
  if actual.shape != expected.shape:
    return (f"it outputs shape {actual.shape} where the original gives "
            f"{expected.shape}")
  scale = float(np.max(np.abs(expected), initial=1.0))
  difference = np.abs(actual - expected)
  if np.all(difference <= AGREEMENT_ATOL * scale +
            AGREEMENT_RTOL * np.abs(expected)):
    return None
  return (f"its batched outputs differ from the original's by up to "
          f"{float(np.nanmax(difference)):.3g}")


def make_batch_symbolic(model: onnx.ModelProto, input_name: str,
                        batch: int) -> onnx.ModelProto:
  """A copy of `model` whose batch axis is symbolic: the input's and the
  outputs' first dimension, shape hints (value_info) dropped, and each
  Reshape whose constant target starts with the fixed batch (`x.view(1,
  -1)`) made to copy the input's first dimension instead (0, or -1 under
  `allowzero`). Nothing else is changed; the caller proves the result."""
  rewritten = onnx.ModelProto()
  rewritten.CopyFrom(model)
  graph = rewritten.graph
  values = [value for value in graph.input if value.name == input_name]
  for value in values + list(graph.output):
    dims = value.type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
      dims[0].dim_param = BATCH_DIM
  del graph.value_info[:]
  constants = {tensor.name: tensor for tensor in graph.initializer}
  for node in graph.node:
    if node.op_type == "Constant" and node.output:
      for attribute in node.attribute:
        if attribute.name == "value":
          constants[node.output[0]] = attribute.t
        elif attribute.name == "value_ints":
          constants[node.output[0]] = numpy_helper.from_array(
              np.asarray(attribute.ints, np.int64))
  names = {name for node in graph.node for name in node.output}
  names.update(constants)
  nodes = []
  for node in graph.node:
    target = _batch_target(node, constants, batch)
    if target is not None:
      name = _unique(f"{node.input[1]}_symbolic_batch", names)
      nodes.append(onnx.helper.make_node(
          "Constant", [], [name], value=numpy_helper.from_array(target)))
      node.input[1] = name
    nodes.append(node)
  del graph.node[:]
  graph.node.extend(nodes)
  return rewritten


def _batch_target(node: onnx.NodeProto, constants: dict,
                  batch: int) -> Optional[np.ndarray]:
  """A Reshape's constant target with its leading fixed batch replaced by 0
  (copy the input's first dimension), or None. With `allowzero` set (as
  torch.onnx.export's dynamo exporter writes it) a 0 means a zero-sized
  axis, so the batch becomes -1 (inferred) where the target has no other
  -1, and otherwise allowzero is turned off (the node is changed) where
  the target has no 0 for it to act on."""
  if node.op_type != "Reshape" or len(node.input) < 2:
    return None
  tensor = constants.get(node.input[1])
  if tensor is None:
    return None
  target = numpy_helper.to_array(tensor)
  if target.ndim != 1 or not target.size or target[0] != batch:
    return None
  target = target.copy()
  allow_zero = [a for a in node.attribute if a.name == "allowzero" and a.i]
  if not allow_zero or -1 not in target[1:]:
    target[0] = -1 if allow_zero else 0
    return target
  if 0 in target:
    return None
  # [batch, -1] under allowzero: with no other 0 in the target, allowzero
  # changes nothing, so it is turned off and the batch copied (0).
  allow_zero[0].i = 0
  target[0] = 0
  return target


def _unique(name: str, taken: set) -> str:
  candidate, suffix = name, 1
  while candidate in taken:
    suffix += 1
    candidate = f"{name}_{suffix}"
  taken.add(candidate)
  return candidate


def _check_outputs(outputs: np.ndarray, rows: int, name: str,
                   where: str) -> int:
  """The class count; refuses outputs that are not (batch, classes), one
  row per input row, or not finite."""
  if outputs.ndim != 2 or outputs.shape[1] < 2 or len(outputs) != rows:
    raise ValueError(f"{where}'s output {name!r} has shape "
                     f"{list(outputs.shape)} for a batch of {rows}; "
                     "a classifier's output is (batch, classes)")
  if not np.all(np.isfinite(outputs)):
    raise ValueError(f"{where}'s output {name!r} is not finite (NaN or inf) "
                     "on the probe inputs")
  return int(outputs.shape[1])


def _output_kind(outputs: np.ndarray) -> str:
  """probabilities if every row is non-negative and sums to 1, else
  logits."""
  if np.all(outputs >= -PROBABILITY_TOLERANCE) and np.all(
      np.abs(outputs.sum(axis=1) - 1.0) <= PROBABILITY_TOLERANCE):
    return "probabilities"
  return "logits"
