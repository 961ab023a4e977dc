"""Adopts a classifier trained elsewhere as a model folder `predict` serves.

  python -m model.adopt SOURCE --output DIR --class_names NAMES
      [--input_scale raw|unit|symmetric|caffe|torch|custom]
      [--input_mean M,M,M --input_std S,S,S] [--image_size H,W | N]
      [--color_mode grayscale|rgb] [--output_kind auto|logits|probabilities]
      [--decoder tensorflow|pillow] [--eval_data FOLDER]

SOURCE is a `.keras` file, a legacy Keras `.h5` file, a TensorFlow SavedModel
folder (its `serving_default` signature) or a `.tflite` file, float or
full-integer quantised. The folder gets the card (marked adopted, with every
field read from the model or declared here), the model in the formats the
source allows, and for Keras and SavedModel sources a TFLite conversion that
serves only if its top-1 agrees with the source on at least 99.9% of the
check images. Nothing runs code from the model: Keras loads in safe_mode
(no Lambda layers), a SavedModel's ops are listed from its saved_model.pb and
checked before it is loaded, and nothing is unpickled.
"""

import json
import os
import shutil
import sys
from typing import Optional

from model import adopt_checks
from model import card as card_lib
from imagebatch import cli
from model import engines
from model import model_formats
from model import preprocessing
from model.model_formats import AdoptError

OUTPUT_KINDS = ("auto",) + card_lib.OUTPUT_KINDS


def resolve_input(source: model_formats.Source, image_size: Optional[tuple],
                  color_mode: Optional[str]) -> tuple:
  """(height, width, color_mode) from the model's input, with the flags
  filling only its dynamic dimensions."""
  dims = source.input_shape
  if len(dims) not in (2, 3):
    raise AdoptError(
        f"{source.path}: input of shape {model_formats.shape_text(dims)} is "
        "not an image: expected (batch, height, width) or (batch, height, "
        "width, channels)")
  channels = 1 if len(dims) == 2 else dims[2]
  modes = {count: mode for mode, count in card_lib.COLOR_MODES.items()}
  if channels is None:
    if color_mode is None:
      raise AdoptError(f"{source.path}: the input's channels are dynamic; "
                       "pass --color_mode grayscale or rgb")
  elif channels not in modes:
    raise AdoptError(f"{source.path}: input has {channels} channels; "
                     "expected 1 (grayscale) or 3 (rgb)")
  elif color_mode is not None and color_mode != modes[channels]:
    raise AdoptError(f"--color_mode {color_mode}: the model's input has "
                     f"{channels} channel(s), so it is {modes[channels]}")
  else:
    color_mode = modes[channels]
  size = []
  for axis, (name, dim) in enumerate((("height", dims[0]),
                                      ("width", dims[1]))):
    if dim is None:
      if image_size is None:
        raise AdoptError(f"{source.path}: the input's {name} is dynamic; "
                         "pass --image_size HEIGHT,WIDTH")
      dim = image_size[axis]
    elif image_size is not None and image_size[axis] != dim:
      raise AdoptError(f"--image_size {image_size[0]},{image_size[1]}: the "
                       f"model's input is {dims[0]}x{dims[1]} "
                       "(height x width)")
    size.append(int(dim))
  return size[0], size[1], color_mode


def parse_class_names(value: str) -> list:
  """A comma-separated list, or a file: one name per line, or a JSON list."""
  if os.path.isfile(value):
    with open(value, encoding="utf-8") as handle:
      text = handle.read()
    if text.lstrip().startswith("["):
      try:
        names = json.loads(text)
      except json.JSONDecodeError as error:
        raise AdoptError(f"--class_names {value}: not a JSON list: "
                         f"{error}") from None
      if not isinstance(names, list):
        raise AdoptError(f"--class_names {value}: expected a JSON list")
      names = [str(name) for name in names]
    else:
      names = [line.strip() for line in text.splitlines() if line.strip()]
  else:
    names = [name.strip() for name in value.split(",")]
  if any(not name for name in names):
    raise AdoptError("--class_names has an empty name")
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise AdoptError(f"--class_names repeats {', '.join(duplicates)}")
  return names


def _numbers(flag: str, value: Optional[str]) -> Optional[list]:
  if value is None:
    return None
  try:
    return [float(v) for v in value.split(",")]
  except ValueError:
    raise AdoptError(f"--{flag} {value!r}: expected comma-separated "
                     "numbers") from None


def parse_image_size(value: Optional[str]) -> Optional[tuple]:
  if value is None:
    return None
  parts = value.replace("x", ",").split(",")
  try:
    size = tuple(int(p) for p in parts)
  except ValueError:
    size = ()
  if len(size) == 1:
    size = size * 2
  if len(size) != 2 or min(size) < 1:
    raise AdoptError(f"--image_size {value!r}: expected HEIGHT,WIDTH or N")
  return size


def feeding_recipe(decoder: str, height: int, width: int, input_scale: str,
                   mean: Optional[list], std: Optional[list]) -> dict:
  """The card's preprocessing dict for an adopted model."""
  recipe = {"decoder": decoder, "input_scale": input_scale}
  if input_scale == "custom":
    recipe.update(input_mean=mean, input_std=std)
  if decoder == "tensorflow":
    recipe.update(
        recipe="keras.utils.image_dataset_from_directory: "
        "tf.image.decode_image(expand_animations=False), tf.image.resize",
        exif_transpose=False,
        resize={"height": height, "width": width, "interpolation": "bilinear",
                "antialias": False, "when": "always"},
        input_dtype="float32 (not rounded)")
  else:
    recipe.update(
        exif_transpose=True,
        resize={"height": height, "width": width,
                "interpolation": preprocessing.RESIZE_INTERPOLATION,
                "when": "the decoded size differs"},
        input_dtype="uint8 as float32")
  return recipe


def _stage_source(source: model_formats.Source, out_dir: str) -> None:
  """Writes the source model into the folder in the format it serves as."""
  if source.kind == "keras":
    shutil.copyfile(source.path, os.path.join(out_dir, card_lib.MODEL_FILE))
  elif source.kind == "h5":
    # A legacy .h5 becomes a Keras 3 .keras file: the same weights, served
    # and checked (Lambda layers) like a trained model.
    source.model.save(os.path.join(out_dir, card_lib.MODEL_FILE))
  elif source.kind == "savedmodel":
    shutil.copytree(source.path, os.path.join(out_dir,
                                              card_lib.SAVED_MODEL_DIR))
  else:
    shutil.copyfile(source.path, os.path.join(out_dir, card_lib.TFLITE_FILE))


def _clear(out_dir: str) -> None:
  """Until the new card is written, the folder must not pass for a model."""
  for name in (card_lib.CARD_FILE, card_lib.MODEL_FILE, card_lib.TFLITE_FILE):
    if os.path.exists(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))
  shutil.rmtree(os.path.join(out_dir, card_lib.SAVED_MODEL_DIR),
                ignore_errors=True)


_KIND_NAMES = {"keras": "Keras .keras", "h5": "Keras .h5",
               "savedmodel": "TensorFlow SavedModel", "tflite": "TFLite"}


def adopt(source_path: str, out_dir: str, class_names: list, *,
          input_scale: Optional[str] = None, input_mean: Optional[list] = None,
          input_std: Optional[list] = None,
          image_size: Optional[tuple] = None,
          color_mode: Optional[str] = None, output_kind: str = "auto",
          decoder: str = "tensorflow", eval_data: Optional[str] = None,
          say=print, warn=None) -> card_lib.ModelCard:
  """Writes the model folder; returns its card. Raises AdoptError."""
  warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
  source_path = os.path.abspath(source_path)
  out_dir = os.path.abspath(out_dir)
  if out_dir == source_path or out_dir.startswith(source_path + os.sep):
    raise AdoptError("--output must not be the source or inside it")
  if output_kind not in OUTPUT_KINDS:
    raise AdoptError(f"--output_kind must be one of {OUTPUT_KINDS}")
  if decoder not in preprocessing.DECODERS:
    raise AdoptError(f"--decoder must be one of {preprocessing.DECODERS}")
  source = model_formats.load_source(source_path)
  say(f"source: {_KIND_NAMES[source.kind]} model, input "
      f"{model_formats.shape_text(source.input_shape)} {source.input_dtype}, "
      f"output {model_formats.shape_text(source.output_shape)}")
  card = draft_card(source, class_names, input_scale, input_mean, input_std,
                    image_size, color_mode, decoder, warn)
  eval_set = []
  if eval_data:
    eval_set, others = adopt_checks.eval_files(eval_data, class_names)
    if others:
      warn(f"--eval_data: {sum(others.values())} files in folders not named "
           f"for a class were left out ({', '.join(sorted(others)[:10])}); "
           "name the folders as --class_names names the classes")
  check_pixels = adopt_checks.check_images(card, eval_set)
  os.makedirs(out_dir, exist_ok=True)
  _clear(out_dir)
  _stage_source(source, out_dir)
  engine = _decide_output(source, card, out_dir, output_kind, check_pixels,
                          say)
  _add_tflite(source, card, out_dir, engine, check_pixels,
              "--eval_data images" if eval_set else "generated check images",
              say)
  if eval_set:
    card.metrics = adopt_checks.evaluate(card, out_dir, eval_set, eval_data,
                                         say, warn)
  card.model_id = card_lib.compute_model_id(
      card, *card_lib.model_payloads(out_dir, card))
  card.validate()
  with open(os.path.join(out_dir, card_lib.CARD_FILE), "w") as handle:
    handle.write(card.to_json())
  say(f"adopted {source_path} as model {card.model_id} in {out_dir}: "
      f"{card.height}x{card.width} {card.color_mode}, {card.num_classes} "
      f"classes, decoder {card.decoder}, input_scale {card.input_scale} "
      f"({card.adopted['input_scale']}), engines {', '.join(card.engines)} "
      f"(default {card.default_engine})")
  return card


def draft_card(source: model_formats.Source, class_names: list,
               input_scale: Optional[str], input_mean: Optional[list],
               input_std: Optional[list], image_size: Optional[tuple],
               color_mode: Optional[str], decoder: str,
               warn) -> card_lib.ModelCard:
  """The card of everything known before the model runs: its input, classes
  and feeding recipe (the output kind and model id come later)."""
  height, width, color_mode = resolve_input(source, image_size, color_mode)
  classes = source.output_shape[0]
  if classes is not None and classes != len(class_names):
    raise AdoptError(f"--class_names has {len(class_names)} names but the "
                     f"model outputs {classes} classes")
  input_scale, scale_from = _input_scale(source, input_scale, warn)
  try:
    card_lib.check_input_scale(input_scale, color_mode, input_mean, input_std)
  except ValueError as error:
    raise AdoptError(f"--{error}") from None
  return card_lib.ModelCard(
      model_id="",
      architecture="adopted",
      class_names=list(class_names),
      input_shape=[height, width, card_lib.COLOR_MODES[color_mode]],
      color_mode=color_mode,
      output="logits",
      preprocessing=feeding_recipe(decoder, height, width, input_scale,
                                   input_mean, input_std),
      engines=[model_formats.SOURCE_ENGINE[source.kind]],
      adopted={
          "source": os.path.basename(source.path.rstrip(os.sep)),
          "sha256": model_formats.sha256_of(source.path),
          "format": source.kind,
          "input_scale": scale_from,
          "input_shape": "the model's input signature" + (
              " and --image_size" if None in source.input_shape[:2] else ""),
      }).validate()


def _input_scale(source: model_formats.Source, input_scale: Optional[str],
                 warn) -> tuple:
  """(input scale, where it came from): the flag, the source's quantised
  input range, or the default."""
  if input_scale is not None:
    return input_scale, "--input_scale"
  if source.implied_scale:
    return source.implied_scale, source.implied_scale_reason
  if source.layer_classes and not source.layer_classes & {
      "Rescaling", "Normalization"}:
    warn("the model has no Rescaling or Normalization layer, so it may "
         "expect pixels scaled outside it; if its author divided by 255, "
         "pass --input_scale unit (see the table in the README)")
  return "raw", "the default"


def _decide_output(source: model_formats.Source, card: card_lib.ModelCard,
                   out_dir: str, output_kind: str, check_pixels, say):
  """Runs the staged model on the probe images and records its output
  kind in the card; returns the engine that ran it."""
  engine = engines.load_engine(out_dir, card.engines[0], card=card)
  probe = check_pixels[:adopt_checks.PROBE_IMAGES]
  try:
    outputs = engine.outputs(probe)
  except Exception as error:  # pylint: disable=broad-except
    raise AdoptError(f"{source.path} failed on a batch of {len(probe)} "
                     f"images of {card.height}x{card.width}x{card.channels}: "
                     f"{model_formats.first_line(error)}") from None
  card.output, why = adopt_checks.decide_output(source, output_kind, outputs,
                                                card.num_classes)
  card.adopted["output"] = why
  say(f"output: {card.output} ({why})")
  return engine


def _add_tflite(source: model_formats.Source, card: card_lib.ModelCard,
                out_dir: str, engine, check_pixels, checked_on: str,
                say) -> None:
  """A Keras or SavedModel source also gets a TFLite conversion, served
  only if it agrees with the source."""
  if source.kind not in ("keras", "h5", "savedmodel"):
    card.tflite = {"source": "adopted as it is",
                   "input_dtype": source.input_dtype}
    return
  card.tflite = adopt_checks.tflite_conversion(source, out_dir, card, engine,
                                               check_pixels, checked_on)
  if card.tflite.get("converted"):
    card.engines.append("tflite")
    say(f"tflite: converted; top-1 agrees with {source.kind} on "
        f"{card.tflite['top1_agreement']:.2%} of "
        f"{card.tflite['images']} {card.tflite['checked_on']}")
  else:
    say(f"tflite: not served, the folder serves with {card.engines[0]} "
        f"only: {card.tflite['reason']}")


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="python -m model.adopt",
      description="Make a model folder that beam_jobs.predict serves from a "
      "classifier trained elsewhere.")
  parser.add_argument("source", help="a .keras, .h5 or .tflite file, or a "
                      "SavedModel folder")
  parser.add_argument("--output", required=True, help="the model folder")
  parser.add_argument("--class_names", required=True,
                      help="comma-separated, in the model's output order, or "
                      "a file: one name per line or a JSON list")
  parser.add_argument("--input_scale", default=None,
                      choices=preprocessing.INPUT_SCALES,
                      help="how [0, 255] pixels become the model input; "
                      "default raw (rescaling inside the model)")
  parser.add_argument("--input_mean", default=None,
                      help="custom: per-channel mean, in pixel units")
  parser.add_argument("--input_std", default=None,
                      help="custom: per-channel std, in pixel units")
  parser.add_argument("--image_size", default=None,
                      help="HEIGHT,WIDTH or N, only for a dynamic input size")
  parser.add_argument("--color_mode", default=None,
                      choices=tuple(card_lib.COLOR_MODES),
                      help="only for an input with dynamic channels")
  parser.add_argument("--output_kind", default="auto", choices=OUTPUT_KINDS,
                      help="what the model outputs; auto: read from its last "
                      "layer")
  parser.add_argument("--decoder", default="tensorflow",
                      choices=preprocessing.DECODERS,
                      help="tensorflow: as keras.utils."
                      "image_dataset_from_directory; pillow: this project's")
  parser.add_argument("--eval_data", default=None,
                      help="a folder of class sub-folders to score the model "
                      "on through the serving decoder")
  parser.add_argument("--verbose", action="store_true",
                      help="also TensorFlow's and Keras' own log lines")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  cli.quiet_libraries(args.verbose)
  try:
    adopt(args.source, args.output, parse_class_names(args.class_names),
          input_scale=args.input_scale,
          input_mean=_numbers("input_mean", args.input_mean),
          input_std=_numbers("input_std", args.input_std),
          image_size=parse_image_size(args.image_size),
          color_mode=args.color_mode, output_kind=args.output_kind,
          decoder=args.decoder, eval_data=args.eval_data)
  except (AdoptError, OSError) as error:
    print(f"model.adopt: error: {error}", file=sys.stderr)
    return 2
  cli.print_next(
      f"{args.output} (model_card.json and the model files)",
      [cli.predict_command(model=args.output)])
  return 0


if __name__ == "__main__":
  sys.exit(main())
