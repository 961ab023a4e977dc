"""Inference engines for a model folder: Keras, LiteRT (TFLite), SavedModel,
ONNX Runtime.

Every engine takes a float32 batch (N, H, W, C) of decoded [0, 255] pixels,
maps it to the model's input range (the card's `input_scale`, vectorised,
before the model runs) and returns softmax probabilities, whatever the card
says the model outputs. The export step uses them to check that TFLite agrees
with Keras, and the pipeline's model handler serves with them. Only the
Keras and SavedModel engines import TensorFlow; LiteRT and ONNX Runtime need
none.
"""

import os
import tempfile
import threading

import numpy as np

from model import card as card_lib
from model import embeddings
from model import model_checks
from model import output_shapes
from model import preprocessing

# The graph input types the onnx engine feeds, and the NumPy type of each.
ONNX_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Every engine, fastest first: a folder's default engine is the first it
# holds.
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
  """Runs a model on batches. Subclasses implement `_raw_outputs`, and
  `_raw_outputs_and_embeddings` when the card gives them an embedding."""
  name = ""

  def __init__(self, card: card_lib.ModelCard):
    self.card = card

  def _raw_outputs(self, images: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def _raw_outputs_and_embeddings(self, images: np.ndarray) -> tuple:
    raise ValueError(f"the {self.name} engine serves no embedding for this "
                     "model")

  def model_inputs(self, images: np.ndarray) -> np.ndarray:
    """The card's scaling applied to a batch of [0, 255] pixels."""
    return preprocessing.scale_pixels(images, self.card.input_scale,
                                      self.card.input_mean,
                                      self.card.input_std)

  def outputs(self, images: np.ndarray) -> np.ndarray:
    """What the model itself returns (logits or probabilities)."""
    return self._raw_outputs(self.model_inputs(images))

  def outputs_and_embeddings(self, images: np.ndarray) -> tuple:
    """(outputs, embeddings): the model's scores and the card's embedding
    layer, from one run."""
    return self._raw_outputs_and_embeddings(self.model_inputs(images))

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    return self._probabilities(self.outputs(images))

  def probabilities_and_embeddings(self, images: np.ndarray) -> tuple:
    """(probabilities, float32 embeddings (N, D)) from one run."""
    outputs, embeddings = self.outputs_and_embeddings(images)
    return (self._probabilities(outputs),
            np.asarray(embeddings, np.float32).reshape(len(embeddings), -1))

  def _probabilities(self, outputs: np.ndarray) -> np.ndarray:
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
    output_shapes.check_width(self.model.output_shape[-1], card, model_path)
    self._rank = len(self.model.inputs[0].shape)
    shape = [None, card.height, card.width, card.channels][:self._rank]
    spec = tf.TensorSpec(shape, tf.float32)
    self._call = tf.function(lambda x: self.model(x, training=False),
                             input_signature=[spec], reduce_retracing=True)
    self._call_with_embedding = None
    if "keras" in card.embedding_engines:
      both = embeddings.keras_two_outputs(self.model,
                                          card.embedding["layer"])
      output_shapes.check_embedding_width(both.outputs[1].shape, card,
                                          model_path)
      self._call_with_embedding = tf.function(
          lambda x: both(x, training=False), input_signature=[spec],
          reduce_retracing=True)

  def _raw_outputs(self, images):
    return self._call(fit_rank(images, self._rank)).numpy()

  def _raw_outputs_and_embeddings(self, images):
    if self._call_with_embedding is None:
      return super()._raw_outputs_and_embeddings(images)
    scores, embeddings = self._call_with_embedding(fit_rank(images,
                                                            self._rank))
    return scores.numpy(), embeddings.numpy()


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
    where = model_path or "TFLite model"
    outputs = self._interpreter.get_output_details()
    scores, embedding = output_shapes.pick_outputs(
        [o["name"] for o in outputs], card, "tflite", where)
    output = outputs[scores]
    output_shapes.check_width(output["shape"][-1], card, where)
    self._output = output["index"]
    self._output_quantization = (output["quantization"] if np.issubdtype(
        output["dtype"], np.integer) else None)
    self._embedding = None
    if embedding is not None:
      output_shapes.check_embedding_width(
          outputs[embedding]["shape_signature"], card, where)
      self._embedding = outputs[embedding]["index"]
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
    # XNNPACK runs no faster for rows beyond a few.
    return _in_slices(super().outputs, images)

  def outputs_and_embeddings(self, images):
    return _in_slices(super().outputs_and_embeddings, images)

  def _raw_outputs(self, images):
    return self._invoke(images, with_embedding=False)[0]

  def _raw_outputs_and_embeddings(self, images):
    if self._embedding is None:
      return super()._raw_outputs_and_embeddings(images)
    return self._invoke(images, with_embedding=True)

  def _invoke(self, images, with_embedding: bool) -> tuple:
    images = self._quantised(fit_rank(images, self._rank))
    embeddings = None
    with self._lock:
      if len(images) != self._batch_size:
        self._interpreter.resize_tensor_input(self._input, list(images.shape))
        self._interpreter.allocate_tensors()
        self._batch_size = len(images)
      self._interpreter.set_tensor(self._input, images)
      self._interpreter.invoke()
      outputs = self._interpreter.get_tensor(self._output).copy()
      if with_embedding:
        embeddings = self._interpreter.get_tensor(self._embedding).copy()
    if self._output_quantization is not None:
      scale, zero_point = self._output_quantization
      outputs = (outputs.astype(np.float32) - zero_point) * np.float32(
          scale or 1.0)
    return outputs, embeddings


def onnx_session(model_content: bytes, threads: int = 1):
  """An ONNX Runtime session on CPU for a model's bytes: `threads` intra-op
  threads, one inter-op thread, nodes run in order.

  No custom-op library is ever registered. The model is loaded from bytes
  with the external-data folder set to a fresh empty one, so whatever the
  bytes say, the session reads no other file (a model loaded from bytes
  otherwise reads external data relative to the working directory). Raises
  ValueError with ONNX Runtime's first line if the model does not load.
  """
  import onnxruntime  # pylint: disable=import-outside-toplevel
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = max(1, threads)
  options.inter_op_num_threads = 1
  options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
  # Failures are raised as exceptions; ONNX Runtime need not also log them.
  options.log_severity_level = 4
  options.add_session_config_entry("session.load_model_format", "ONNX")
  with tempfile.TemporaryDirectory(prefix="onnx-no-external-data-") as empty:
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", empty)
    try:
      return onnxruntime.InferenceSession(
          model_content, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # pylint: disable=broad-except
      lines = [line for line in str(error).splitlines() if line.strip()]
      raise ValueError("ONNX Runtime cannot load the model: " +
                       (lines[0] if lines else type(error).__name__)) from None


def onnx_layout(images: np.ndarray, layout: str, dtype) -> np.ndarray:
  """A scaled (N, H, W, C) batch as a graph in `layout` takes it."""
  if layout == "NCHW":
    images = images.transpose(0, 3, 1, 2)
  elif layout == "NHW":
    images = images[..., 0]
  return np.ascontiguousarray(images, dtype=dtype)


class OnnxEngine(Engine):
  """ONNX Runtime on CPU (see `onnx_session`).

  The card's `preprocessing.layout` says where the graph keeps its channels:
  the scaled (N, H, W, C) batch is transposed to (N, C, H, W) for NCHW, and
  loses its 1-wide channel axis for NHW. A float16 graph gets float16
  input. A graph whose batch axis is fixed at 1 (adopting proves whether it
  can be made symbolic, and serves it fixed when not) runs one image at a
  time. A session may run from several threads at once.
  """
  name = "onnx"

  def __init__(self, card, model_path: str = "", threads: int = 1,
               model_content: bytes = None):
    super().__init__(card)
    where = model_path or card_lib.ONNX_FILE
    self._layout = card.preprocessing.get("layout")
    if self._layout not in card_lib.ONNX_LAYOUTS:
      raise ValueError(f"the card's preprocessing.layout must be one of "
                       f"{card_lib.ONNX_LAYOUTS} for the onnx engine, got "
                       f"{self._layout!r}")
    if model_content is None:
      with open(model_path, "rb") as handle:
        model_content = handle.read()
    self._session = onnx_session(model_content, threads)
    inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
    if len(inputs) != 1:
      raise ValueError(f"{where} has {len(inputs)} inputs; expected one")
    scores, embedding = output_shapes.pick_outputs(
        [o.name for o in outputs], card, "onnx", where)
    self._input, self._output = inputs[0].name, outputs[scores].name
    self._embedding = None
    if embedding is not None:
      self._embedding = outputs[embedding].name
      output_shapes.check_embedding_width(outputs[embedding].shape, card,
                                          where)
    if inputs[0].type not in ONNX_INPUT_TYPES:
      raise ValueError(f"{where} takes {inputs[0].type}; the onnx engine "
                       f"feeds {sorted(ONNX_INPUT_TYPES)}")
    self._dtype = ONNX_INPUT_TYPES[inputs[0].type]
    if len(inputs[0].shape) != (3 if self._layout == "NHW" else 4):
      raise ValueError(f"{where} takes input of shape {inputs[0].shape}, "
                       f"which is not {self._layout}")
    batch = inputs[0].shape[0]
    if isinstance(batch, int) and batch != 1:
      raise ValueError(f"{where} has a fixed batch of {batch}; the onnx "
                       "engine serves a batch axis of 1 or a symbolic one")
    self._one_at_a_time = batch == 1
    width = outputs[scores].shape[-1] if outputs[scores].shape else None
    output_shapes.check_width(width if isinstance(width, int) else None,
                              card, where)

  def outputs(self, images):
    # ONNX Runtime's working memory grows with the rows of a call, and
    # runs no faster for rows beyond a few.
    return _in_slices(super().outputs, images)

  def outputs_and_embeddings(self, images):
    return _in_slices(super().outputs_and_embeddings, images)

  def _raw_outputs(self, images):
    return self._run([self._output], images)[0]

  def _raw_outputs_and_embeddings(self, images):
    if self._embedding is None:
      return super()._raw_outputs_and_embeddings(images)
    return tuple(self._run([self._output, self._embedding], images))

  def _run(self, names: list, images) -> list:
    images = onnx_layout(images, self._layout, self._dtype)
    if not self._one_at_a_time:
      results = self._session.run(names, {self._input: images})
    else:
      runs = [self._session.run(names, {self._input: images[i:i + 1]})
              for i in range(len(images))]
      results = [np.concatenate([run[k] for run in runs])
                 for k in range(len(names))]
    return [np.asarray(result).astype(np.float32, copy=False)
            for result in results]


def check_onnx_model_shapes(card: card_lib.ModelCard, model: bytes) -> None:
  """Refuses a card whose class count or input size is not the ONNX
  model's, read by ONNX Runtime without running it (as
  `check_model_shapes` does for TFLite)."""
  where = card_lib.ONNX_FILE
  session = onnx_session(model)
  inputs, outputs = session.get_inputs(), session.get_outputs()
  if len(inputs) != 1:
    raise ValueError(f"{where} has {len(inputs)} inputs; expected one")
  scores, embedding = output_shapes.pick_outputs(
      [o.name for o in outputs], card, "onnx", where)
  width = outputs[scores].shape[-1] if outputs[scores].shape else None
  output_shapes.check_width(width if isinstance(width, int) else None, card,
                            where)
  if embedding is not None:
    output_shapes.check_embedding_width(outputs[embedding].shape, card,
                                        where)
  layout = card.preprocessing.get("layout")
  if layout not in card_lib.ONNX_LAYOUTS or len(inputs[0].shape) != (
      3 if layout == "NHW" else 4):
    raise ValueError(f"{where} takes input of shape {inputs[0].shape}, "
                     f"which is not the card's layout {layout!r}")
  size = output_shapes.onnx_input_size(inputs[0].shape, layout)
  if any(d is not None and d != int(e) for d, e in zip(size,
                                                        card.input_shape)):
    raise ValueError(f"{where} takes input of shape {inputs[0].shape} "
                     f"({layout}) but the card says {list(card.input_shape)}")


def _in_slices(run, images: np.ndarray):
  """`run` over a large batch in slices of `rows_per_slice` rows, each
  scaled on its own, so no scaled copy of the whole batch exists. `run`
  returns an array, or a tuple of arrays (outputs and embeddings)."""
  rows = preprocessing.rows_per_slice(int(np.prod(images.shape[1:])))
  if len(images) <= rows:
    return run(images)
  parts = [run(images[start:start + rows])
           for start in range(0, len(images), rows)]
  if isinstance(parts[0], tuple):
    return tuple(np.concatenate(column) for column in zip(*parts))
  return np.concatenate(parts)


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
  if engine == "onnx":
    return OnnxEngine(card, path, threads or os.cpu_count() or 1)
  return TFLiteEngine(card, path, threads or os.cpu_count() or 1)
