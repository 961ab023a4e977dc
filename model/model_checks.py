"""What a model file may hold, checked from its bytes before anything loads it.

A model folder or an adopted source comes from someone else, and loading a
model can run its code: a Keras Lambda layer is Python, a SavedModel runs
its initialiser ops as it loads. These checks read the files as data and
refuse, in one line, anything that could reach files, the network or Python.
"""

import re

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
