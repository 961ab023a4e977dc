"""Named model architectures: the Keras tutorials' baselines and our own.

Every builder returns a functional model whose input is the decoded image as
float32 in [0, 255] and whose output is logits; rescaling is the first layer,
so serving never re-implements it. Augmentation is kept out of the served
model and applied to the training `tf.data` pipeline instead.
"""

import dataclasses
from typing import Callable, Optional

import keras
from keras import layers


@dataclasses.dataclass(frozen=True)
class Recipe:
  """An architecture with the training schedule it was tuned with."""
  build: Callable[[tuple, int], keras.Model]
  augment: Optional[Callable[[int], keras.Sequential]]
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


def tutorial_augmentation(seed: int) -> keras.Sequential:
  """The image classification tutorial's flip, rotation and zoom."""
  return keras.Sequential([
      layers.RandomFlip("horizontal", seed=seed),
      layers.RandomRotation(0.1, seed=seed),
      layers.RandomZoom(0.1, seed=seed),
  ], name="augmentation")


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


def fashion_augmentation(seed: int) -> keras.Sequential:
  """Mirror and small shifts: clothes stay clothes under both."""
  return keras.Sequential([
      layers.RandomFlip("horizontal", seed=seed),
      layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed),
  ], name="augmentation")


def photo_cnn(input_shape: tuple, num_classes: int) -> keras.Model:
  """A compact batch-normalised CNN with global pooling for RGB photos.

  A strided stem and a pooling step bring 128x128 photos to 32x32 before the
  first block, which keeps training on two CPU cores within minutes.
  """
  inputs = keras.Input(shape=input_shape, name="image")
  x = layers.Rescaling(1.0 / 255)(inputs)
  x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(x)
  x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM)(x)
  x = layers.Activation("relu")(x)
  x = layers.MaxPooling2D()(x)
  for filters in (32, 64, 128, 256):
    x = _conv_block(x, filters, 0.0)
  x = layers.GlobalAveragePooling2D()(x)
  x = layers.Dropout(0.3)(x)
  outputs = layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, outputs, name="photo_cnn")


def photo_augmentation(seed: int) -> keras.Sequential:
  return keras.Sequential([
      layers.RandomFlip("horizontal", seed=seed),
      layers.RandomRotation(0.1, seed=seed),
      layers.RandomZoom(0.2, seed=seed),
      layers.RandomContrast(0.2, seed=seed),
  ], name="augmentation")


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
    "photo_cnn": Recipe(photo_cnn, photo_augmentation, epochs=40,
                        batch_size=32, learning_rate=2e-3, weight_decay=1e-4,
                        description="batch-normalised CNN for photos"),
}


def get_recipe(name: str) -> Recipe:
  if name not in ARCHITECTURES:
    raise ValueError(f"unknown architecture {name!r}: expected one of "
                     f"{', '.join(sorted(ARCHITECTURES))}")
  return ARCHITECTURES[name]
