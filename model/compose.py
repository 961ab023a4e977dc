"""Backbone + head as one model folder, served in one engine call.

* An ONNX backbone (`model.onnx` with its embedding as an output): the
  head's nodes are appended with the onnx helper API (Sub and Div
  standardise, MatMul and Add per Dense layer, Relu, Softmax), the class
  scores become the head's probabilities, the embedding stays an output,
  and what only fed the old scores is pruned.
* A Keras backbone (`model.keras`): a functional model calls the backbone
  up to its embedding layer, then the head; model/export.py saves it and
  converts it to TFLite (agreement- and embedding-checked), as for any
  trained model.

Either way the folder's card keeps the backbone's feeding recipe, names
both parts in `training`, and serves the backbone's embedding. Before the
card is written, the composed file's probabilities are checked against
backbone-then-head run apart (COMPOSED_TOLERANCE).
"""

import os
import time

import numpy as np

from model import card as card_lib
from model import embeddings
from model import engines
from model import export
from model import preprocessing
from imagebatch import paths

# The composed file's probabilities may differ from backbone-then-head run
# apart by float rounding only.
COMPOSED_TOLERANCE = 1e-4
# Validation images decoded to check the composed file.
CHECK_IMAGES = 256
# The composed Keras model's layer that holds the embedding.
EMBEDDING_LAYER = "embedding"
# The composed ONNX graph's new output.
PROBABILITIES = "probabilities"


def head_weights(head) -> dict:
  """The Keras head's constants: the standardisation's mean and divisor (as
  Keras' Normalization computes it) and each Dense layer's kernel, bias and
  activation, in order."""
  import keras  # pylint: disable=import-outside-toplevel
  normalise = head.get_layer("standardise")
  mean = np.asarray(normalise.mean, np.float32).reshape(-1)
  divisor = np.maximum(np.sqrt(np.asarray(normalise.variance,
                                          np.float32).reshape(-1)),
                       np.float32(keras.backend.epsilon()))
  dense = [{"kernel": np.asarray(layer.kernel, np.float32),
            "bias": np.asarray(layer.bias, np.float32),
            "activation": layer.get_config()["activation"]}
           for layer in head.layers if isinstance(layer, keras.layers.Dense)]
  return {"mean": mean, "divisor": divisor, "dense": dense}


def compose_onnx(backbone_bytes: bytes, card: card_lib.ModelCard,
                 head) -> bytes:
  """The backbone's graph with the head appended after its embedding
  output; outputs: PROBABILITIES, then the embedding."""
  import onnx  # pylint: disable=import-outside-toplevel
  from onnx import helper  # pylint: disable=import-outside-toplevel
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  model = onnx.ModelProto()
  model.ParseFromString(backbone_bytes)
  graph = model.graph
  names = card.embedding["engines"]["onnx"]
  weights = head_weights(head)
  taken = {name for node in graph.node for name in node.output}
  taken.update(tensor.name for tensor in graph.initializer)

  def fresh(name):
    name = f"head/{name}"
    while name in taken:
      name += "_"
    taken.add(name)
    return name

  def constant(name, array):
    tensor = numpy_helper.from_array(array, fresh(name))
    graph.initializer.append(tensor)
    return tensor.name

  def node(op, inputs, name, **attributes):
    output = fresh(name)
    graph.node.append(helper.make_node(op, inputs, [output], name=output,
                                       **attributes))
    return output

  current = names["embedding"]
  embedding_type = next((value.type.tensor_type.elem_type
                         for value in graph.output if value.name == current),
                        onnx.TensorProto.FLOAT)
  if embedding_type != onnx.TensorProto.FLOAT:
    current = node("Cast", [current], "cast", to=onnx.TensorProto.FLOAT)
  if card.embedding.get("flattened_from"):
    current = node("Flatten", [current], "flatten", axis=1)
  current = node("Sub", [current, constant("mean", weights["mean"])],
                 "centred")
  current = node("Div", [current, constant("divisor", weights["divisor"])],
                 "standardised")
  for index, layer in enumerate(weights["dense"]):
    current = node("MatMul", [current, constant(f"kernel_{index}",
                                                layer["kernel"])],
                   f"matmul_{index}")
    current = node("Add", [current, constant(f"bias_{index}", layer["bias"])],
                   f"dense_{index}")
    if layer["activation"] == "relu":
      current = node("Relu", [current], f"relu_{index}")
    elif layer["activation"] != "linear":
      raise ValueError(f"the head's activation {layer['activation']!r} has "
                       "no ONNX node here")
  scores = next(value for value in graph.output
                if value.name == names["scores"])
  batch = scores.type.tensor_type.shape.dim[0]
  batch = batch.dim_param or batch.dim_value or "batch"
  if PROBABILITIES in taken:
    raise ValueError(f"the backbone already has a tensor named "
                     f"{PROBABILITIES!r}")
  graph.node.append(helper.make_node("Softmax", [current], [PROBABILITIES],
                                     name="head/softmax", axis=1))
  kept = [value for value in graph.output if value.name == names["embedding"]]
  del graph.output[:]
  graph.output.append(helper.make_tensor_value_info(
      PROBABILITIES, onnx.TensorProto.FLOAT,
      [batch, int(weights["dense"][-1]["bias"].shape[0])]))
  graph.output.extend(kept)
  _prune(graph)
  return model.SerializeToString()


def _prune(graph) -> None:
  """Drops the nodes and initializers no output needs (the backbone's own
  classifier)."""
  needed = {value.name for value in graph.output}
  kept = []
  for node in reversed(list(graph.node)):
    if any(name in needed for name in node.output):
      kept.append(node)
      needed.update(name for name in node.input if name)
      for attribute in node.attribute:
        # A subgraph (If, Loop) reads outer names too.
        for subgraph in list(attribute.g.node) + [n for g in attribute.graphs
                                                  for n in g.node]:
          needed.update(name for name in subgraph.input if name)
  kept.reverse()
  del graph.node[:]
  graph.node.extend(kept)
  initializers = [tensor for tensor in graph.initializer
                  if tensor.name in needed]
  del graph.initializer[:]
  graph.initializer.extend(initializers)


def compose_keras(backbone_path: str, card: card_lib.ModelCard, head):
  """One functional model: the backbone up to its embedding layer (a
  nested model), an `embedding` layer, then the head."""
  import keras  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel
  backbone = keras.saving.load_model(backbone_path, compile=False,
                                     safe_mode=True)
  features = keras.Model(backbone.inputs,
                         backbone.get_layer(card.embedding["layer"]).output,
                         name="backbone")
  inputs = keras.Input(shape=tuple(backbone.inputs[0].shape[1:]),
                       name="image")
  x = features(inputs)
  x = (layers.Flatten(name=EMBEDDING_LAYER)(x) if len(x.shape) > 2 else
       layers.Identity(name=EMBEDDING_LAYER)(x))
  return keras.Model(inputs, head(x), name=f"{backbone.name}_{head.name}")


def check_images(backbone, files: list) -> np.ndarray:
  """Up to CHECK_IMAGES of `files` through the backbone's decoder."""
  decoder = preprocessing.card_decoder(backbone.card)
  step = max(1, len(files) // CHECK_IMAGES)
  pixels, _, _ = decoder.decode([paths.read_bytes(path) for path in
                                 files[::step][:CHECK_IMAGES]])
  return pixels


def composition_check(composed: engines.Engine, backbone_engine:
                      engines.Engine, head, pixels: np.ndarray) -> dict:
  """The composed file against backbone-then-head run apart, on `pixels`:
  top-1 agreement, the largest probability and embedding differences."""
  probabilities, composed_embeddings = composed.probabilities_and_embeddings(
      pixels)
  _, backbone_embeddings = backbone_engine.probabilities_and_embeddings(
      pixels)
  apart = head.predict(backbone_embeddings, batch_size=CHECK_IMAGES,
                       verbose=0)
  return {
      "images": int(len(pixels)),
      "top1_agreement": float((probabilities.argmax(1) ==
                               apart.argmax(1)).mean()),
      "max_probability_difference": float(np.abs(probabilities -
                                                 apart).max()),
      "max_embedding_difference": float(np.abs(composed_embeddings -
                                               backbone_embeddings).max()),
  }


def export_composed(trained, backbone, out_dir: str,
                    dataset: dict) -> card_lib.ModelCard:
  """Writes the composed model folder; returns its card. RuntimeError if
  the composed file's probabilities stray from backbone-then-head."""
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  source = backbone.card
  architecture = f"{source.architecture}+{trained.settings['head']}_head"
  training = {
      **trained.settings,
      "features_from": {
          "model_dir": paths.absolute(backbone.model_dir),
          "model_id": source.model_id, "architecture": source.architecture,
          "engine": backbone.engine, "embedding": source.embedding["layer"],
          "dimension": source.embedding_dimension},
      "seconds": trained.seconds,
      "tensorflow": tf.__version__, "keras": keras.__version__,
  }
  pixels = check_images(backbone, trained.validation_files)
  backbone_engine = engines.load_engine(backbone.model_dir, backbone.engine,
                                        card=source)
  started = time.monotonic()
  if "onnx" in source.embedding_engines:
    card = _export_onnx(trained, backbone, out_dir, architecture, dataset,
                        training)
  else:
    composed = compose_keras(os.path.join(backbone.model_dir,
                                          card_lib.MODEL_FILE), source,
                             trained.model)
    card = export.export_model(
        composed, out_dir, architecture=architecture,
        class_names=trained.class_names, color_mode=source.color_mode,
        test_images=pixels, dataset=dataset, metrics=trained.metrics,
        training=training, history=trained.history,
        embedding_layer=EMBEDDING_LAYER,
        embedding_chosen="the backbone's embedding, the head's input",
        preprocessing_recipe=dict(source.preprocessing),
        output="probabilities", write_card=False)
  check = composition_check(
      engines.load_engine(out_dir, card.default_engine, card=card),
      backbone_engine, trained.model, pixels)
  check["engine"] = card.default_engine
  if check["max_probability_difference"] > COMPOSED_TOLERANCE:
    raise RuntimeError(
        f"the composed model's probabilities differ from backbone-then-head "
        f"by up to {check['max_probability_difference']:.3g} (allowed "
        f"{COMPOSED_TOLERANCE:g}); not exporting it")
  card.training["composed"] = {**check, "seconds": round(
      time.monotonic() - started, 1)}
  card.validate()
  # The card goes last: a folder with a card is a complete model.
  with open(os.path.join(out_dir, card_lib.CARD_FILE), "w") as handle:
    handle.write(card.to_json())
  return card


def _export_onnx(trained, backbone, out_dir, architecture, dataset,
                 training) -> card_lib.ModelCard:
  """model.onnx and the card (not yet written) for an ONNX backbone."""
  source = backbone.card
  os.makedirs(out_dir, exist_ok=True)
  card_path = os.path.join(out_dir, card_lib.CARD_FILE)
  if os.path.exists(card_path):
    os.remove(card_path)
  backbone_bytes = paths.read_bytes(os.path.join(backbone.model_dir,
                                                 card_lib.ONNX_FILE))
  composed = compose_onnx(backbone_bytes, source, trained.model)
  with open(os.path.join(out_dir, card_lib.ONNX_FILE), "wb") as handle:
    handle.write(composed)
  embedding = {key: value for key, value in source.embedding.items()
               if key != "engines"}
  embedding["chosen"] = "the backbone's embedding, the head's input"
  embedding["engines"] = {"onnx": {"scores": PROBABILITIES,
                                   "embedding": source.embedding["engines"][
                                       "onnx"]["embedding"]}}
  card = card_lib.ModelCard(
      model_id="", architecture=architecture,
      class_names=list(trained.class_names),
      input_shape=list(source.input_shape), color_mode=source.color_mode,
      output="probabilities", preprocessing=dict(source.preprocessing),
      dataset=dataset, metrics=trained.metrics, training=training,
      tflite={"converted": False, "reason": "an ONNX backbone is served by "
              "the onnx engine"},
      engines=["onnx"], embedding=embedding).validate()
  card.model_id = card_lib.compute_model_id(
      card, *card_lib.model_payloads(out_dir, card))
  if trained.history:
    export.plot_curves(trained.history,
                       os.path.join(out_dir, card_lib.CURVES_FILE))
  return card
