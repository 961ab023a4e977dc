"""Named model architectures: the Keras tutorials' baselines and our own.

Every builder returns a functional model whose input is the decoded image as
float32 in [0, 255] and whose output is logits; rescaling is the first layer,
so serving never re-implements it. Augmentation is kept out of the served
model and applied to the training `tf.data` pipeline instead.
"""

import dataclasses
import functools
import math
from typing import Callable, Optional

import keras
import tensorflow as tf
from keras import layers

# An augmentation maps (images, seed) to images: a float32 batch in [0, 255]
# and a stateless seed pair that tf.data draws anew for every batch.
Augmentation = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """An architecture with the training schedule it was tuned with."""
  build: Callable[[tuple, int], keras.Model]
  augment: Optional[Callable[[int], Augmentation]]  # built from the --seed
  epochs: int
  batch_size: int
  learning_rate: float
  description: str
  weight_decay: float = 0.0
  label_smoothing: float = 0.0


def tutorial_mlp(input_shape: tuple, num_classes: int) -> keras.Model:
  """Keras basic classification: Flatten, Dense 128 relu, Dense 10."""
  inputs = keras.Input(shape=input_shape, name="image")
  x = layers.Rescaling(1.0 / 255)(inputs)
  x = layers.Flatten()(x)
  x = layers.Dense(128, activation="relu")(x)
  outputs = layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, outputs, name="tutorial_mlp")


def tutorial_cnn(input_shape: tuple, num_classes: int) -> keras.Model:
  """Keras image classification tutorial CNN, with its Dropout."""
  inputs = keras.Input(shape=input_shape, name="image")
  x = layers.Rescaling(1.0 / 255)(inputs)
  for filters in (16, 32, 64):
    x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
  x = layers.Dropout(0.2)(x)
  x = layers.Flatten()(x)
  x = layers.Dense(128, activation="relu")(x)
  outputs = layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, outputs, name="tutorial_cnn")


def tutorial_augmentation(seed: int) -> Augmentation:
  """The image classification tutorial's flip, rotation and zoom."""
  layer = keras.Sequential([
      layers.RandomFlip("horizontal", seed=seed),
      layers.RandomRotation(0.1, seed=seed),
      layers.RandomZoom(0.1, seed=seed),
  ], name="augmentation")
  return lambda images, _: layer(images, training=True)


def random_affine(images, seed, rotation: float = 0.0,
                  zoom: tuple = (1.0, 1.0), shift: float = 0.0,
                  flip: bool = True, brightness: float = 0.0,
                  contrast: float = 0.0, fill_mode: str = "REFLECT"):
  """Flip, rotation, zoom and shift as one warp per batch, then colour jitter.

  Keras' RandomFlip/RandomRotation/RandomZoom/RandomTranslation warp the
  batch once each and use stateful random ops, which op determinism makes
  serial; under `--seed` they cost as much as the training step here. One
  projective transform with stateless randomness costs a quarter of that.

  rotation is a fraction of a full turn, zoom the range of the sampled area's
  side relative to the image (below 1 zooms in), shift a fraction of the side,
  brightness a fraction of 255 and contrast a relative factor.
  """
  shape = tf.shape(images)
  count = shape[0]
  height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
  seeds = tf.random.experimental.stateless_split(seed, 7)

  def uniform(index, low, high, size=None):
    return tf.random.stateless_uniform(size or [count], seeds[index], low, high)

  angle = uniform(0, -rotation, rotation) * 2 * math.pi
  scale = uniform(1, zoom[0], zoom[1])
  mirror = (tf.where(uniform(2, 0.0, 1.0) < 0.5, -1.0, 1.0) if flip
            else tf.ones([count]))
  # The transform maps each output pixel to the input point it samples.
  cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
  a0, a1, b0, b1 = cos * mirror, -sin, sin * mirror, cos
  center_x, center_y = (width - 1) / 2, (height - 1) / 2
  a2 = center_x - a0 * center_x - a1 * center_y + uniform(3, -shift, shift) * width
  b2 = center_y - b0 * center_x - b1 * center_y + uniform(4, -shift, shift) * height
  zeros = tf.zeros([count])
  images = tf.raw_ops.ImageProjectiveTransformV3(
      images=images,
      transforms=tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1),
      output_shape=shape[1:3], fill_value=0.0, interpolation="BILINEAR",
      fill_mode=fill_mode)
  if brightness or contrast:
    factor = tf.reshape(uniform(5, 1 - contrast, 1 + contrast), [-1, 1, 1, 1])
    offset = tf.reshape(uniform(6, -brightness, brightness), [-1, 1, 1, 1])
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    images = tf.clip_by_value(
        (images - mean) * factor + mean + offset * 255, 0, 255)
  return images


# Keras' default momentum of 0.99 leaves the moving statistics far from the
# batch statistics after the few hundred steps small datasets train for, and
# the model then scores near chance in inference mode.
BATCH_NORM_MOMENTUM = 0.9


def _conv_block(x, filters: int, dropout: float):
  for _ in range(2):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM)(x)
    x = layers.Activation("relu")(x)
  x = layers.MaxPooling2D()(x)
  return layers.Dropout(dropout)(x) if dropout else x


def fashion_cnn(input_shape: tuple, num_classes: int) -> keras.Model:
  """A small VGG-style CNN for 28x28 greyscale images."""
  inputs = keras.Input(shape=input_shape, name="image")
  x = layers.Rescaling(1.0 / 255)(inputs)
  x = _conv_block(x, 32, 0.1)
  x = _conv_block(x, 64, 0.2)
  x = layers.Flatten()(x)
  x = layers.Dense(256, activation="relu")(x)
  x = layers.Dropout(0.3)(x)
  outputs = layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, outputs, name="fashion_cnn")


def fashion_augmentation(seed: int) -> Augmentation:
  """Mirror and small shifts: clothes stay clothes under both."""
  del seed  # the seed reaches random_affine per batch
  return functools.partial(random_affine, shift=0.05, fill_mode="CONSTANT")


def _photo_stem(inputs):
  """Rescaling, then a strided convolution that halves the grid."""
  x = layers.Rescaling(1.0 / 255)(inputs)
  x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(x)
  x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM)(x)
  return layers.Activation("relu")(x)


def _photo_head(x, num_classes: int):
  """Global pooling and dropout, then the logits."""
  x = layers.GlobalAveragePooling2D()(x)
  x = layers.Dropout(0.3)(x)
  return layers.Dense(num_classes, name="logits")(x)


def photo_cnn(input_shape: tuple, num_classes: int) -> keras.Model:
  """A compact batch-normalised CNN with global pooling for RGB photos.

  Sized for 64x64 inputs: a strided stem brings them to 32x32, then four
  blocks of two convolutions each halve the grid. The small input buys the
  epochs that strong augmentation needs (docs/training.md).
  """
  inputs = keras.Input(shape=input_shape, name="image")
  x = _photo_stem(inputs)
  for filters in (32, 64, 128, 256):
    x = _conv_block(x, filters, 0.0)
  outputs = _photo_head(x, num_classes)
  return keras.Model(inputs, outputs, name="photo_cnn")


def photo_xception(input_shape: tuple, num_classes: int) -> keras.Model:
  """A small Xception for RGB photos, after keras-io's from-scratch example.

  Separable convolutions with residual shortcuts, sized for 64x64 inputs.
  Depthwise convolutions are cheap in TFLite's XNNPACK, so it serves at a
  fraction of photo_cnn's cost for the same accuracy (docs/training.md).
  """
  inputs = keras.Input(shape=input_shape, name="image")
  x = _photo_stem(inputs)
  shortcut = x
  for filters in (64, 128, 256):
    x = layers.Activation("relu")(x)
    x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM)(x)
    x = layers.Activation("relu")(x)
    x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM)(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    shortcut = layers.Conv2D(filters, 1, strides=2, padding="same",
                             use_bias=False)(shortcut)
    x = shortcut = layers.add([x, shortcut])
  x = layers.SeparableConv2D(512, 3, padding="same", use_bias=False)(x)
  x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM)(x)
  x = layers.Activation("relu")(x)
  outputs = _photo_head(x, num_classes)
  return keras.Model(inputs, outputs, name="photo_xception")


def photo_augmentation(seed: int) -> Augmentation:
  """Mirror, rotate, zoom, shift and relight: a flower is still that flower."""
  del seed
  return functools.partial(random_affine, rotation=0.1, zoom=(0.7, 1.1),
                           shift=0.1, brightness=0.2, contrast=0.3)


ARCHITECTURES = {
    "tutorial_mlp": Recipe(tutorial_mlp, None, epochs=10, batch_size=32,
                           learning_rate=1e-3,
                           description="Keras basic classification baseline"),
    "tutorial_cnn": Recipe(tutorial_cnn, tutorial_augmentation, epochs=15,
                           batch_size=32, learning_rate=1e-3,
                           description="Keras image classification baseline"),
    "fashion_cnn": Recipe(fashion_cnn, fashion_augmentation, epochs=50,
                          batch_size=64, learning_rate=2e-3,
                          description="VGG-style CNN for Fashion-MNIST"),
    # AdamW's decay is decoupled from the learning rate, so it takes values
    # near 0.05, not the 1e-4 of L2 penalties (docs/training.md).
    "photo_cnn": Recipe(photo_cnn, photo_augmentation, epochs=60,
                        batch_size=32, learning_rate=2e-3, weight_decay=0.05,
                        label_smoothing=0.1,
                        description="batch-normalised CNN for 64x64 photos"),
    # photo_cnn's schedule at a larger batch; why it is the default is in
    # docs/training.md.
    "photo_xception": Recipe(photo_xception, photo_augmentation, epochs=60,
                             batch_size=64, learning_rate=3e-3,
                             weight_decay=0.05, label_smoothing=0.1,
                             description="small Xception for 64x64 photos"),
}


def get_recipe(name: str) -> Recipe:
  if name not in ARCHITECTURES:
    raise ValueError(f"unknown architecture {name!r}: expected one of "
                     f"{', '.join(sorted(ARCHITECTURES))}")
  return ARCHITECTURES[name]
