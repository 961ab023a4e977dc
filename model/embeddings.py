"""Embeddings: the vector that feeds a classifier's last layer, served
beside its scores.

The layer is chosen when a model folder is made (`model.train`,
`model.adopt`): by default the input of the final Dense layer (Keras) or of
the final Gemm or MatMul node (ONNX, model/onnx_embedding.py), skipping
what only passes values through (Dropout, an activation, a bias Add);
`--embedding_layer NAME` names another. It is recorded in the card's
`embedding`:

    {"layer": "pool", "dimension": 1280, "chosen": "...",
     "engines": {"keras": {"layer": "pool"},
                 "tflite": {"scores": "...:0", "embedding": "...:1",
                            "max_difference": 2e-06, ...},
                 "onnx": {"scores": "logits", "embedding": "pool", ...}}}

The Keras engine builds `keras.Model(inputs, [scores, layer.output])` from
the saved single-output model; a TFLite or ONNX file carries the tensor as
a second output, and each is checked against its source to
EMBEDDING_TOLERANCE before the folder is written.
"""

from typing import Optional

import numpy as np

# A served embedding agrees with its source when every value is within this
# of it, times the largest magnitude of the source's values (at least 1):
# XNNPACK and ONNX Runtime may sum in another order.
EMBEDDING_TOLERANCE = 1e-5
# Layers that pass a tensor through at inference, walked over to find the
# classifier (backwards from the output) and to name its input.
_PASS_THROUGH = ("Activation", "Softmax", "ReLU", "Dropout", "SpatialDropout1D",
                 "GaussianDropout", "GaussianNoise", "AlphaDropout",
                 "Identity")
_SKIPPED_AT_INFERENCE = ("Dropout", "GaussianDropout", "GaussianNoise",
                         "AlphaDropout", "Identity")
# Rows checked against the source.
CHECK_ROWS = 256


class EmbeddingError(ValueError):
  """A layer that cannot serve as the embedding: one line, naming the fix."""


def keras_layer(model, name: Optional[str] = None) -> tuple:
  """(layer name, why) of a Keras model's embedding: `name` if given (a
  top-level layer with one output of shape (batch, D)), else the layer
  whose output feeds the final Dense layer. (None, why not) when there is
  no default guess; EmbeddingError for a `name` that cannot serve."""
  if name is not None:
    try:
      layer = model.get_layer(name)
    except ValueError:
      names = ", ".join(layer.name for layer in model.layers[-8:])
      raise EmbeddingError(
          f"--embedding_layer {name}: the model has no top-level layer of "
          f"that name (its last layers: {names})") from None
    _check_keras_output(layer, f"--embedding_layer {name}")
    return name, "--embedding_layer"
  classifier = _producer(model.outputs[0]) if len(model.outputs) == 1 else None
  while classifier is not None and type(classifier).__name__ in _PASS_THROUGH:
    classifier = _producer(classifier.input)
  if classifier is None or type(classifier).__name__ != "Dense":
    return None, ("the model's output does not come from a Dense layer; "
                  "pass --embedding_layer NAME")
  feeding = _producer(classifier.input)
  while (feeding is not None and
         type(feeding).__name__ in _SKIPPED_AT_INFERENCE):
    feeding = _producer(feeding.input)
  if feeding is None or type(feeding).__name__ == "InputLayer":
    return None, ("the final Dense layer reads the model's input itself; "
                  "there is no feature layer before it")
  try:
    _check_keras_output(feeding, f"the layer {feeding.name!r} that feeds "
                        f"{classifier.name!r}")
  except EmbeddingError as error:
    return None, f"{error}; pass --embedding_layer NAME"
  return feeding.name, (f"the input of the final Dense layer "
                        f"{classifier.name!r}")


def _producer(tensor):
  """The layer that produced a Keras tensor, or None."""
  history = getattr(tensor, "_keras_history", None)
  return history.operation if history is not None else None


def _check_keras_output(layer, what: str) -> None:
  """Refuses a layer without one output of a fixed size per image (an
  output of (batch, D) serves as it is; a larger rank is flattened)."""
  try:
    shape = tuple(layer.output.shape)
  except (AttributeError, ValueError) as error:
    raise EmbeddingError(f"{what} has no single output ({error})") from None
  if len(shape) < 2 or None in shape[1:]:
    raise EmbeddingError(f"{what} outputs shape {shape}; an embedding has a "
                         "fixed size per image: name a pooling, Flatten or "
                         "Dense layer")


def keras_two_outputs(model, layer: str):
  """The classifier with its embedding layer as a second output."""
  import keras  # pylint: disable=import-outside-toplevel
  return keras.Model(model.inputs, [model.outputs[0],
                                    model.get_layer(layer).output],
                     name=f"{model.name}_with_embedding")


def keras_record(model, layer: str, chosen: str) -> dict:
  """The card's `embedding` for a Keras model served by the Keras engine."""
  shape = [int(d) for d in model.get_layer(layer).output.shape[1:]]
  record = {"layer": layer, "dimension": int(np.prod(shape)),
            "chosen": chosen, "engines": {"keras": {"layer": layer}}}
  if len(shape) > 1:
    record["flattened_from"] = ["batch"] + shape
  return record


def difference(reference: np.ndarray, served: np.ndarray) -> dict:
  """How far a served embedding is from its source's: the largest absolute
  difference, the scale it is judged at, and whether it is within
  EMBEDDING_TOLERANCE."""
  reference = np.asarray(reference, np.float64)
  served = np.asarray(served, np.float64)
  if reference.shape != served.shape:
    raise EmbeddingError(f"the served embedding has shape {served.shape} "
                         f"where the source's has {reference.shape}")
  scale = max(1.0, float(np.max(np.abs(reference), initial=0.0)))
  largest = float(np.max(np.abs(reference - served), initial=0.0))
  finite = bool(np.isfinite(served).all() and np.isfinite(reference).all())
  return {"max_difference": largest, "scale": scale,
          "tolerance": EMBEDDING_TOLERANCE,
          "within": finite and largest <= EMBEDDING_TOLERANCE * scale}


def match_tflite_outputs(tflite_bytes: bytes, two_outputs, inputs: np.ndarray,
                         checked_on: str) -> dict:
  """The card's record for a TFLite file converted from `two_outputs`
  (scores, embedding): which output is which, told by their values on
  `inputs` (model inputs, already scaled), and how far the embedding is
  from Keras' (`within` the tolerance or not). Raises EmbeddingError when
  the outputs cannot be told apart."""
  from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
  inputs = np.asarray(inputs[:CHECK_ROWS], np.float32)
  interpreter = litert.Interpreter(model_content=tflite_bytes)
  details = interpreter.get_input_details()[0]
  batch = inputs if len(details["shape"]) == inputs.ndim else inputs[..., 0]
  interpreter.resize_tensor_input(details["index"], list(batch.shape))
  interpreter.allocate_tensors()
  interpreter.set_tensor(details["index"], batch)
  interpreter.invoke()
  outputs = {detail["name"]: interpreter.get_tensor(detail["index"]).copy()
             for detail in interpreter.get_output_details()}
  references = [np.asarray(r) for r in two_outputs.predict(
      inputs, batch_size=CHECK_ROWS, verbose=0)]
  if len(outputs) != 2:
    raise EmbeddingError(f"the TFLite conversion has {len(outputs)} outputs; "
                         "expected scores and embedding")
  names = {}
  for role, reference in zip(("scores", "embedding"), references):
    fits = [name for name, values in outputs.items()
            if values.shape == reference.shape and name not in names.values()]
    best = min(fits, key=lambda name: float(np.max(np.abs(
        outputs[name] - reference), initial=0.0)), default=None)
    if best is None:
      raise EmbeddingError(f"no TFLite output has the shape of the Keras "
                           f"{role} {reference.shape}")
    names[role] = best
  check = difference(references[1], outputs[names["embedding"]])
  return {**names, **check, "images": int(len(inputs)),
          "checked_on": checked_on, "against": "keras"}


def convert_with_embedding(model, layer: str, inputs: np.ndarray,
                           checked_on: str, convert) -> tuple:
  """(TFLite bytes, the card's tflite record): `convert` of the model with
  `layer` as a second output. Its embedding is served when it is within the
  tolerance of Keras'; else the file serves its scores output alone, the
  Keras engine serves the embedding, and the record says why
  (`not_served`, and `scores`, the output to read). Only a file whose
  outputs cannot be told apart is converted again, from the model alone.
  Conversion errors propagate."""
  both = keras_two_outputs(model, layer)
  tflite_bytes = convert(both)
  try:
    record = match_tflite_outputs(tflite_bytes, both, inputs, checked_on)
  except EmbeddingError as error:
    return convert(model), {"not_served": str(error)}
  if record.pop("within"):
    return tflite_bytes, record
  # Deep networks stray (MobileNetV2 by 1.6e-4); the scores are the same
  # graph's, so the file is kept rather than converted again.
  return tflite_bytes, {
      "not_served": f"the TFLite embedding differs from Keras' by up to "
                    f"{record['max_difference']:.3g} on {record['images']} "
                    f"{checked_on} (allowed: {EMBEDDING_TOLERANCE:g} x "
                    f"{record['scale']:.3g})",
      "scores": record["scores"]}


def record_tflite(card, record: dict) -> None:
  """Puts convert_with_embedding's record in the card."""
  if "not_served" in record:
    card.embedding.setdefault("not_served", {})["tflite"] = record[
        "not_served"]
    if "scores" in record:
      card.embedding.setdefault("scores_output", {})["tflite"] = record[
          "scores"]
  else:
    card.embedding["engines"]["tflite"] = record


def refusal(model: str, card) -> str:
  """The one line that says a folder serves no embedding, and how to add
  one."""
  if card.adopted:
    how = (f"adopt {card.adopted.get('source', 'the source')} again: python "
           f"-m model.adopt SOURCE --output DIR ... --embedding_layer NAME "
           "(the Keras layer or ONNX tensor that feeds the classifier; a "
           "SavedModel or .tflite source cannot give one, adopt its .keras "
           "or .onnx)")
  elif "keras" in card.engines:
    how = (f"adopt its model.keras: python -m model.adopt {model}/model.keras "
           "--output DIR --class_names ... [--embedding_layer NAME], or train "
           "it again with this version of python -m model.train, which "
           "records the layer that feeds the classifier")
  else:
    how = ("train or export it again with this version of python -m "
           "model.train, which records the layer that feeds the classifier")
  why = card.adopted.get("embedding") or "its card records none"
  return f"{model} has no embedding output ({why}); to add one, {how}"
