"""What a model file may hold, checked from its bytes before anything loads it.

A model folder or an adopted source comes from someone else, and loading a
model can run its code: a Keras Lambda layer is Python, a SavedModel runs
its initialiser ops as it loads. These checks read the files as data and
refuse, in one line, anything that could reach files, the network or Python.

Loading can also cost memory out of all proportion to the file: a 1.6 MB
`.keras` zip whose `config.json` inflates to 1.5 GB, a weights member
declared at 2 GiB, an HDF5 attribute or a `saved_model.pb` of a gigabyte,
a config nested deeper than the parser recurses. So sizes are checked as
the files declare them (a zip's central directory, HDF5's dataset shapes
and storage) before anything is read, and a config's nesting before it is
parsed.
"""

import io
import json
import os
import re
import zipfile

# A model's files together: what one protobuf message (an ONNX model) or a
# TFLite flatbuffer can hold, and far above any classifier served here.
MAX_MODEL_BYTES = 2_000_000_000
# A Keras config (`config.json`, `metadata.json`, an .h5's `model_config`).
# A MobileNetV2's is 160 kB; nested models add little.
MAX_CONFIG_BYTES = 16 << 20
# A MobileNetV2's config nests 11 levels, a model inside a model inside a
# model 13; the JSON parser recurses once per level.
MAX_CONFIG_DEPTH = 64
# A .keras zip holds three members and a few assets.
MAX_ARCHIVE_MEMBERS = 10_000
# Weights barely compress (Keras stores its zip members uncompressed); JSON
# deflates about 40 to 1. A member above the floor that inflates more is a
# bomb.
MAX_COMPRESSION_RATIO = 100
COMPRESSION_FLOOR_BYTES = 1 << 20
# An HDF5 file's groups, datasets and attributes: one per layer and weight.
MAX_HDF5_OBJECTS = 100_000
# What an HDF5 model file may hold besides its weights' storage: the config
# attribute and the file's own structure.
MAX_HDF5_OTHER_BYTES = 2 * MAX_CONFIG_BYTES
# A SavedModel's graph (its weights are in variables/); parsing costs a few
# times its size.
MAX_SAVED_MODEL_PB_BYTES = 256 << 20

def check_keras_config(config: dict, where: str) -> None:
  """Refuses a Keras model config holding code, before loading."""
  unsafe = unsafe_objects(config)
  if unsafe:
    raise ValueError(
        f"{where} has {unsafe[0]}, which runs arbitrary Python code when "
        "loaded or comes from outside Keras; it is refused (Keras safe_mode)")


# Keras serialises Python lambdas under this class name; Lambda layers hold
# them.
_CODE_CLASSES = ("Lambda", "__lambda__")
# Packages a served model's objects may come from (`module` in the config):
# those Keras itself imports from when it loads a model.
_SAFE_PACKAGES = ("keras", "keras_hub", "keras_cv", "keras_nlp", "builtins")


def unsafe_objects(config) -> list:
  """Every object in a Keras model config that can carry code: a Lambda
  layer or serialised lambda, however its class is spelled (`Lambda`,
  `layers.Lambda`, `keras.layers.Lambda`, `package>Lambda`), and any object
  whose module lies outside Keras."""
  found, stack = [], [config]
  while stack:
    node = stack.pop()
    if isinstance(node, dict):
      for key in ("class_name", "registered_name"):
        name = node.get(key)
        if isinstance(name, str) and (
            re.split(r"[.>]", name)[-1] in _CODE_CLASSES):
          found.append(f"a Lambda layer or lambda ({key} {name!r})")
      module = node.get("module")
      if isinstance(module, str) and (
          module.split(".", 1)[0] not in _SAFE_PACKAGES):
        found.append(f"an object from module {module!r}")
      stack.extend(node.values())
    elif isinstance(node, list):
      stack.extend(node)
  return found


# Op types that reach the file system, the network or Python. Loading a
# SavedModel runs its initialiser ops, so they are refused before loading.
_UNSAFE_OPS = re.compile(
    r"File|Reader|Dataset|Summary|Record|Print|Debug|Rpc|Save|Restore|"
    r"Checkpoint|Remapp|Sql|Lmdb|ImmutableConst|^(Eager)?PyFunc")
# The checkpoint plumbing every SavedModel holds, allowed only in the
# functions its saver_def names (the TF1 save and restore entry points).
_CHECKPOINT_OPS = frozenset(["SaveV2", "RestoreV2", "MergeV2Checkpoints",
                             "ShardedFilename"])


def saved_model_unsafe_ops(saved_model_pb: bytes) -> list:
  """The unsafe op types in a saved_model.pb, read without loading it.

  Checkpoint ops count as unsafe unless only the saver's own functions
  reach them. Raises ValueError if the bytes are not a SavedModel proto.
  """
  # pylint: disable=import-outside-toplevel
  from google.protobuf.message import DecodeError
  from tensorflow.core.protobuf import saved_model_pb2
  model = saved_model_pb2.SavedModel()
  try:
    model.ParseFromString(saved_model_pb)
  except DecodeError:
    raise ValueError("saved_model.pb is not a SavedModel") from None
  unsafe = set()
  for graph in model.meta_graphs:
    functions = {f.signature.name: f for f in graph.graph_def.library.function}

    def reachable(nodes, functions=functions):
      seen, stack = set(), [_called(node) for node in nodes]
      stack = [name for names in stack for name in names]
      while stack:
        name = stack.pop()
        if name in seen or name not in functions:
          continue
        seen.add(name)
        stack.extend(n for node in functions[name].node_def
                     for n in _called(node))
      return seen

    saver = {graph.saver_def.restore_op_name.split(":")[0],
             graph.saver_def.save_tensor_name.split(":")[0]}
    main_nodes = list(graph.graph_def.node)
    model_functions = reachable(n for n in main_nodes if n.name not in saver)
    # Anything the saver does not reach is model code, called or not.
    saver_only = reachable(n for n in main_nodes if n.name in saver)
    saver_only -= model_functions
    for node in main_nodes:
      if node.name not in saver:
        unsafe.update(_unsafe(node.op, in_saver=False))
    for name, function in functions.items():
      for node in function.node_def:
        unsafe.update(_unsafe(node.op, in_saver=name in saver_only))
  return sorted(unsafe)


def _unsafe(op: str, in_saver: bool) -> list:
  if in_saver and op in _CHECKPOINT_OPS:
    return []
  return [op] if _UNSAFE_OPS.search(op) else []


def _called(node) -> list:
  """The functions a graph node calls, from its function-valued attrs."""
  names = []
  for value in node.attr.values():
    if value.func.name:
      names.append(value.func.name)
    names.extend(f.name for f in value.list.func)
  return names


def check_saved_model(saved_model_pb: bytes, where: str) -> None:
  unsafe = saved_model_unsafe_ops(saved_model_pb)
  if unsafe:
    raise ValueError(
        f"{where} holds ops that reach files, the network or Python "
        f"({', '.join(unsafe)}); a SavedModel runs ops as it loads, so it is "
        "refused")


def layer_classes(config) -> set:
  """Every `class_name` in a Keras model config, at any depth."""
  found, stack = set(), [config]
  while stack:
    node = stack.pop()
    if isinstance(node, dict):
      if isinstance(node.get("class_name"), str):
        found.add(node["class_name"])
      stack.extend(node.values())
    elif isinstance(node, list):
      stack.extend(node)
  return found


def _megabytes(count: int) -> str:
  return f"{count:,} bytes"


def check_file_size(path: str, limit: int, what: str) -> int:
  """The size of the file at `path`; ValueError naming `what` and the limit
  if it is above `limit`."""
  size = os.path.getsize(path)
  if size > limit:
    raise ValueError(f"{path}: {what} is {_megabytes(size)}, above the limit "
                     f"of {_megabytes(limit)}")
  return size


def json_depth(text: str) -> int:
  """How deep a JSON text nests, counted outside strings, without parsing."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  brackets = re.sub(r'"(?:[^"\\]|\\.)*"', "", text).encode()
  steps = np.frombuffer(brackets, np.uint8)
  depth = np.cumsum(np.isin(steps, (ord("["), ord("{"))).astype(np.int64) -
                    np.isin(steps, (ord("]"), ord("}"))).astype(np.int64))
  return int(depth.max()) if depth.size else 0


def load_config_json(raw: bytes, where: str,
                     max_bytes: int = MAX_CONFIG_BYTES,
                     max_depth: int = MAX_CONFIG_DEPTH):
  """A JSON document from an untrusted file, after bounding its size and
  nesting; ValueError of one line otherwise."""
  if len(raw) > max_bytes:
    raise ValueError(f"{where} is {_megabytes(len(raw))}, above the limit of "
                     f"{_megabytes(max_bytes)} for a config")
  try:
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
  except UnicodeDecodeError:
    raise ValueError(f"{where} is not UTF-8 JSON") from None
  if json_depth(text) > max_depth:
    raise ValueError(f"{where} nests deeper than {max_depth} levels")
  try:
    return json.loads(text)
  except (ValueError, RecursionError) as error:
    raise ValueError(f"{where} is not valid JSON: "
                     f"{str(error).splitlines()[0][:200]}") from None


def check_archive(archive: zipfile.ZipFile, where: str) -> None:
  """Refuses a zip whose members, as its central directory declares them,
  are too many, too large together, or inflate like a bomb; and a config
  member above the config limit. Reading a member never yields more than
  its declared size (zipfile stops there), so this bounds what any reader
  of the archive allocates."""
  members = archive.infolist()
  if len(members) > MAX_ARCHIVE_MEMBERS:
    raise ValueError(f"{where} is a zip of {len(members):,} members, above "
                     f"the limit of {MAX_ARCHIVE_MEMBERS:,}")
  total = 0
  for member in members:
    total += member.file_size
    if member.filename in ("config.json", "metadata.json") and (
        member.file_size > MAX_CONFIG_BYTES):
      raise ValueError(
          f"{where}: its {member.filename} inflates to "
          f"{_megabytes(member.file_size)}, above the limit of "
          f"{_megabytes(MAX_CONFIG_BYTES)} for a config")
    ratio = member.file_size / max(1, member.compress_size)
    if (member.file_size > COMPRESSION_FLOOR_BYTES and
        ratio > MAX_COMPRESSION_RATIO):
      raise ValueError(
          f"{where}: its member {member.filename[:100]!r} inflates "
          f"{ratio:,.0f} times, to {_megabytes(member.file_size)}, above the "
          f"limit of {MAX_COMPRESSION_RATIO} times for a model file (a zip "
          "bomb)")
  if total > MAX_MODEL_BYTES:
    raise ValueError(f"{where}: its members inflate to {_megabytes(total)}, "
                     f"above the limit of {_megabytes(MAX_MODEL_BYTES)}")


def keras_archive_config(source, where: str, weights: bool = False) -> dict:
  """The config of a Keras 3 `.keras` zip (a path or its bytes), read after
  `check_archive`; with `weights`, its weights member is checked too
  (`check_hdf5`, which needs h5py). ValueError of one line for anything
  refused."""
  if isinstance(source, (bytes, bytearray)):
    source = io.BytesIO(source)
  try:
    with zipfile.ZipFile(source) as archive:
      check_archive(archive, where)
      raw = archive.read("config.json")
      if weights:
        _check_keras_weights(archive, where)
  except (zipfile.BadZipFile, KeyError, EOFError):
    raise ValueError(f"{where} is not a Keras 3 .keras file (a zip holding "
                     "config.json)") from None
  config = load_config_json(raw, f"{where} config.json")
  if not isinstance(config, dict):
    raise ValueError(f"{where} config.json is not a model config (a JSON "
                     "object)")
  return config


def _check_keras_weights(archive: zipfile.ZipFile, where: str) -> None:
  """`check_hdf5` on the weights members of a checked `.keras` zip, which
  Keras reads into memory whole before loading them."""
  import h5py  # pylint: disable=import-outside-toplevel
  for name in archive.namelist():
    if not name.endswith(".h5"):
      continue
    data = archive.read(name)
    try:
      with h5py.File(io.BytesIO(data), "r") as handle:
        check_hdf5(handle, f"{where} {name}", len(data))
    except OSError as error:
      raise ValueError(f"{where}: its {name} is not HDF5: "
                       f"{str(error).splitlines()[0][:200]}") from None


def check_hdf5(handle, where: str, file_size: int) -> None:
  """Refuses an open h5py file whose datasets, as declared, are too large
  together or inflate like a bomb (HDF5 compresses chunked datasets), or
  that holds too much besides its datasets' storage (an attribute of a
  gigabyte). Reads shapes and storage sizes only."""
  import h5py  # pylint: disable=import-outside-toplevel
  objects, declared, stored = [0], [0], [0]

  def visit_link(name, link):
    objects[0] += 1
    if objects[0] > MAX_HDF5_OBJECTS:
      return True  # Stops the walk.
    if isinstance(link, h5py.ExternalLink):
      raise ValueError(f"{where}: its {name[:100]!r} links to another file "
                       f"({link.filename[:100]!r}); a model file is read "
                       "alone")
    return None

  handle.visititems_links(visit_link)
  objects[0] = 0

  def visit(name, item):
    objects[0] += 1 + len(item.attrs)
    if objects[0] > MAX_HDF5_OBJECTS:
      return True  # Stops the walk.
    if isinstance(item, h5py.Dataset):
      if item.external:
        raise ValueError(f"{where}: its dataset {name[:100]!r} keeps its "
                         "data in another file; a model file is read alone")
      size = item.size * item.dtype.itemsize
      storage = item.id.get_storage_size()
      declared[0] += size
      stored[0] += storage
      if (size > COMPRESSION_FLOOR_BYTES and
          size / max(1, storage) > MAX_COMPRESSION_RATIO):
        raise ValueError(
            f"{where}: its dataset {name[:100]!r} inflates to "
            f"{_megabytes(size)} from {_megabytes(storage)}, above the limit "
            f"of {MAX_COMPRESSION_RATIO} times for a model file")
    return None

  handle.visititems(visit)
  if objects[0] > MAX_HDF5_OBJECTS:
    raise ValueError(f"{where} holds more than {MAX_HDF5_OBJECTS:,} HDF5 "
                     "objects")
  if declared[0] > MAX_MODEL_BYTES:
    raise ValueError(f"{where}: its weights are declared at "
                     f"{_megabytes(declared[0])}, above the limit of "
                     f"{_megabytes(MAX_MODEL_BYTES)}")
  other = file_size - stored[0]
  if other > MAX_HDF5_OTHER_BYTES:
    raise ValueError(
        f"{where} holds {_megabytes(other)} besides its weights (attributes "
        f"and structure), above the limit of "
        f"{_megabytes(MAX_HDF5_OTHER_BYTES)} for a model file")
