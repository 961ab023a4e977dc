"""The safety boundary for an ONNX file a user brings, read without loading it.

`read_model(path)` is the only way an ONNX source becomes a `ModelProto`:

* the file (and any external data it names) is size-checked against
  MAX_MODEL_BYTES before a byte of it is parsed;
* it is recognised from its bytes (the top-level fields of a protobuf
  `ModelProto`, with an `ir_version` and a `graph`), not from its name;
* every node's operator domain is a standard ONNX one (STANDARD_DOMAINS), or
  calls a function the model itself defines from standard operators. Custom
  domains are refused, and nothing here or in the engine ever registers a
  custom-op library;
* tensors stored in external data files are read only from files beside the
  source: a relative location with no `..`, resolved (links followed) to a
  regular file inside the source's folder. They are inlined, so the served
  `model.onnx` is one self-contained file.

`onnx.load(path)` is never called: it follows external-data locations
itself. Each refusal is a ValueError of one line.
"""

import os
from typing import Iterator
from typing import NamedTuple

import onnx

# A served model is one file with its external data inlined, so it must fit
# in one protobuf message, which cannot exceed 2 GiB. The model file and its
# external data together are checked against this before any is parsed.
MAX_MODEL_BYTES = 2_000_000_000
# The operator sets of the ONNX standard. `com.microsoft` (ONNX Runtime's
# contrib ops) is refused too: `torch.onnx.export` never writes it; it comes
# from onnxruntime's offline optimisers, whose output its documentation ties
# to the runtime version and hardware that wrote it.
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
# A model-local function may not claim a domain that ONNX Runtime itself
# implements (standard, contrib, training or ATen ops): it would shadow them.
_RESERVED_FUNCTION_DOMAINS = ("ai.onnx", "com.microsoft", "com.ms",
                              "org.pytorch")
# ModelProto's top-level fields and their protobuf wire types (0 varint,
# 2 length-delimited), from onnx.proto.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2,
                 20: 2, 25: 2}
_IR_VERSION_FIELD, _GRAPH_FIELD = 1, 7
# More top-level fields than any exporter writes: a file of many tiny fields
# is not walked for long.
_MAX_TOP_LEVEL_FIELDS = 100_000


def _varint(data: bytes, pos: int) -> tuple:
  """(value, next position) of the protobuf varint at `pos`; ValueError if
  it is truncated or longer than ten bytes."""
  value = 0
  for shift in range(0, 70, 7):
    if pos >= len(data):
      raise ValueError("truncated varint")
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return value, pos
  raise ValueError("varint longer than ten bytes")


def _top_level_fields(data: bytes, complete: bool) -> Iterator[tuple]:
  """(field number, wire type) of each top-level field, skipping payloads.
  With `complete` False the data may stop inside the last field (a head)."""
  pos = 0
  for _ in range(_MAX_TOP_LEVEL_FIELDS):
    if pos >= len(data):
      return
    try:
      key, pos = _varint(data, pos)
      if key & 7 == 0:
        _, pos = _varint(data, pos)
      elif key & 7 == 2:
        length, pos = _varint(data, pos)
        pos += length
    except ValueError:
      if complete:
        raise
      return
    if complete and pos > len(data):
      raise ValueError("a field runs past the end of the file")
    yield key >> 3, key & 7
  raise ValueError("too many top-level fields")


def looks_like_onnx(data: bytes, complete: bool = True) -> bool:
  """Whether `data` is laid out as an ONNX ModelProto: only its top-level
  fields, each with its wire type, `ir_version` first (every protobuf
  serialiser writes fields in number order), and, when `complete`, a graph.

  With `complete` False, `data` may be the first bytes of a file only: a
  cheap check for telling an ONNX source from the other kinds.
  """
  seen = []
  try:
    for field, wire in _top_level_fields(data, complete):
      if _MODEL_FIELDS.get(field) != wire:
        return False
      seen.append(field)
  except ValueError:
    return False
  if not seen or seen[0] != _IR_VERSION_FIELD:
    return False
  return _GRAPH_FIELD in seen or not complete


class CheckedModel(NamedTuple):
  """An ONNX source that passed the checks."""
  proto: onnx.ModelProto  # external data inlined
  data: bytes  # the source file's own bytes
  inlined_bytes: int  # how many bytes of external data were inlined


def read_model(path: str, max_bytes: int = MAX_MODEL_BYTES) -> CheckedModel:
  """The checked model at `path`, its external data inlined (see the module
  docstring). Raises ValueError with one line for anything refused."""
  name = os.path.basename(path)
  try:
    size = os.path.getsize(path)
  except OSError as error:
    raise ValueError(f"{path} cannot be read: {error.strerror}") from None
  if size > max_bytes:
    raise ValueError(f"{name} is {size:,} bytes, above the limit of "
                     f"{max_bytes:,} for an ONNX model (MAX_MODEL_BYTES)")
  with open(path, "rb") as handle:
    data = handle.read(max_bytes + 1)
  if not looks_like_onnx(data):
    raise ValueError(f"{name} is not an ONNX model (a protobuf ModelProto "
                     "with an ir_version and a graph)")
  model = onnx.ModelProto()
  try:
    model.ParseFromString(data)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"{name} is not a readable ONNX model: "
                     f"{first_line(error)}") from None
  check_domains(model, name)
  inlined = inline_external_data(model, os.path.dirname(os.path.abspath(path)),
                                 name, max_bytes - size)
  return CheckedModel(model, data, inlined)


def first_line(error: Exception) -> str:
  """The first non-empty line of an error's message."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
  """A graph and every subgraph below it (If, Loop, Scan bodies)."""
  stack = [graph]
  while stack:
    current = stack.pop()
    yield current
    for node in current.node:
      for attribute in node.attribute:
        if attribute.HasField("g"):
          stack.append(attribute.g)
        stack.extend(attribute.graphs)


def _graphs_below(nodes) -> Iterator[onnx.GraphProto]:
  for node in nodes:
    for attribute in node.attribute:
      if attribute.HasField("g"):
        yield from _graphs(attribute.g)
      for graph in attribute.graphs:
        yield from _graphs(graph)


def _all_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
  """The main graph, the training graphs, and every subgraph, including
  those inside the model's functions."""
  yield from _graphs(model.graph)
  for info in model.training_info:
    yield from _graphs(info.initialization)
    yield from _graphs(info.algorithm)
  for function in model.functions:
    yield from _graphs_below(function.node)


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
  for graph in _all_graphs(model):
    yield from graph.node
  for function in model.functions:
    yield from function.node


def check_domains(model: onnx.ModelProto, where: str) -> None:
  """Refuses a node whose operator is neither standard ONNX nor a function
  the model defines (from standard operators: function bodies are nodes
  too, and are checked the same way)."""
  local = set()
  for function in model.functions:
    if function.domain.startswith(_RESERVED_FUNCTION_DOMAINS):
      raise ValueError(f"{where} defines function {function.name!r} in the "
                       f"reserved domain {function.domain!r}; refused")
    local.add((function.domain, function.name))
  for node in _all_nodes(model):
    if node.domain in STANDARD_DOMAINS or (node.domain,
                                           node.op_type) in local:
      continue
    raise ValueError(
        f"{where} uses operator {node.op_type!r} from domain "
        f"{node.domain!r}; only the standard ONNX domains are served "
        "(export it again with torch.onnx.export, without custom or "
        "onnxruntime-optimised operators)")


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
  """Every tensor the model holds: initializers, sparse ones, and constant
  tensors in node attributes, in every graph and function."""
  for graph in _all_graphs(model):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
      yield sparse.values
      yield sparse.indices
  for node in _all_nodes(model):
    for attribute in node.attribute:
      if attribute.HasField("t"):
        yield attribute.t
      yield from attribute.tensors
      for sparse in ([attribute.sparse_tensor] if attribute.HasField(
          "sparse_tensor") else []) + list(attribute.sparse_tensors):
        yield sparse.values
        yield sparse.indices


def _external_file(location: str, source_dir: str, where: str) -> str:
  """The real path of an external-data location, refused unless it is a
  regular file inside the source's folder."""
  refused = (f"{where} keeps tensor data in {location!r}, outside the "
             "model's folder; only files beside the model are read")
  parts = location.replace("\\", "/").split("/")
  if (not location or "\0" in location or os.path.isabs(location) or
      location.startswith(("/", "\\")) or ":" in location or ".." in parts):
    raise ValueError(refused)
  folder = os.path.realpath(source_dir)
  resolved = os.path.realpath(os.path.join(folder, *parts))
  if os.path.commonpath([folder, resolved]) != folder or resolved == folder:
    raise ValueError(refused)
  if not os.path.isfile(resolved):
    raise ValueError(f"{where} keeps tensor data in {location!r}, which is "
                     "not a file beside the model")
  return resolved


def _external_entry(tensor: onnx.TensorProto, where: str) -> tuple:
  """(location, offset, length or None) of an external tensor."""
  entries = {entry.key: entry.value for entry in tensor.external_data}
  try:
    offset = int(entries.get("offset", 0))
    length = int(entries["length"]) if "length" in entries else None
  except ValueError:
    raise ValueError(f"{where}: tensor {tensor.name!r} has a malformed "
                     "external-data offset or length") from None
  if offset < 0 or (length is not None and length < 0):
    raise ValueError(f"{where}: tensor {tensor.name!r} has a negative "
                     "external-data offset or length")
  return entries.get("location", ""), offset, length


def inline_external_data(model: onnx.ModelProto, source_dir: str, where: str,
                         budget: int) -> int:
  """Reads every external tensor's bytes (see `_external_file`) into the
  model, so it needs no other file. Every file and size is checked, and the
  total against `budget`, before any tensor data is read. Returns the
  number of bytes inlined."""
  external = [tensor for tensor in _tensors(model) if tensor.data_location ==
              onnx.TensorProto.EXTERNAL]
  plan, total = [], 0
  for tensor in external:
    location, offset, length = _external_entry(tensor, where)
    path = _external_file(location, source_dir, where)
    available = os.path.getsize(path) - offset
    length = available if length is None else length
    if length > available:
      raise ValueError(f"{where}: tensor {tensor.name!r} wants {length:,} "
                       f"bytes at offset {offset:,} of {location!r}, which "
                       "is shorter")
    expected = _expected_bytes(tensor)
    if expected is not None and expected != length:
      raise ValueError(f"{where}: tensor {tensor.name!r} needs {expected:,} "
                       f"bytes but its external data holds {length:,}")
    total += length
    if total > budget:
      raise ValueError(f"{where} and its external data exceed the limit of "
                       f"{MAX_MODEL_BYTES:,} bytes for an ONNX model "
                       "(MAX_MODEL_BYTES)")
    plan.append((tensor, path, offset, length))
  for tensor, path, offset, length in plan:
    with open(path, "rb") as handle:
      handle.seek(offset)
      tensor.raw_data = handle.read(length)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
  return total


def _expected_bytes(tensor: onnx.TensorProto):
  """The raw byte size of a fixed-width tensor; None where it is not fixed
  (strings) or not byte-aligned (4-bit and 2-bit types)."""
  try:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
  except Exception:  # pylint: disable=broad-except
    return None
  if dtype.kind in "OSU" or tensor.data_type in _SUB_BYTE_TYPES:
    return None
  count = 1
  for dim in tensor.dims:
    count *= dim
  return count * dtype.itemsize


_SUB_BYTE_TYPES = frozenset(
    getattr(onnx.TensorProto, name) for name in
    ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, name))
