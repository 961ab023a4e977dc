"""Trains an image classifier and exports it for the pipeline.

Usage:
  python -m model.train --output models/fashion                      # Keras loader
  python -m model.train --data sample_data/fashion-mnist --output models/fashion
  python -m model.train --data ../shared/data/flowers --output models/flowers
  python -m model.train --data ../shared/data/flowers --output models/flowers \
      --backbone MobileNetV3Small --weights imagenet        # transfer learning
  python -m model.train --data ../shared/data/flowers --output models/flowers \
      --features_from models/efficientnet_lite0   # a head on its embeddings
"""

import logging
import os
import sys
import time

import numpy as np

from imagebatch import cli
from model import datasets
from model import embeddings

DEFAULT_SEED = 0
DEFAULT_VALIDATION_SPLIT = 0.2
DEFAULT_IMAGE_SIZE = 64
MIN_TRAIN_IMAGES = 20
MIN_IMAGES_PER_CLASS = 2
_LOG = logging.getLogger("model.train")
# A pretrained backbone: the resolution its ImageNet weights were trained at;
# the Keras transfer-learning guide's rates (Adam at its default for the head,
# 1e-5 to fine-tune) and TensorFlow's transfer-learning tutorial's epochs.
DEFAULT_BACKBONE_IMAGE_SIZE = 224
BACKBONE_MIN_SIZE = 32  # keras.applications refuses smaller inputs
BACKBONE_EPOCHS = 10
BACKBONE_BATCH_SIZE = 32
BACKBONE_LEARNING_RATE = 1e-3
BACKBONE_FINE_TUNE_EPOCHS = 10
BACKBONE_FINE_TUNE_LEARNING_RATE = 1e-5


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
          verbose: int = 2, embedding_layer: str = None):
  """Trains, evaluates and exports; returns the model card. The card's
  embedding is `embedding_layer`, by default the input of the final Dense
  layer."""
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  # TensorFlow loads only now, after every path and flag has been checked.
  from model import architectures  # pylint: disable=import-outside-toplevel

  check_dataset(dataset)
  recipe = architectures.get_recipe(architecture)
  epochs = epochs or recipe.epochs
  batch_size = batch_size or recipe.batch_size
  learning_rate = learning_rate or recipe.learning_rate
  keras.utils.set_random_seed(seed)
  tf.config.experimental.enable_op_determinism()

  input_shape = dataset.train.images.shape[1:]
  model = recipe.build(input_shape, len(dataset.class_names))
  # A wrong --embedding_layer fails now, not after training.
  embeddings.keras_layer(model, embedding_layer)
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
  return _evaluate_and_export(
      model, output, architecture, dataset, test_data, history.history,
      seconds, {"epochs": epochs, "batch_size": batch_size,
                "learning_rate": learning_rate, "seed": seed},
      embedding_layer=embedding_layer)


def train_backbone(dataset: datasets.Dataset, backbone: str, output: str,
                   weights="imagenet", epochs: int = None,
                   batch_size: int = None, learning_rate: float = None,
                   fine_tune_epochs: int = None,
                   fine_tune_learning_rate: float = None,
                   fine_tune_blocks: int = None, seed: int = DEFAULT_SEED,
                   verbose: int = 2, embedding_layer: str = None):
  """Transfer learning in two phases; returns the model card.

  Phase 1 trains a new head on the frozen backbone; phase 2 unfreezes the
  backbone's top `fine_tune_blocks` blocks and trains on at a small learning
  rate (skipped when fine_tune_epochs is 0). `weights` is "imagenet", "none",
  a local file, or a backbones.Weights already resolved.
  """
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from model import architectures  # pylint: disable=import-outside-toplevel
  from model import backbones  # pylint: disable=import-outside-toplevel

  check_dataset(dataset)
  spec = backbones.get_backbone(backbone)
  height, width, channels = _backbone_input(dataset, backbone)
  if isinstance(weights, str):
    weights = backbones.resolve_weights(backbone, weights)
  (epochs, batch_size, learning_rate, fine_tune_epochs,
   fine_tune_learning_rate) = _backbone_schedule(
       epochs, batch_size, learning_rate, fine_tune_epochs,
       fine_tune_learning_rate)
  if fine_tune_blocks is None:
    fine_tune_blocks = spec.fine_tune_blocks
  keras.utils.set_random_seed(seed)
  tf.config.experimental.enable_op_determinism()

  model = backbones.build_classifier(backbone, (height, width, channels),
                                     len(dataset.class_names), weights)
  embeddings.keras_layer(model, embedding_layer)
  if fine_tune_epochs:
    # A bad block count fails now, not after the first phase.
    backbones.check_block_count(backbone, model, fine_tune_blocks)
  augment = architectures.photo_augmentation(seed)
  train_data = make_tf_dataset(dataset.train, batch_size, seed, augment,
                               shuffle=True)
  test_data = make_tf_dataset(dataset.test, 256, seed)

  def fit(learning_rate, first_epoch, last_epoch):
    # compile() fixes which weights train, so each phase compiles anew.
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    return model.fit(train_data, validation_data=test_data,
                     initial_epoch=first_epoch, epochs=last_epoch,
                     shuffle=False, verbose=verbose).history

  started = time.monotonic()
  history = fit(learning_rate, 0, epochs)
  phases = [{"name": "head", "epochs": epochs, "learning_rate": learning_rate,
             "trainable": "the new head; the backbone frozen"}]
  if fine_tune_epochs:
    unfrozen = backbones.unfreeze_top_blocks(backbone, model, fine_tune_blocks)
    _LOG.info("fine-tuning %s: %d trainable weights",
              ", ".join(unfrozen["unfrozen_blocks"]),
              len(model.trainable_weights))
    fine_history = fit(fine_tune_learning_rate, epochs,
                       epochs + fine_tune_epochs)
    history = {key: history[key] + fine_history[key] for key in history}
    phases.append({"name": "fine_tune", "epochs": fine_tune_epochs,
                   "learning_rate": fine_tune_learning_rate, **unfrozen})
  seconds = time.monotonic() - started
  return _evaluate_and_export(
      model, output, backbone, dataset, test_data, history, seconds,
      {"epochs": epochs + fine_tune_epochs, "batch_size": batch_size,
       "learning_rate": learning_rate, "seed": seed,
       "backbone": {"name": backbone, "weights": weights.describe(),
                    "phases": phases}},
      rescaling=spec.rescaling, embedding_layer=embedding_layer)


def _backbone_input(dataset: datasets.Dataset, backbone: str) -> tuple:
  """(height, width, channels) of the images, which a pretrained backbone
  needs in RGB and not too small."""
  height, width, channels = dataset.train.images.shape[1:]
  if channels != 3 or min(height, width) < BACKBONE_MIN_SIZE:
    raise ValueError(
        f"--backbone {backbone} needs RGB images of at least "
        f"{BACKBONE_MIN_SIZE}x{BACKBONE_MIN_SIZE}; {dataset.source} gives "
        f"{height}x{width}x{channels}")
  return height, width, channels


def _backbone_schedule(epochs, batch_size, learning_rate, fine_tune_epochs,
                       fine_tune_learning_rate) -> tuple:
  """The two phases' settings, each flag or its backbone default."""
  epochs = BACKBONE_EPOCHS if epochs is None else epochs
  if epochs < 1:
    raise ValueError(f"--epochs must be at least 1, got {epochs}")
  fine_tune_epochs = (BACKBONE_FINE_TUNE_EPOCHS if fine_tune_epochs is None
                      else fine_tune_epochs)
  if fine_tune_epochs < 0:
    raise ValueError(
        f"--fine_tune_epochs must be 0 or more, got {fine_tune_epochs}")
  return (epochs, batch_size or BACKBONE_BATCH_SIZE,
          learning_rate or BACKBONE_LEARNING_RATE, fine_tune_epochs,
          fine_tune_learning_rate or BACKBONE_FINE_TUNE_LEARNING_RATE)


def _evaluate_and_export(model, output: str, architecture: str,
                         dataset: datasets.Dataset, test_data, history: dict,
                         seconds: float, training: dict, **export_options):
  """Scores the trained model on the held-out split and exports it."""
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from model import export  # pylint: disable=import-outside-toplevel
  loss, accuracy = model.evaluate(test_data, verbose=0)
  _LOG.info("%s accuracy %.4f after %d epochs in %.0fs", dataset.test_name,
            accuracy, len(history["loss"]), seconds)
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
          "train_accuracy": round(float(history["accuracy"][-1]), 6),
      },
      training={
          **training,
          "seconds": round(seconds, 1),
          "tensorflow": tf.__version__,
          "keras": keras.__version__,
      },
      history=history,
      **export_options)


def _add_backbone_flags(parser: cli.ArgumentParser) -> None:
  backbone = parser.add_argument_group(
      "transfer learning", "a pretrained keras.applications backbone under a "
      "new head: the head trains first on the frozen backbone, then the top "
      "blocks are fine-tuned")
  backbone.add_argument("--backbone", default=None,
                        help="MobileNetV3Small, MobileNetV3Large or "
                        "EfficientNetV2B0 (instead of --architecture)")
  backbone.add_argument("--weights", default=None,
                        help="imagenet (Keras downloads them to "
                        "$KERAS_HOME/models), none (random), or a local "
                        ".weights.h5, .keras or downloaded .h5 file of the "
                        "headless backbone (default: imagenet)")
  backbone.add_argument("--fine_tune_epochs", type=int, default=None,
                        help=f"epochs of the fine-tuning phase; 0 skips it "
                        f"(default: {BACKBONE_FINE_TUNE_EPOCHS})")
  backbone.add_argument("--fine_tune_learning_rate", type=float, default=None,
                        help="learning rate of the fine-tuning phase "
                        f"(default: {BACKBONE_FINE_TUNE_LEARNING_RATE})")
  backbone.add_argument("--fine_tune_blocks", type=int, default=None,
                        help="top blocks to unfreeze (default: the last "
                        "stage's: 3 for MobileNetV3, 8 for EfficientNetV2B0)")


def _add_features_from_flags(parser: cli.ArgumentParser) -> None:
  features = parser.add_argument_group(
      "a head on another model's embeddings", "the class folders embedded "
      "by MODEL_DIR's decoder and engine train a small head; backbone + "
      "head are exported as one model folder")
  features.add_argument("--features_from", default=None,
                        metavar="MODEL_DIR",
                        help="a model folder that serves an embedding "
                        "(instead of --architecture or --backbone)")
  features.add_argument("--head", default=None, choices=("linear", "mlp"),
                        help="logistic regression, or one hidden ReLU layer "
                        "(default: linear)")
  features.add_argument("--hidden_units", type=int, default=None,
                        help="units of the mlp head's hidden layer "
                        "(default: 256)")
  features.add_argument("--embed_with", default=None,
                        choices=("process", "pipeline"),
                        help="embed the images in this process, or with "
                        "the Beam pipeline (predict --write_embeddings, a "
                        "worker per core) for large folders (default: "
                        "process)")


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
                      help="passes over the training images; with "
                      "--backbone, of the head phase (default: the "
                      "architecture's own)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="images per training step (default: the "
                      "architecture's own)")
  parser.add_argument("--learning_rate", type=float, default=None,
                      help="peak learning rate; with --backbone, of the head "
                      "phase (default: the architecture's own)")
  parser.add_argument("--image_size", type=int, default=None,
                      help=f"square input size for image folders (default: "
                      f"{DEFAULT_IMAGE_SIZE}, {DEFAULT_BACKBONE_IMAGE_SIZE} "
                      "with --backbone)")
  _add_backbone_flags(parser)
  parser.add_argument("--embedding_layer", default=None,
                      help="the layer whose output predict "
                      "--write_embeddings writes (default: the final Dense "
                      "layer's input)")
  _add_features_from_flags(parser)
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


def check_backbone_flags(args) -> None:
  """Refuses transfer-learning flags without --backbone, head flags without
  --features_from, and flags that do not go with the one given."""
  if args.backbone and args.architecture:
    raise ValueError("give --architecture or --backbone, not both")
  if args.features_from:
    given = [flag for flag in ("architecture", "backbone", "image_size",
                               "embedding_layer")
             if getattr(args, flag) is not None]
    if args.color_mode != "rgb":
      given.append("color_mode")
    if given:
      raise ValueError(f"--features_from takes its input size, colour mode "
                       f"and embedding from MODEL_DIR's card: drop "
                       f"--{', --'.join(given)}")
    if args.data is None or datasets.is_fashion_mnist_dir(args.data):
      raise ValueError("--features_from needs --data, a folder with one "
                       "sub-folder of images per class")
  elif (args.head is not None or args.hidden_units is not None or
        args.embed_with is not None):
    raise ValueError("--head, --hidden_units and --embed_with need "
                     "--features_from")
  if args.hidden_units is not None and args.head != "mlp":
    raise ValueError("--hidden_units is for --head mlp")
  if not args.backbone:
    given = [flag for flag in ("weights", "fine_tune_epochs",
                               "fine_tune_learning_rate", "fine_tune_blocks")
             if getattr(args, flag) is not None]
    if given:
      raise ValueError(f"--{', --'.join(given)} need --backbone")


def embedding_line(card) -> str:
  """What the folder serves as its embedding, in a few words."""
  if not card.embedding:
    return "no embedding (pass --embedding_layer NAME)"
  return (f"embedding: {card.embedding['layer']!r}, "
          f"{card.embedding['dimension']} values ({card.embedding['chosen']})")


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.quiet_libraries(args.verbose)
  verbose = 0 if args.quiet else 2
  try:
    check_backbone_flags(args)
    if args.features_from:
      from model import head  # pylint: disable=import-outside-toplevel
      card = head.train_and_export(
          args.data, args.features_from, args.output, args.head, args.epochs,
          args.batch_size, args.learning_rate, args.hidden_units,
          args.validation_split, args.seed, args.split_seed, verbose,
          args.embed_with or "process")
      print(f"exported {card.architecture} model {card.model_id} to "
            f"{args.output}: {card.metrics}; backbone + head checked against "
            f"the two run apart on {card.training['composed']['images']} "
            f"images ({card.default_engine}: top-1 agreement "
            f"{card.training['composed']['top1_agreement']:.4f}); "
            f"{embedding_line(card)}")
      cli.print_next(f"{args.output} (model_card.json and the model files)",
                     [cli.predict_command(model=args.output)])
      return 0
    weights = None
    if args.backbone:
      from model import backbones  # pylint: disable=import-outside-toplevel
      # The weights come before the data: no network fails in seconds.
      weights = backbones.resolve_weights(args.backbone,
                                          args.weights or "imagenet")
    image_size = args.image_size or (
        DEFAULT_BACKBONE_IMAGE_SIZE if args.backbone else DEFAULT_IMAGE_SIZE)
    dataset = load_dataset(args.data, image_size, args.color_mode,
                           args.validation_split,
                           args.seed if args.split_seed is None
                           else args.split_seed)
    if args.backbone:
      card = train_backbone(
          dataset, args.backbone, args.output, weights, args.epochs,
          args.batch_size, args.learning_rate, args.fine_tune_epochs,
          args.fine_tune_learning_rate, args.fine_tune_blocks, args.seed,
          verbose=verbose, embedding_layer=args.embedding_layer)
    else:
      architecture = args.architecture or (
          "fashion_cnn" if dataset.name == "fashion_mnist"
          else "photo_xception")
      card = train(dataset, architecture, args.output, args.epochs,
                   args.batch_size, args.learning_rate, args.seed,
                   verbose=verbose, embedding_layer=args.embedding_layer)
  except (FileNotFoundError, ValueError, RuntimeError) as error:
    print(f"model.train: error: {error}", file=sys.stderr)
    return 2
  print(f"exported {card.architecture} model {card.model_id} to "
        f"{args.output}: {card.metrics}, TFLite agreement "
        f"{card.tflite['top1_agreement']:.4f}; {embedding_line(card)}")
  cli.print_next(
      f"{args.output} (model.keras, model.tflite, model_card.json, "
      "training_curves.png)",
      [cli.predict_command(model=args.output)])
  return 0


if __name__ == "__main__":
  sys.exit(main())
