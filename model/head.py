"""A small classifier head trained on another model folder's embeddings.

  python -m model.train --data CLASS_FOLDERS --features_from MODEL_DIR \
      --output DIR [--head linear|mlp]

The class folders are split as every trainer here splits them
(`datasets.split_image_folder`, seeded), and each image becomes an
embedding through MODEL_DIR's own serving path: the card's decoder, then
the fastest engine that serves its embedding (`features`). The head is a
Keras model: the embeddings standardised (a Normalization layer adapted on
the training split), then logistic regression (`linear`) or one hidden
layer (`mlp`), then softmax. model/compose.py exports backbone and head as
one ordinary model folder that serves both in one engine call.
"""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

import numpy as np

from imagebatch import paths
from model import card as card_lib
from model import datasets
from model import embeddings
from model import engines
from model import preprocessing

HEADS = ("linear", "mlp")
DEFAULT_HEAD = "linear"
# Adam at its default rate, and enough epochs for a linear model on a few
# thousand embeddings to settle; the L2 penalty keeps its weights small
# where classes are few, the dropout the hidden layer's units apart.
HEAD_EPOCHS = 100
HEAD_BATCH_SIZE = 32
HEAD_LEARNING_RATE = 1e-3
HEAD_L2 = 1e-4
HIDDEN_UNITS = 256
HIDDEN_DROPOUT = 0.3
# A dimension's spread is taken as at least this share of the average
# dimension's: a feature that never moved in training (a unit a ReLU kept
# at 0) must not be divided by nearly nothing when it does move later.
MIN_RELATIVE_STD = 0.01
# Images decoded and embedded per engine call.
EMBED_BATCH = 256
# How the images are embedded: in this process, or by the Beam pipeline
# (beam_jobs.predict --write_embeddings, one worker process per core).
EMBED_WITH = ("process", "pipeline")
_LOG = logging.getLogger("model.train")


class HeadError(ValueError):
  """A flag, folder or backbone that a head cannot be trained on."""


@dataclasses.dataclass(frozen=True)
class Features:
  """Embeddings of a list of images and their labels; images that could not
  be decoded are left out and counted."""
  embeddings: np.ndarray  # (N, D) float32
  labels: np.ndarray  # (N,) int32
  failed: int


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A model folder whose embedding a head is trained on."""
  model_dir: str
  card: card_lib.ModelCard
  engine: str  # the fastest of its engines that serves the embedding


def load_backbone(model_dir: str) -> Backbone:
  """The folder's card, checked against its files; HeadError unless it
  serves an embedding."""
  try:
    card = card_lib.load_card(model_dir)
    card_lib.check_model_files(model_dir, card)
  except (ValueError, OSError) as error:
    raise HeadError(f"--features_from {model_dir}: {error}") from None
  if not card.embedding_engines:
    raise HeadError("--features_from: " +
                    embeddings.refusal(model_dir, card))
  return Backbone(model_dir, card, card.embedding_engines[0])


def embed_files(backbone: Backbone, files: list, labels: np.ndarray,
                threads: int = 0) -> Features:
  """Each file through the backbone's decoder and engine, a batch at a time:
  only the embeddings are kept."""
  decoder = preprocessing.card_decoder(backbone.card)
  engine = engines.load_engine(backbone.model_dir, backbone.engine, threads,
                               card=backbone.card)
  parts, kept, failed = [], [], 0
  for start in range(0, len(files), EMBED_BATCH):
    chunk = files[start:start + EMBED_BATCH]
    pixels, good, errors = decoder.decode([paths.read_bytes(path)
                                           for path in chunk])
    failed += len(errors)
    if len(good):
      parts.append(engine.probabilities_and_embeddings(pixels)[1])
      kept.extend(start + i for i in good)
  if not kept:
    raise HeadError("none of the images could be decoded by the backbone's "
                    f"{backbone.card.decoder} decoder")
  return Features(np.concatenate(parts), np.asarray(labels)[kept], failed)


def embed_with_pipeline(backbone: Backbone, data: str, subsets: list,
                        work_dir: str) -> list:
  """Features of each (files, labels) subset, embedded by the pipeline:
  `python -m beam_jobs.predict --write_embeddings` over the whole folder in
  a child process (one worker per core), then read back from the shards
  its manifest lists. The process boundary keeps model/ from importing
  beam_jobs/."""
  output = os.path.join(work_dir, "embeddings")
  command = [sys.executable, "-m", "beam_jobs.predict", "--input",
             os.path.abspath(data), "--model", backbone.model_dir,
             "--output", output, "--write_embeddings", "--engine",
             backbone.engine, "--progress_seconds", "0", "--runner",
             "FnApiRunner", "--direct_num_workers", str(os.cpu_count() or 1),
             "--direct_running_mode", "multi_processing",
             "--inference_threads", "1"]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode not in (0, 1):
    lines = (done.stderr or done.stdout).strip().splitlines()
    raise HeadError("embedding with the pipeline failed: " +
                    (lines[-1] if lines else f"exit {done.returncode}"))
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  with open(os.path.join(output, "_run.json"), encoding="utf-8") as handle:
    manifest = json.load(handle)
  found = {}
  for entry in manifest["files"]["predictions"]:
    table = pq.read_table(os.path.join(output, entry["name"]),
                          columns=["id", "embedding"])
    width = table.schema.field("embedding").type.list_size
    values = table.column("embedding").combine_chunks().flatten(
    ).to_numpy().reshape(-1, width)
    found.update(zip(table.column("id").to_pylist(), values))
  features = []
  for files, labels in subsets:
    kept = [i for i, path in enumerate(files)
            if os.path.abspath(path) in found]
    if not kept:
      raise HeadError("the pipeline embedded none of the images")
    features.append(Features(
        np.stack([found[os.path.abspath(files[i])] for i in kept]),
        np.asarray(labels)[kept], len(files) - len(kept)))
  return features


def build_head(train_embeddings: np.ndarray, num_classes: int,
               head: str = DEFAULT_HEAD, hidden_units: int = HIDDEN_UNITS):
  """The head: standardise (adapted on `train_embeddings`), then a Dense
  layer (`linear`) or a hidden ReLU layer and a Dense layer (`mlp`), then
  softmax. Its input is the backbone's embedding, (batch, D)."""
  import keras  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel
  if head not in HEADS:
    raise HeadError(f"--head must be one of {HEADS}, got {head!r}")
  inputs = keras.Input(shape=(train_embeddings.shape[1],), name="embedding")
  values = np.asarray(train_embeddings, np.float64)
  std = values.std(axis=0)
  std = np.maximum(std, MIN_RELATIVE_STD * max(float(std.mean()), 1e-12))
  x = layers.Normalization(mean=values.mean(axis=0), variance=std ** 2,
                           name="standardise")(inputs)
  regulariser = keras.regularizers.L2(HEAD_L2)
  if head == "mlp":
    x = layers.Dense(hidden_units, activation="relu", name="hidden",
                     kernel_regularizer=regulariser)(x)
    x = layers.Dropout(HIDDEN_DROPOUT, name="hidden_dropout")(x)
  x = layers.Dense(num_classes, name="logits",
                   kernel_regularizer=regulariser)(x)
  outputs = layers.Softmax(name="probabilities")(x)
  return keras.Model(inputs, outputs, name=f"{head}_head")


@dataclasses.dataclass(frozen=True)
class TrainedHead:
  """What train_head hands to the export: the head, its settings, the
  split's features and the scores."""
  model: object  # the Keras head
  settings: dict
  class_names: list
  train: Features
  validation: Features
  validation_files: list
  history: dict
  seconds: dict
  metrics: dict


def train_head(data: str, backbone: Backbone, head: str = DEFAULT_HEAD,
               epochs: Optional[int] = None, batch_size: Optional[int] = None,
               learning_rate: Optional[float] = None,
               hidden_units: Optional[int] = None,
               validation_split: float = 0.2, seed: int = 0,
               split_seed: Optional[int] = None, verbose: int = 2,
               threads: int = 0, embed_with: str = "process"
               ) -> TrainedHead:
  """Embeds the split class folders through the backbone (in this process,
  or with `embed_with` "pipeline" by the Beam pipeline) and fits the head
  on them, scored on the held-out split."""
  import keras  # pylint: disable=import-outside-toplevel
  if head not in HEADS:
    raise HeadError(f"--head must be one of {HEADS}, got {head!r}")
  split_seed = seed if split_seed is None else split_seed
  class_names, subsets = datasets.split_image_folder(data, validation_split,
                                                     split_seed)
  if embed_with not in EMBED_WITH:
    raise HeadError(f"--embed_with must be one of {EMBED_WITH}")
  started = time.monotonic()
  if embed_with == "pipeline":
    with tempfile.TemporaryDirectory(prefix="head-embeddings-") as work:
      train, validation = embed_with_pipeline(backbone, data, subsets, work)
  else:
    train, validation = [embed_files(backbone, list(files), labels, threads)
                         for files, labels in subsets]
  embed_seconds = time.monotonic() - started
  _LOG.info("embedded %d + %d images through %s (%s engine) in %.0fs",
            len(train.labels), len(validation.labels), backbone.model_dir,
            backbone.engine, embed_seconds)
  settings = {"head": head, "embedded_with": embed_with,
              "epochs": epochs or HEAD_EPOCHS,
              "batch_size": batch_size or HEAD_BATCH_SIZE,
              "learning_rate": learning_rate or HEAD_LEARNING_RATE,
              "l2": HEAD_L2, "seed": seed}
  if head == "mlp":
    settings.update(hidden_units=hidden_units or HIDDEN_UNITS,
                    dropout=HIDDEN_DROPOUT)
  keras.utils.set_random_seed(seed)
  model = build_head(train.embeddings, len(class_names), head,
                     settings.get("hidden_units", HIDDEN_UNITS))
  model.compile(optimizer=keras.optimizers.Adam(settings["learning_rate"]),
                loss=keras.losses.SparseCategoricalCrossentropy(),
                metrics=["accuracy"])
  started = time.monotonic()
  history = model.fit(
      train.embeddings, train.labels,
      validation_data=(validation.embeddings, validation.labels),
      epochs=settings["epochs"], batch_size=settings["batch_size"],
      shuffle=True, verbose=verbose).history
  fit_seconds = time.monotonic() - started
  loss, accuracy = model.evaluate(validation.embeddings, validation.labels,
                                  verbose=0)
  _LOG.info("validation accuracy %.4f after %d epochs in %.0fs", accuracy,
            settings["epochs"], fit_seconds)
  return TrainedHead(
      model, settings, class_names, train, validation, list(subsets[1][0]),
      history, {"embed": round(embed_seconds, 1), "fit": round(fit_seconds, 1)},
      {"validation_accuracy": round(float(accuracy), 6),
       "validation_loss": round(float(loss), 6),
       "train_accuracy": round(float(history["accuracy"][-1]), 6)})


def train_and_export(data: str, features_from: str, output: str,
                     head: Optional[str] = None, epochs: Optional[int] = None,
                     batch_size: Optional[int] = None,
                     learning_rate: Optional[float] = None,
                     hidden_units: Optional[int] = None,
                     validation_split: float = 0.2, seed: int = 0,
                     split_seed: Optional[int] = None, verbose: int = 2,
                     embed_with: str = "process") -> card_lib.ModelCard:
  """model.train --features_from: the head, then backbone + head as one
  model folder (model/compose.py); returns its card."""
  from model import compose  # pylint: disable=import-outside-toplevel
  backbone = load_backbone(features_from)
  if not os.path.isdir(data):
    raise FileNotFoundError(f"no data folder at {data}: expected one "
                            "sub-folder of images per class")
  split_seed = seed if split_seed is None else split_seed
  trained = train_head(data, backbone, head or DEFAULT_HEAD, epochs,
                       batch_size, learning_rate, hidden_units,
                       validation_split, seed, split_seed, verbose,
                       embed_with=embed_with)
  dataset = {
      "name": os.path.basename(os.path.normpath(data)),
      "source": os.path.abspath(data),
      "train_images": len(trained.train.labels),
      "validation_images": len(trained.validation.labels),
      "evaluated_on": "validation", "split_seed": split_seed,
      "decode_failures": trained.train.failed + trained.validation.failed,
  }
  return compose.export_composed(trained, backbone, output, dataset)
