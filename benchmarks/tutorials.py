"""Models made the way the TensorFlow tutorials' readers make them.

The adoption tests and benchmarks/adopt_parity.py both stand in for a user
who arrives with a model trained elsewhere; this is the code that user ran.
"""

import numpy as np


def fashion_mlp(train_images: np.ndarray, train_labels: np.ndarray,
                epochs: int, seed: int = 0):
  """The basic-classification tutorial's MLP: a (28, 28) input, pixels
  divided by 255 outside the model, logits out."""
  import keras  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(seed)
  model = keras.Sequential([
      keras.Input((28, 28)),
      keras.layers.Flatten(),
      keras.layers.Dense(128, activation="relu"),
      keras.layers.Dense(10),
  ])
  model.compile(optimizer="adam",
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True),
                metrics=["accuracy"])
  model.fit(train_images / 255.0, train_labels, epochs=epochs, verbose=0)
  return model


def int8_tflite(model, representative_images: np.ndarray) -> bytes:
  """The post-training integer quantisation guide: int8 in and out,
  calibrated on images scaled as in training (x / 255)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def representative_data():
    for image in representative_images:
      yield [(image[np.newaxis] / 255.0).astype(np.float32)]

  converter = tf.lite.TFLiteConverter.from_keras_model(model)
  converter.optimizations = [tf.lite.Optimize.DEFAULT]
  converter.representative_dataset = representative_data
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  converter.inference_input_type = tf.int8
  converter.inference_output_type = tf.int8
  return converter.convert()


def interpreter_logits(tflite_path: str, images: np.ndarray,
                       batch_size: int = 64) -> np.ndarray:
  """The TFLite guide's interpreter loop on float inputs, quantising them
  (and dequantising the output) when the model is integer."""
  from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
  interpreter = litert.Interpreter(model_path=tflite_path)
  details = interpreter.get_input_details()[0]
  output = interpreter.get_output_details()[0]
  if np.issubdtype(details["dtype"], np.integer):
    scale, zero_point = details["quantization"]
    images = np.round(images / scale + zero_point)
  results = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size].astype(details["dtype"])
    interpreter.resize_tensor_input(details["index"], list(batch.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(details["index"], batch)
    interpreter.invoke()
    logits = interpreter.get_tensor(output["index"]).astype(np.float32)
    if np.issubdtype(output["dtype"], np.integer):
      scale, zero_point = output["quantization"]
      logits = (logits - zero_point) * scale
    results.append(logits)
  return np.concatenate(results)
