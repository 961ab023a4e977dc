"""What adoption measures before it writes a card: the output kind (and
whether a declared one agrees), the TFLite conversion's agreement with the
source, and accuracy on --eval_data, all through the serving decoder and
engines. The --eval_data check of the scale and class order is
model/adopt_eval.py.
"""

import os
from typing import Optional

import numpy as np

from imagebatch import paths
from model import card as card_lib
from model import embeddings
from model import engines
from model import export
from model import model_formats
from model import preprocessing
from model.model_formats import AdoptError


# Images beyond these serve neither the output-kind probe nor the TFLite
# check any better; accuracy on --eval_data uses every image.
CHECK_IMAGES = 512


PROBE_IMAGES = 64


# The check images are held in memory together: fewer than CHECK_IMAGES
# for a model whose input is large (170 at 512x512 RGB).
CHECK_BYTES = 512 << 20


EVAL_BATCH = 256


def eval_files(folder: str, class_names: list) -> tuple:
  """(path, class index) of every file in a sub-folder named for a class,
  and the other sub-folders' names with their file counts."""
  pattern = paths.expand_pattern(paths.absolute(folder))
  base = paths.pattern_base(pattern)
  names = frozenset(class_names)
  labelled, others = [], {}
  for path in paths.match_paths(pattern):
    label = paths.folder_label(path, base, names)
    if label is not None:
      labelled.append((path, class_names.index(label)))
    else:
      other = paths.folder_label(path, base) or "."
      others[other] = others.get(other, 0) + 1
  if not labelled:
    raise AdoptError(f"--eval_data {folder} has no images in sub-folders "
                     f"named for a class ({', '.join(class_names[:5])}...)")
  return labelled, others


def eval_set(eval_data: Optional[str], class_names: list, warn) -> list:
  """The --eval_data files with their labels ([] without it); files in
  folders not named for a class are left out with a warning."""
  if not eval_data:
    return []
  files, others = eval_files(eval_data, class_names)
  if others:
    warn(f"--eval_data: {sum(others.values())} files in folders not named "
         f"for a class were left out ({', '.join(sorted(others)[:10])}); "
         "name the folders as --class_names names the classes")
  return files


def decode_files(card: card_lib.ModelCard, files: list):
  """Decodes (path, label) pairs through the card's serving decoder, a batch
  at a time; yields (pixels, labels, failed count)."""
  decoder = preprocessing.card_decoder(card)
  for start in range(0, len(files), EVAL_BATCH):
    chunk = files[start:start + EVAL_BATCH]
    pixels, good, errors = decoder.decode([_read(path) for path, _ in chunk])
    yield pixels, np.array([chunk[i][1] for i in good], np.int64), len(errors)


def _read(path: str):
  """A file's bytes, or None (a decode failure) for one that cannot be
  read: a FIFO, a dangling link, a folder."""
  try:
    return paths.read_bytes(path)
  except OSError:
    return None


def probe_images(card: card_lib.ModelCard, count: int) -> np.ndarray:
  """Seeded pixels for the output probe and TFLite check when there is no
  --eval_data: noise, smooth gradients and flat images."""
  rng = np.random.default_rng(0)
  shape = (card.height, card.width, card.channels)
  third = count // 3
  noise = rng.integers(0, 256, (third,) + shape).astype(np.float32)
  ys = np.linspace(0, 1, card.height)[:, None, None]
  xs = np.linspace(0, 1, card.width)[None, :, None]
  gradients = np.stack([
      np.broadcast_to(255 * (a * ys + (1 - a) * xs) * np.ones(card.channels),
                      shape) for a in rng.uniform(0, 1, third)] or [
                          np.zeros((0,) + shape)])
  gradients = gradients.reshape((third,) + shape)
  flat = rng.uniform(0, 255, (count - 2 * third, 1, 1, card.channels)) * (
      np.ones(shape))
  return np.concatenate([noise, gradients, flat]).astype(np.float32)


def decide_output(source: model_formats.Source, outputs: np.ndarray,
                  num_classes: int) -> tuple:
  """(output kind, why): a final softmax in the Keras config, or what the
  probe batch's rows look like."""
  if source.softmax:
    return "probabilities", "the Keras config ends in a softmax"
  # A quantised output is only near 1: allow a step of its scale per class.
  tolerance = max(1e-3, source.output_step * num_classes)
  sums = outputs.sum(axis=1)
  if (np.isfinite(outputs).all() and outputs.min() >= -tolerance and
      np.abs(sums - 1).max() <= tolerance):
    return "probabilities", (f"the probe batch's {len(outputs)} rows are "
                             "non-negative and sum to 1")
  return "logits", (f"the probe batch's {len(outputs)} rows are not "
                    "probabilities (negative, or not summing to 1)")


def record_output_kind(source: model_formats.Source,
                       card: card_lib.ModelCard, engine, output_kind: str,
                       confirmed: bool, check_pixels, say, warn) -> None:
  """Runs the staged model on the probe images and records its output
  kind in the card. A declared kind the probe contradicts is refused unless
  `confirmed` (--confirm_output_kind)."""
  probe = check_pixels[:PROBE_IMAGES]
  try:
    outputs = engine.outputs(probe)
  except Exception as error:  # pylint: disable=broad-except
    raise AdoptError(f"{source.path} failed on a batch of {len(probe)} "
                     f"images of {card.height}x{card.width}x{card.channels}: "
                     f"{model_formats.first_line(error)}") from None
  if not np.isfinite(outputs).all():
    raise AdoptError(f"{source.path} outputs NaN or infinity on the "
                     f"{len(probe)} check images scaled as input_scale "
                     f"{card.input_scale}; a classifier's scores are finite")
  read, why = decide_output(source, outputs, card.num_classes)
  if output_kind in ("auto", read):
    card.output = read
    card.adopted["output"] = why if output_kind == "auto" else (
        f"declared with --output_kind, as {why}")
  elif confirmed:
    card.output = output_kind
    card.adopted["output"] = (f"declared with --output_kind and confirmed "
                              f"(--confirm_output_kind), although {why}")
    warn(f"--confirm_output_kind: served as {output_kind}, although {why}")
  else:
    served = ("softmax would flatten them into other confidences"
              if output_kind == "logits" else
              "its confidences would not be probabilities (above 1, or "
              "negative)")
    raise AdoptError(
        f"--output_kind {output_kind} contradicts the model: {why}, and "
        f"served as {output_kind} {served}; pass --output_kind {read} (or "
        f"auto), or --confirm_output_kind to keep {output_kind}")
  say(f"output: {card.output} ({card.adopted['output']})")


def provisional_output_kind(source: model_formats.Source,
                            card: card_lib.ModelCard, engine,
                            output_kind: str, check_pixels) -> None:
  """The output kind to score --eval_data with before the scale is known:
  declared, or read from the probe's finite rows (logits if none)."""
  try:
    outputs = engine.outputs(check_pixels[:PROBE_IMAGES])
  except Exception as error:  # pylint: disable=broad-except
    raise AdoptError(f"{source.path} failed on a batch of check images: "
                     f"{model_formats.first_line(error)}") from None
  finite = outputs[np.isfinite(outputs).all(axis=1)]
  card.output = output_kind if output_kind != "auto" else (
      decide_output(source, finite, card.num_classes)[0]
      if len(finite) else "logits")


def output_kind(source, card, engine, scale_given, check_pixels,
                kind_choice: tuple, say, warn) -> None:
  """The card's output kind: probed and checked at the scale given, or
  until --eval_data has measured the scale, read from the finite rows of
  the probe at a placeholder scale. `kind_choice` is (--output_kind,
  --confirm_output_kind)."""
  if scale_given:
    record_output_kind(source, card, engine, kind_choice[0], kind_choice[1],
                       check_pixels, say, warn)
  else:
    provisional_output_kind(source, card, engine, kind_choice[0],
                            check_pixels)


def check_image_count(card: card_lib.ModelCard) -> int:
  """How many check images fit in CHECK_BYTES, up to CHECK_IMAGES."""
  image_bytes = card.height * card.width * card.channels * 4
  return int(max(1, min(CHECK_IMAGES, CHECK_BYTES // image_bytes)))


def check_images(card: card_lib.ModelCard, eval_set: list) -> np.ndarray:
  """Pixels for the output probe and the TFLite check: up to CHECK_IMAGES
  of --eval_data, spread over its classes, or generated ones without it."""
  count = check_image_count(card)
  if not eval_set:
    return probe_images(card, count)
  step = max(1, len(eval_set) // count)
  sample = eval_set[::step][:count]
  pixels = np.concatenate([p.astype(np.float32)
                           for p, _, _ in decode_files(card, sample)])
  if not len(pixels):
    raise AdoptError("--eval_data: none of its images could be decoded")
  return pixels


def tflite_conversion(source: model_formats.Source, out_dir: str,
                      card: card_lib.ModelCard, engine: engines.Engine,
                      images: np.ndarray, checked_on: str) -> dict:
  """Converts to TFLite and keeps it only if it agrees with the source."""
  try:
    if source.kind == "savedmodel":
      tflite_bytes = model_formats.convert_saved_model(
          os.path.join(out_dir, card_lib.SAVED_MODEL_DIR))
    elif "keras" in card.embedding_engines:
      tflite_bytes, record = embeddings.convert_with_embedding(
          source.model, card.embedding["layer"],
          engine.model_inputs(images), checked_on, export.convert_to_tflite)
      embeddings.record_tflite(card, record)
    else:
      tflite_bytes = export.convert_to_tflite(source.model)
  except Exception as error:  # pylint: disable=broad-except
    return {"converted": False,
            "reason": f"conversion failed: {model_formats.first_line(error)}"}
  reference = np.concatenate([
      engine.probabilities(images[start:start + EVAL_BATCH])
      for start in range(0, len(images), EVAL_BATCH)])
  try:
    agreement = export.tflite_agreement(reference, tflite_bytes, card, images)
  except Exception as error:  # pylint: disable=broad-except
    card.embedding.get("engines", {}).pop("tflite", None)
    return {"converted": False,
            "reason": f"the converted model does not run: "
                      f"{model_formats.first_line(error)}"}
  agreement.update(checked_on=checked_on, converted_from=source.kind)
  if agreement["top1_agreement"] < export.MIN_TFLITE_AGREEMENT:
    card.embedding.get("engines", {}).pop("tflite", None)
    agreement.update(converted=False, reason=(
        f"its top-1 agrees with {source.kind} on only "
        f"{agreement['top1_agreement']:.2%} of {agreement['images']} "
        f"{checked_on} (need {export.MIN_TFLITE_AGREEMENT:.1%})"))
    return agreement
  with open(os.path.join(out_dir, card_lib.TFLITE_FILE), "wb") as handle:
    handle.write(tflite_bytes)
  agreement["converted"] = True
  return agreement


def evaluate(card, out_dir, eval_set, eval_data, say, warn) -> dict:
  """Accuracy on --eval_data through the serving decoder and engine."""
  engine = engines.load_engine(out_dir, card.default_engine, card=card)
  correct = total = failed = 0
  for pixels, labels, errors in decode_files(card, eval_set):
    failed += errors
    if len(labels):
      predicted = engine.probabilities(pixels).argmax(1)
      correct += int((predicted == labels).sum())
      total += len(labels)
  if not total:
    raise AdoptError(f"--eval_data {eval_data}: none of its images could be "
                     "decoded")
  accuracy = correct / total
  chance = 1.0 / card.num_classes
  say(f"eval: accuracy {accuracy:.4f} on {total} images of {eval_data} "
      f"({card.default_engine} engine, {card.decoder} decoder"
      + (f"; {failed} could not be decoded" if failed else "") + ")")
  if accuracy < chance + 0.15 * (1 - chance):
    warn(f"accuracy {accuracy:.3f} on --eval_data is near chance "
         f"({chance:.3f} for {card.num_classes} classes): check --input_scale "
         "(how the author scaled pixels), the order of --class_names (the "
         "model's output order, often the sorted folder names), and "
         "--color_mode")
  return {"eval_accuracy": accuracy, "eval_images": total,
          "eval_decode_failures": failed,
          "eval_data": paths.absolute(eval_data),
          "eval_engine": card.default_engine}
