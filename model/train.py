"""Trains an image classifier and exports it for the pipeline.

Usage:
  python -m model.train --output models/fashion                      # Keras loader
  python -m model.train --data sample_data/fashion-mnist --output models/fashion
  python -m model.train --data ../shared/data/flowers --output models/flowers
"""

import logging
import os
import sys
import time

import numpy as np

from model import cli
from model import datasets

DEFAULT_SEED = 0
DEFAULT_VALIDATION_SPLIT = 0.2
DEFAULT_IMAGE_SIZE = 64
MIN_TRAIN_IMAGES = 20
MIN_IMAGES_PER_CLASS = 2
_LOG = logging.getLogger("model.train")


def load_dataset(data: str, image_size: int, color_mode: str,
                 validation_split: float, seed: int) -> datasets.Dataset:
  """Fashion-MNIST from Keras or an IDX folder, else a folder of classes."""
  if data is None:
    return datasets.load_fashion_mnist()
  if not os.path.isdir(data):
    raise FileNotFoundError(
        f"no data folder at {data}: expected Fashion-MNIST's four "
        "*-idx?-ubyte.gz files or one sub-folder of images per class")
  if datasets.is_fashion_mnist_dir(data):
    return datasets.load_fashion_mnist(data)
  return datasets.load_image_folder(data, (image_size, image_size), color_mode,
                                    validation_split, seed)


def check_dataset(dataset: datasets.Dataset) -> None:
  """Refuses data too small to train on, before TensorFlow sees it."""
  if len(dataset.train) < MIN_TRAIN_IMAGES:
    raise ValueError(f"{dataset.source} has {len(dataset.train)} training "
                     f"images; need at least {MIN_TRAIN_IMAGES}")
  if len(dataset.test) == 0:
    raise ValueError(f"{dataset.source} has no {dataset.test_name} images")
  counts = np.bincount(dataset.train.labels, minlength=len(dataset.class_names))
  sparse = [name for name, count in zip(dataset.class_names, counts)
            if count < MIN_IMAGES_PER_CLASS]
  if sparse:
    raise ValueError(f"{dataset.source}: classes with fewer than "
                     f"{MIN_IMAGES_PER_CLASS} training images: {sparse}")


def make_tf_dataset(split: datasets.Split, batch_size: int, seed: int,
                    augment=None, shuffle: bool = False, num_classes: int = 0):
  """Batches of (images, labels); labels are one-hot when num_classes is set.

  One-hot targets are what label smoothing needs.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  data = tf.data.Dataset.from_tensor_slices(
      (split.images.astype(np.float32), split.labels)).cache()
  if shuffle:
    data = data.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
  data = data.batch(batch_size)
  if num_classes:
    data = data.map(lambda x, y: (x, tf.one_hot(y, num_classes)))
  if augment is not None:
    # One seed pair per batch, different in every epoch, the same every run.
    # Stateless ops: op determinism would make stateful ones run serially.
    seeds = tf.data.Dataset.random(
        seed=seed, rerandomize_each_iteration=True).batch(2)
    data = tf.data.Dataset.zip(data, seeds).map(
        lambda batch, pair: (augment(batch[0], pair), batch[1]),
        num_parallel_calls=tf.data.AUTOTUNE)
  return data.prefetch(tf.data.AUTOTUNE)


def train(dataset: datasets.Dataset, architecture: str, output: str,
          epochs: int = None, batch_size: int = None,
          learning_rate: float = None, seed: int = DEFAULT_SEED,
          verbose: int = 2):
  """Trains, evaluates and exports; returns the model card."""
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  # TensorFlow loads only now, after every path and flag has been checked.
  from model import architectures  # pylint: disable=import-outside-toplevel
  from model import export  # pylint: disable=import-outside-toplevel

  check_dataset(dataset)
  recipe = architectures.get_recipe(architecture)
  epochs = epochs or recipe.epochs
  batch_size = batch_size or recipe.batch_size
  learning_rate = learning_rate or recipe.learning_rate
  keras.utils.set_random_seed(seed)
  tf.config.experimental.enable_op_determinism()

  input_shape = dataset.train.images.shape[1:]
  model = recipe.build(input_shape, len(dataset.class_names))
  steps = epochs * -(-len(dataset.train) // batch_size)
  schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
  optimizer = (keras.optimizers.AdamW(schedule, weight_decay=recipe.weight_decay)
               if recipe.weight_decay else keras.optimizers.Adam(schedule))
  one_hot = recipe.label_smoothing > 0
  model.compile(
      optimizer=optimizer,
      loss=(keras.losses.CategoricalCrossentropy(
          from_logits=True, label_smoothing=recipe.label_smoothing)
            if one_hot else
            keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
      metrics=["accuracy"])
  augment = recipe.augment(seed) if recipe.augment else None
  num_classes = len(dataset.class_names) if one_hot else 0
  train_data = make_tf_dataset(dataset.train, batch_size, seed, augment,
                               shuffle=True, num_classes=num_classes)
  test_data = make_tf_dataset(dataset.test, 256, seed, num_classes=num_classes)

  started = time.monotonic()
  # The tf.data pipeline shuffles; Keras' own shuffle does not apply to it.
  history = model.fit(train_data, validation_data=test_data, epochs=epochs,
                      shuffle=False, verbose=verbose)
  seconds = time.monotonic() - started
  loss, accuracy = model.evaluate(test_data, verbose=0)
  _LOG.info("%s accuracy %.4f after %d epochs in %.0fs", dataset.test_name,
            accuracy, epochs, seconds)

  return export.export_model(
      model, output,
      architecture=architecture,
      class_names=dataset.class_names,
      color_mode=dataset.color_mode,
      test_images=dataset.test.images,
      dataset={
          "name": dataset.name,
          "source": dataset.source,
          "train_images": len(dataset.train),
          f"{dataset.test_name}_images": len(dataset.test),
          "evaluated_on": dataset.test_name,
          "split_seed": dataset.split_seed,  # None: the split came given
      },
      metrics={
          f"{dataset.test_name}_accuracy": round(float(accuracy), 6),
          f"{dataset.test_name}_loss": round(float(loss), 6),
          "train_accuracy": round(float(history.history["accuracy"][-1]), 6),
      },
      training={
          "epochs": epochs,
          "batch_size": batch_size,
          "learning_rate": learning_rate,
          "seed": seed,
          "seconds": round(seconds, 1),
          "tensorflow": tf.__version__,
          "keras": keras.__version__,
      },
      history=history.history)


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m model.train",
                              description=__doc__)
  parser.add_argument(
      "--data", default=None,
      help="Fashion-MNIST IDX folder or folder of class sub-folders "
      "(default: none, keras.datasets.fashion_mnist, which downloads)")
  parser.add_argument("--output", required=True, help="model folder to write")
  parser.add_argument("--architecture", default=None,
                      help="a recipe from model/architectures.py: "
                      "tutorial_mlp, tutorial_cnn, fashion_cnn, photo_cnn or "
                      "photo_xception (default: fashion_cnn for "
                      "Fashion-MNIST, photo_xception for image folders)")
  parser.add_argument("--epochs", type=int, default=None,
                      help="passes over the training images (default: the "
                      "architecture's own)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="images per training step (default: the "
                      "architecture's own)")
  parser.add_argument("--learning_rate", type=float, default=None,
                      help="peak of the cosine schedule (default: the "
                      "architecture's own)")
  parser.add_argument("--image_size", type=int, default=DEFAULT_IMAGE_SIZE,
                      help="square input size for image folders")
  parser.add_argument("--color_mode", default="rgb",
                      choices=["rgb", "grayscale"],
                      help="colour mode for image folders")
  parser.add_argument("--validation_split", type=float,
                      default=DEFAULT_VALIDATION_SPLIT,
                      help="share of an image folder held out for validation")
  parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                      help="seeds weights, shuffling and augmentation, and "
                      "the validation split unless --split_seed is given")
  parser.add_argument("--split_seed", type=int, default=None,
                      help="seed of the validation split alone, to compare "
                      "training seeds on one split (default: --seed)")
  parser.add_argument("--quiet", action="store_true",
                      help="no per-epoch lines")
  parser.add_argument("--verbose", action="store_true",
                      help="also TensorFlow's and Keras' own log lines")
  return parser


def parse_args(argv):
  return build_parser().parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.quiet_libraries(args.verbose)
  try:
    dataset = load_dataset(args.data, args.image_size, args.color_mode,
                           args.validation_split,
                           args.seed if args.split_seed is None
                           else args.split_seed)
    architecture = args.architecture or (
        "fashion_cnn" if dataset.name == "fashion_mnist" else "photo_xception")
    card = train(dataset, architecture, args.output, args.epochs,
                 args.batch_size, args.learning_rate, args.seed,
                 verbose=0 if args.quiet else 2)
  except (FileNotFoundError, ValueError, RuntimeError) as error:
    print(f"model.train: error: {error}", file=sys.stderr)
    return 2
  print(f"exported {card.architecture} model {card.model_id} to "
        f"{args.output}: {card.metrics}, TFLite agreement "
        f"{card.tflite['top1_agreement']:.4f}")
  cli.print_next(
      f"{args.output} (model.keras, model.tflite, model_card.json, "
      "training_curves.png)",
      [cli.command("python", "-m", "beam_jobs.predict", "--input",
                   "IMAGES_OR_SHARDS", "--model", args.output, "--output",
                   "OUTPUT_DIR")])
  return 0


if __name__ == "__main__":
  sys.exit(main())
