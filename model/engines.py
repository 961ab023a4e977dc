"""Inference engines for a model folder: Keras, LiteRT (TFLite), SavedModel.

Every engine takes a float32 batch (N, H, W, C) of decoded [0, 255] pixels,
maps it to the model's input range (the card's `input_scale`, vectorised,
before the model runs) and returns softmax probabilities, whatever the card
says the model outputs. The export step uses them to check that TFLite agrees
with Keras, and the pipeline's model handler serves with them. Only the
Keras and SavedModel engines import TensorFlow; LiteRT needs none.
"""

import os
import threading

import numpy as np

from model import card as card_lib
from model import model_checks
from model import preprocessing

# Fastest first: a folder's default engine is the first it holds.
ENGINES = tuple(card_lib.ENGINE_FILES)
# The engines that import TensorFlow when they load.
TENSORFLOW_ENGINES = ("keras", "savedmodel")


def needs_tensorflow(card: card_lib.ModelCard, engine: str) -> bool:
  """Whether serving a model with `engine` imports TensorFlow: the Keras and
  SavedModel engines do. Neither decoder does (the card's `tensorflow`
  recipe is model/keras_decoding.py), so `card` does not decide it."""
  del card  # Both decoders run without TensorFlow.
  return engine in TENSORFLOW_ENGINES


def softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=1, keepdims=True)


def fit_rank(images: np.ndarray, rank: int) -> np.ndarray:
  """A (N, H, W, 1) batch for a model whose input is (batch, H, W)."""
  if rank == 3 and images.ndim == 4 and images.shape[-1] == 1:
    return images[..., 0]
  return images


class Engine:
  """Runs a model on batches. Subclasses implement `_raw_outputs`."""
  name = ""

  def __init__(self, card: card_lib.ModelCard):
    self.card = card

  def _raw_outputs(self, images: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def model_inputs(self, images: np.ndarray) -> np.ndarray:
    """The card's scaling applied to a batch of [0, 255] pixels."""
    return preprocessing.scale_pixels(images, self.card.input_scale,
                                      self.card.input_mean,
                                      self.card.input_std)

  def outputs(self, images: np.ndarray) -> np.ndarray:
    """What the model itself returns (logits or probabilities)."""
    return self._raw_outputs(self.model_inputs(images))

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    outputs = self.outputs(images)
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
    _check_width(self.model.output_shape[-1], card, model_path)
    self._rank = len(self.model.inputs[0].shape)
    shape = [None, card.height, card.width, card.channels][:self._rank]
    spec = tf.TensorSpec(shape, tf.float32)
    self._call = tf.function(lambda x: self.model(x, training=False),
                             input_signature=[spec], reduce_retracing=True)

  def _raw_outputs(self, images):
    return self._call(fit_rank(images, self._rank)).numpy()


class SavedModelEngine(Engine):
  """A TensorFlow SavedModel's `serving_default` signature.

  Its ops were listed from saved_model.pb and checked before it is loaded
  (`model_checks.check_saved_model`): loading a SavedModel runs its initialisers.
  """
  name = "savedmodel"

  def __init__(self, card, model_path: str, threads: int = 0):
    super().__init__(card)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if threads:
      _set_tf_threads(tf, threads)
    with open(os.path.join(model_path, "saved_model.pb"), "rb") as handle:
      model_checks.check_saved_model(handle.read(), model_path)
    self._tf = tf
    self._loaded = tf.saved_model.load(model_path)
    signature = saved_model_signature(self._loaded, model_path)
    self._function, self._input, spec, self._output = signature
    self._rank = len(spec.shape)
    self._dtype = spec.dtype

  def _raw_outputs(self, images):
    images = fit_rank(images, self._rank)
    outputs = self._function(**{
        self._input: self._tf.cast(self._tf.constant(images), self._dtype)})
    return outputs[self._output].numpy()


def saved_model_signature(loaded, where: str):
  """(function, input name, input spec, output name) of `serving_default`;
  ValueError unless it has one input and one output."""
  signatures = getattr(loaded, "signatures", {})
  if "serving_default" not in signatures:
    raise ValueError(f"{where} has no serving_default signature; it has "
                     f"{sorted(signatures) or 'none'}")
  function = signatures["serving_default"]
  _, inputs = function.structured_input_signature
  outputs = function.structured_outputs
  if len(inputs) != 1 or len(outputs) != 1:
    raise ValueError(f"{where}: the serving_default signature has "
                     f"{len(inputs)} inputs and {len(outputs)} outputs; a "
                     "classifier needs one image input and one output")
  (name, spec), = inputs.items()
  return function, name, spec, next(iter(outputs))


class TFLiteEngine(Engine):
  """LiteRT's interpreter with XNNPACK and an explicit thread count.

  A full-integer model (uint8/int8 input and output) gets its input quantised
  with the input tensor's scale and zero point and its output dequantised.
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
    details = self._interpreter.get_input_details()[0]
    self._input = details["index"]
    self._input_dtype = details["dtype"]
    self._input_quantization = details["quantization"]
    self._rank = len(details["shape"])
    output = self._interpreter.get_output_details()[0]
    _check_width(output["shape"][-1], card, model_path or "TFLite model")
    self._output = output["index"]
    self._output_quantization = (output["quantization"] if np.issubdtype(
        output["dtype"], np.integer) else None)
    self._batch_size = 0
    self._lock = threading.Lock()

  def _quantised(self, images: np.ndarray) -> np.ndarray:
    if not np.issubdtype(self._input_dtype, np.integer):
      return images.astype(self._input_dtype, copy=False)
    scale, zero_point = self._input_quantization
    if scale:
      images = np.round(images / np.float32(scale)) + zero_point
    limits = np.iinfo(self._input_dtype)
    return np.clip(images, limits.min, limits.max).astype(self._input_dtype)

  def outputs(self, images):
    # The interpreter's activation arena grows with the rows it is sized
    # for (MobileNetV2 at 224x224 holds over a gigabyte for 256), and
    # XNNPACK runs no faster for rows beyond a few: a large batch runs in
    # slices, each scaled on its own, so no scaled copy of it all exists.
    rows = preprocessing.rows_per_slice(int(np.prod(images.shape[1:])))
    run = super().outputs
    if len(images) <= rows:
      return run(images)
    return np.concatenate([run(images[start:start + rows])
                           for start in range(0, len(images), rows)])

  def _raw_outputs(self, images):
    images = self._quantised(fit_rank(images, self._rank))
    with self._lock:
      if len(images) != self._batch_size:
        self._interpreter.resize_tensor_input(self._input, list(images.shape))
        self._interpreter.allocate_tensors()
        self._batch_size = len(images)
      self._interpreter.set_tensor(self._input, images)
      self._interpreter.invoke()
      outputs = self._interpreter.get_tensor(self._output).copy()
    if self._output_quantization is not None:
      scale, zero_point = self._output_quantization
      outputs = (outputs.astype(np.float32) - zero_point) * np.float32(
          scale or 1.0)
    return outputs


def _check_width(width, card: card_lib.ModelCard, where: str) -> None:
  if width is not None and int(width) != card.num_classes:
    raise ValueError(f"{where} outputs {int(width)} classes but the card "
                     f"names {card.num_classes}")


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
  if len(inputs) != 1 or len(outputs) != 1:
    raise ValueError(f"{card_lib.TFLITE_FILE} has {len(inputs)} inputs and "
                     f"{len(outputs)} outputs; expected one of each")
  _check_width(outputs[0]["shape"][-1], card, card_lib.TFLITE_FILE)
  # (batch, height, width[, channels]); -1 in the signature is any size.
  dims = inputs[0].get("shape_signature", inputs[0]["shape"])[1:]
  expected = [int(d) for d in card.input_shape][:len(dims)]
  if any(int(d) not in (-1, e) for d, e in zip(dims, expected)):
    raise ValueError(f"{card_lib.TFLITE_FILE} takes input of shape "
                     f"{[int(d) for d in inputs[0]['shape'][1:]]} but the "
                     f"card says {list(card.input_shape)}")


def _set_tf_threads(tf, threads: int) -> None:
  try:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
  except RuntimeError:
    # TensorFlow was initialised already in this process; keep its pool.
    pass


def load_engine(model_dir: str, engine: str = "", threads: int = 0,
                card: card_lib.ModelCard = None) -> Engine:
  """Loads a local model folder with the named engine (default: the
  fastest the folder holds)."""
  card = card or card_lib.load_card(model_dir)
  engine = engine or card.default_engine
  if engine not in ENGINES:
    raise ValueError(f"unknown engine {engine!r}: expected one of {ENGINES}")
  if engine not in card.engines:
    raise ValueError(f"{model_dir} holds no {engine} model; its engines are "
                     f"{card.engines}")
  path = os.path.join(model_dir, card_lib.ENGINE_FILES[engine])
  if engine == "keras":
    return KerasEngine(card, path, threads)
  if engine == "savedmodel":
    return SavedModelEngine(card, path, threads)
  return TFLiteEngine(card, path, threads or os.cpu_count() or 1)
