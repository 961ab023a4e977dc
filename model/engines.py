"""Inference engines for an exported model: a compiled Keras call or LiteRT.

Both take a float32 batch (N, H, W, C) of raw [0, 255] pixels and return
softmax probabilities, whatever the card says the model outputs. The export
step uses them to check that TFLite agrees with Keras, and the pipeline's
model handler serves with them.
"""

import os
import threading

import numpy as np

from model import card as card_lib

ENGINES = ("keras", "tflite")


def softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=1, keepdims=True)


class Engine:
  """Runs a model on batches. Subclasses implement `_raw_outputs`."""
  name = ""

  def __init__(self, card: card_lib.ModelCard):
    self.card = card

  def _raw_outputs(self, images: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    outputs = self._raw_outputs(np.asarray(images, dtype=np.float32))
    if self.card.output == "logits":
      return softmax(outputs.astype(np.float64)).astype(np.float32)
    return outputs.astype(np.float32)


class KerasEngine(Engine):
  """A `tf.function` around the model: no per-call `model.predict` overhead."""
  name = "keras"

  def __init__(self, card, model_path: str, threads: int = 0):
    super().__init__(card)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import keras  # pylint: disable=import-outside-toplevel
    if threads:
      _set_tf_threads(tf, threads)
    # safe_mode refuses Lambda layers carrying arbitrary Python code.
    self.model = keras.saving.load_model(model_path, compile=False,
                                         safe_mode=True)
    width = self.model.output_shape[-1]
    if width != card.num_classes:
      raise ValueError(f"{model_path} outputs {width} classes but the card "
                       f"names {card.num_classes}")
    spec = tf.TensorSpec([None, card.height, card.width, card.channels],
                         tf.float32)
    self._call = tf.function(lambda x: self.model(x, training=False),
                             input_signature=[spec], reduce_retracing=True)

  def _raw_outputs(self, images):
    return self._call(images).numpy()


class TFLiteEngine(Engine):
  """LiteRT's interpreter with XNNPACK and an explicit thread count.

  An interpreter is not thread-safe, so calls are serialised with a lock;
  parallelism comes from worker processes and XNNPACK's own threads.
  """
  name = "tflite"

  def __init__(self, card, model_path: str = "", threads: int = 1,
               model_content: bytes = None):
    super().__init__(card)
    from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
    self._interpreter = litert.Interpreter(
        model_path=model_path or None, model_content=model_content,
        num_threads=max(1, threads))
    self._input = self._interpreter.get_input_details()[0]["index"]
    self._output = self._interpreter.get_output_details()[0]["index"]
    self._batch_size = 0
    self._lock = threading.Lock()

  def _raw_outputs(self, images):
    with self._lock:
      if len(images) != self._batch_size:
        self._interpreter.resize_tensor_input(self._input, list(images.shape))
        self._interpreter.allocate_tensors()
        self._batch_size = len(images)
      self._interpreter.set_tensor(self._input, images)
      self._interpreter.invoke()
      return self._interpreter.get_tensor(self._output).copy()


def check_model_shapes(card: card_lib.ModelCard, tflite: bytes) -> None:
  """Refuses a card whose input shape or class count is not the model's.

  Read from the TFLite model's tensors, without TensorFlow: a card with one
  class name too few would otherwise fail only when the first batch is
  labelled.
  """
  from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
  try:
    model = litert.Interpreter(model_content=tflite)
    inputs, outputs = model.get_input_details(), model.get_output_details()
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"{card_lib.TFLITE_FILE} cannot be loaded: "
                     f"{error}") from None
  if len(inputs) != 1 or len(outputs) != 1:
    raise ValueError(f"{card_lib.TFLITE_FILE} has {len(inputs)} inputs and "
                     f"{len(outputs)} outputs; expected one of each")
  width = int(outputs[0]["shape"][-1])
  if width != card.num_classes:
    raise ValueError(f"the model outputs {width} classes but the card names "
                     f"{card.num_classes}")
  shape = [int(d) for d in inputs[0]["shape"][1:]]
  if shape != [int(d) for d in card.input_shape]:
    raise ValueError(f"the model takes input of shape {shape} but the card "
                     f"says {list(card.input_shape)}")


def _set_tf_threads(tf, threads: int) -> None:
  try:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
  except RuntimeError:
    # TensorFlow was initialised already in this process; keep its pool.
    pass


def load_engine(model_dir: str, engine: str, threads: int = 0,
                card: card_lib.ModelCard = None) -> Engine:
  """Loads a local model folder with the named engine."""
  if engine not in ENGINES:
    raise ValueError(f"unknown engine {engine!r}: expected one of {ENGINES}")
  card = card or card_lib.load_card(model_dir)
  if engine == "keras":
    return KerasEngine(card, os.path.join(model_dir, card_lib.MODEL_FILE),
                       threads)
  return TFLiteEngine(card, os.path.join(model_dir, card_lib.TFLITE_FILE),
                      threads or os.cpu_count() or 1)
