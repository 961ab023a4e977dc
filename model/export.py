"""Exports a trained model as one self-describing folder.

The folder holds `model.keras`, `model.tflite`, `model_card.json` and
`training_curves.png`. The TFLite model is checked against Keras on the test
images before anything is written as final.
"""

import contextlib
import io
import os
from typing import Optional

import numpy as np

from model import card as card_lib
from model import embeddings
from model import engines
from model import preprocessing

MIN_TFLITE_AGREEMENT = 0.999


def convert_to_tflite(model) -> bytes:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  converter = tf.lite.TFLiteConverter.from_keras_model(model)
  # The converter prints its SavedModel signature to stdout; keep it quiet.
  with contextlib.redirect_stdout(io.StringIO()):
    return converter.convert()


def tflite_agreement(keras_probabilities: np.ndarray, tflite_bytes: bytes,
                     card: card_lib.ModelCard, images: np.ndarray,
                     batch_size: int = 256) -> dict:
  """Top-1 agreement and largest probability gap between TFLite and Keras."""
  interpreter = engines.TFLiteEngine(card, model_content=tflite_bytes)
  tflite_probabilities = np.concatenate([
      interpreter.probabilities(images[start:start + batch_size])
      for start in range(0, len(images), batch_size)
  ])
  # A row that is not finite disagrees: a bad conversion can yield NaN.
  agree = ((keras_probabilities.argmax(1) == tflite_probabilities.argmax(1)) &
           np.isfinite(tflite_probabilities).all(1))
  return {
      "top1_agreement": float(agree.mean()),
      "images": int(len(images)),
      "max_probability_difference": float(
          np.abs(keras_probabilities - tflite_probabilities).max()),
  }


def plot_curves(history: dict, path: str) -> None:
  """Accuracy and loss, training vs validation, as the Keras tutorial plots."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  epochs = range(1, len(history["loss"]) + 1)
  figure, axes = plt.subplots(1, 2, figsize=(10, 4))
  for axis, metric, title in ((axes[0], "accuracy", "Accuracy"),
                              (axes[1], "loss", "Loss")):
    axis.plot(epochs, history[metric], label=f"Training {metric}")
    if f"val_{metric}" in history:
      axis.plot(epochs, history[f"val_{metric}"], label=f"Validation {metric}")
    axis.set_title(f"Training and validation {metric}")
    axis.set_xlabel("epoch")
    axis.set_ylabel(title)
    axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def _pillow_recipe(height: int, width: int, rescaling: str) -> dict:
  """The card's `preprocessing` of a model trained here."""
  return {
      # This project's own decoder (model.preprocessing.decode_image):
      # uint8 pixels; the model rescales them itself.
      "decoder": "pillow",
      "input_scale": "raw",
      "exif_transpose": True,
      "resize": {"height": height, "width": width,
                 "interpolation": preprocessing.RESIZE_INTERPOLATION,
                 "when": "the decoded size differs"},
      "input_dtype": "float32",
      "input_value_range": [0, 255],
      "rescaling": rescaling,
  }


def _tflite_bytes(model, card: card_lib.ModelCard, layer: Optional[str],
                  chosen: str, model_inputs: np.ndarray) -> bytes:
  """model.tflite: with the embedding as a second output where `layer` is
  one and the output agrees with Keras (the card records which)."""
  if not layer:
    return convert_to_tflite(model)
  card.embedding = embeddings.keras_record(model, layer, chosen)
  tflite_bytes, record = embeddings.convert_with_embedding(
      model, layer, model_inputs, "test images", convert_to_tflite)
  embeddings.record_tflite(card, record)
  return tflite_bytes


def export_model(model,
                 out_dir: str,
                 *,
                 architecture: str,
                 class_names: list,
                 color_mode: str,
                 test_images: np.ndarray,
                 dataset: dict,
                 metrics: dict,
                 training: dict,
                 history: Optional[dict] = None,
                 rescaling: str = "inside the model: x / 255",
                 embedding_layer: Optional[str] = None,
                 embedding_chosen: Optional[str] = None,
                 preprocessing_recipe: Optional[dict] = None,
                 output: str = "logits",
                 write_card: bool = True
                 ) -> card_lib.ModelCard:
  """Writes the model folder and returns its card (unwritten with
  `write_card` False, for a caller that checks more first).

  `rescaling` says what the model's first layers do to the raw [0, 255]
  pixels it takes, unless `preprocessing_recipe` (a composed model keeps
  its backbone's) says otherwise. The embedding is `embedding_layer`'s
  output (default: model/embeddings.py's guess); model.tflite carries it
  when it agrees with Keras to 1e-5, else only the Keras engine serves it.
  """
  os.makedirs(out_dir, exist_ok=True)
  # Until the new card is written, the folder must not pass for a model.
  card_path = os.path.join(out_dir, card_lib.CARD_FILE)
  if os.path.exists(card_path):
    os.remove(card_path)
  height, width, channels = (int(d) for d in model.input_shape[1:])
  layer, chosen = embeddings.keras_layer(model, embedding_layer)
  keras_path = os.path.join(out_dir, card_lib.MODEL_FILE)
  model.save(keras_path)
  with open(keras_path, "rb") as handle:
    keras_bytes = handle.read()

  card = card_lib.ModelCard(
      model_id="",
      architecture=architecture,
      class_names=list(class_names),
      input_shape=[height, width, channels],
      color_mode=color_mode,
      output=output,
      preprocessing=preprocessing_recipe or _pillow_recipe(height, width,
                                                           rescaling),
      dataset=dataset,
      metrics=metrics,
      training=training,
  )
  model_inputs = engines.Engine(card).model_inputs(test_images)
  tflite_bytes = _tflite_bytes(model, card, layer, embedding_chosen or chosen,
                               model_inputs)
  card.validate()
  card.model_id = card_lib.compute_model_id(card, keras_bytes, tflite_bytes)
  keras_outputs = model.predict(model_inputs, batch_size=256,
                                verbose=0).astype(np.float64)
  keras_probabilities = (engines.softmax(keras_outputs) if output == "logits"
                         else keras_outputs)
  card.tflite = tflite_agreement(keras_probabilities, tflite_bytes, card,
                                 test_images.astype(np.float32))
  if card.tflite["top1_agreement"] < MIN_TFLITE_AGREEMENT:
    raise RuntimeError(
        f"TFLite top-1 agrees with Keras on only "
        f"{card.tflite['top1_agreement']:.4f} of test images "
        f"(need {MIN_TFLITE_AGREEMENT}); not exporting a model that would "
        "serve differently per engine")

  with open(os.path.join(out_dir, card_lib.TFLITE_FILE), "wb") as handle:
    handle.write(tflite_bytes)
  if history:
    plot_curves(history, os.path.join(out_dir, card_lib.CURVES_FILE))
  # The card goes last: a folder with a card is a complete model.
  if write_card:
    with open(card_path, "w") as handle:
      handle.write(card.to_json())
  return card
