"""TensorFlow's own decoding, the reference model/keras_decoding.py matches.

Serving no longer imports TensorFlow for the `tensorflow` decoder recipe;
the tests and benchmarks/decoder_parity.py compare against this class,
which is what model/preprocessing.py ran before: Keras'
`image_dataset_from_directory` recipe, one traced TensorFlow call per batch.
Importing this module imports TensorFlow.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

# Batches of other lengths retrace the batch function, and TensorFlow says
# so on every fifth; the reference is right all the same.
tf.get_logger().setLevel("ERROR")

CHANNELS = {"grayscale": 1, "rgb": 3}


def tensorflow_message(error) -> str:
  """The one useful line of a TensorFlow op error."""
  lines = [line.strip() for line in str(getattr(error, "message", error))
           .splitlines() if line.strip()]
  useful = [line for line in lines if not line.startswith(
      ("Graph execution error", "Detected at node", "[[", "File "))]
  line = (useful or lines or [type(error).__name__])[0]
  if line.startswith("{{"):
    line = line.split("}}", 1)[-1].strip()
  return line.split(" [Op:")[0]


def decode_image(data: bytes, channels: int) -> np.ndarray:
  """`tf.io.decode_image(data, channels, expand_animations=False)`, uint8;
  a failure is a ValueError with TensorFlow's one useful line."""
  try:
    return tf.io.decode_image(data, channels=channels,
                              expand_animations=False).numpy()
  except tf.errors.OpError as error:
    raise ValueError(tensorflow_message(error)) from None


class TensorFlowDecoder:
  """Keras' `image_dataset_from_directory` decoding, one TF call per batch.

  `tf.image.decode_image(channels, expand_animations=False)` then
  `tf.image.resize` (bilinear, no antialiasing, even at the same size), as
  keras/src/utils/image_dataset_utils.py does; float32, neither rounded nor
  clipped. No EXIF rotation, as Keras applies none.
  """

  def __init__(self, height: int, width: int, color_mode: str):
    channels = CHANNELS[color_mode]

    def decode(data):
      image = tf.image.decode_image(data, channels=channels,
                                    expand_animations=False)
      return tf.image.resize(image, (height, width), method="bilinear")

    spec = tf.TensorSpec([height, width, channels], tf.float32)
    # One traced graph mapping over the batch: the decodes run in
    # TensorFlow's C++ thread pool, outside the GIL.
    self._batch = tf.function(
        lambda batch: tf.map_fn(decode, batch, fn_output_signature=spec),
        input_signature=[tf.TensorSpec([None], tf.string)])
    self._one = tf.function(decode,
                            input_signature=[tf.TensorSpec([], tf.string)])

  def decode_batch(self, payloads: list) -> np.ndarray:
    """Decodes every payload; raises if any one of them fails."""
    return self._batch(tf.constant(payloads, tf.string)).numpy()

  def decode(self, data: bytes) -> np.ndarray:
    """Decodes one payload; a failure is a ValueError with one line."""
    try:
      return self._one(tf.constant(data, tf.string)).numpy()
    except tf.errors.OpError as error:
      raise ValueError(tensorflow_message(error)) from None
