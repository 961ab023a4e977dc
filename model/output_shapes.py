"""Whether a model file's input and outputs are the ones its card names:
read from the file's tensors, before any image is served, so that a card
with a class too few or an embedding of another width fails at once."""

import numpy as np

from model import card as card_lib


def _embedding_outputs(card: card_lib.ModelCard, engine: str) -> dict:
  """The card's output names of `engine` ({"scores", "embedding"}), or {}."""
  return dict((card.embedding or {}).get("engines", {}).get(engine) or {})


def pick_outputs(names: list, card: card_lib.ModelCard, engine: str,
                 where: str) -> tuple:
  """(index of the scores output, index of the embedding output or None)
  among a model file's outputs: its only one, or as the card names them
  (`embedding.engines`, or `embedding.scores_output` where the file's
  embedding is not served)."""
  named = _embedding_outputs(card, engine)
  if len(names) == 1 and not named:
    return 0, None
  # A file whose embedding output strayed: its scores are read alone.
  scores = (card.embedding or {}).get("scores_output", {}).get(engine)
  if not named and scores in names:
    return names.index(scores), None
  missing = [named.get(role) for role in ("scores", "embedding")
             if named.get(role) not in names]
  if missing:
    raise ValueError(f"{where} has outputs {names}; the card's embedding "
                     f"names {[named.get('scores'), named.get('embedding')]} "
                     f"for the {engine} engine")
  return names.index(named["scores"]), names.index(named["embedding"])


def onnx_input_size(shape: list, layout: str) -> list:
  """[height, width, channels] of an ONNX input shape in `layout`; None
  where a dimension is not a fixed positive number."""
  dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
  if layout == "NCHW":
    return [dims[2], dims[3], dims[1]]
  if layout == "NHWC":
    return dims[1:4]
  return [dims[1], dims[2], 1]


def check_width(width, card: card_lib.ModelCard, where: str) -> None:
  if width is not None and int(width) != card.num_classes:
    raise ValueError(f"{where} outputs {int(width)} classes but the card "
                     f"names {card.num_classes}")


def check_embedding_width(shape, card: card_lib.ModelCard,
                          where: str) -> None:
  """Refuses an embedding output whose values per row (the product of its
  dimensions after the batch's, where all are known) are not the card's."""
  dims = list(shape)[1:] if shape is not None else []
  if (not dims or card.embedding_dimension is None or
      not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims)):
    return
  width = int(np.prod(dims))
  if width != card.embedding_dimension:
    raise ValueError(f"{where}'s embedding output has {width} values per "
                     f"image but the card says {card.embedding_dimension}")


def check_model_shapes(card: card_lib.ModelCard, tflite: bytes) -> None:
  """Refuses a card whose class count or input size is not the TFLite
  model's, read from its tensors without TensorFlow: a card with one class
  name too few would otherwise fail only when the first batch is labelled.
  """
  from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
  try:
    model = litert.Interpreter(model_content=tflite)
    inputs, outputs = model.get_input_details(), model.get_output_details()
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"{card_lib.TFLITE_FILE} cannot be loaded: "
                     f"{error}") from None
  if len(inputs) != 1:
    raise ValueError(f"{card_lib.TFLITE_FILE} has {len(inputs)} inputs; "
                     "expected one")
  scores, embedding = pick_outputs([o["name"] for o in outputs], card,
                                    "tflite", card_lib.TFLITE_FILE)
  check_width(outputs[scores]["shape"][-1], card, card_lib.TFLITE_FILE)
  if embedding is not None:
    check_embedding_width(outputs[embedding]["shape_signature"], card,
                           card_lib.TFLITE_FILE)
  # (batch, height, width[, channels]); -1 in the signature is any size.
  dims = inputs[0].get("shape_signature", inputs[0]["shape"])[1:]
  expected = [int(d) for d in card.input_shape][:len(dims)]
  if any(int(d) not in (-1, e) for d, e in zip(dims, expected)):
    raise ValueError(f"{card_lib.TFLITE_FILE} takes input of shape "
                     f"{[int(d) for d in inputs[0]['shape'][1:]]} but the "
                     f"card says {list(card.input_shape)}")
