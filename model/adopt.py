"""Adopts a classifier trained elsewhere as a model folder `predict` serves.

  python -m model.adopt SOURCE --output DIR --class_names NAMES
      [--input_scale raw|unit|symmetric|caffe|torch|custom]
      [--input_mean M,M,M --input_std S,S,S] [--image_size H,W | N]
      [--color_mode grayscale|rgb] [--output_kind auto|logits|probabilities]
      [--decoder tensorflow|pillow|torchvision] [--eval_data FOLDER]
      [--resize N | H,W] [--center_crop N | H,W] [--interpolation NAME]
      [--preprocessing_config FILE] [--layout NCHW|NHWC]
      [--output_name NAME] [--confirm_output_kind]
      [--confirm_input_scale] [--confirm_class_names]
      [--embedding_layer NAME]

SOURCE is a `.keras` file, a legacy Keras `.h5` file, a TensorFlow SavedModel
folder (its `serving_default` signature), a `.tflite` file, float or
full-integer quantised, or an ONNX file as `torch.onnx.export` writes it.
The folder gets the card (marked adopted, with every field read from the
model or declared here), the model in the formats the source allows, and
for Keras and SavedModel sources a TFLite conversion that serves only if its
top-1 agrees with the source on at least 99.9% of the check images. An ONNX
source is fed the torchvision way (--resize, --center_crop, --interpolation,
or the author's --preprocessing_config) and served by ONNX Runtime. Nothing
runs code from the model: Keras loads in safe_mode (no Lambda layers), a
SavedModel's ops are listed from its saved_model.pb and checked before it is
loaded, an ONNX graph may use only the standard operator domains and read
external data only from beside it, and nothing is unpickled.

What would be served wrong is refused in one line, exit 2: a model that does
not say how its pixels were scaled, without --input_scale or --eval_data to
measure it; with --eval_data, a scale or class order that another clearly
beats (model/adopt_eval.py; --confirm_input_scale and --confirm_class_names
keep the user's); a declared --output_kind the probe batch contradicts
(--confirm_output_kind); outputs that are not finite. Every warning is
recorded in the card, and predict repeats it. Adopting never deletes or
overwrites its source, or files it did not write (model/adopt_output.py).
"""

import os
import shutil
import sys
from typing import Optional

from model import adopt_checks
from model import adopt_draft
from model import adopt_eval
from model import adopt_feeding
from model import adopt_flags
from model import adopt_output
from model import card as card_lib
from imagebatch import cli
from model import embeddings
from model import engines
from model import model_formats
from model import onnx_embedding
from model import preprocessing
from model import torchvision_decoding
from model.model_formats import AdoptError

OUTPUT_KINDS = ("auto",) + card_lib.OUTPUT_KINDS


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
  elif source.kind == "onnx":
    # What onnx_graph proved servable: the source's bytes, or the graph
    # rewritten (external data inlined, batch axis made symbolic, one
    # output kept).
    with open(os.path.join(out_dir, card_lib.ONNX_FILE), "wb") as handle:
      handle.write(source.model.model_bytes)
  else:
    shutil.copyfile(source.path, os.path.join(out_dir, card_lib.TFLITE_FILE))


def adopt(source_path: str, out_dir: str, class_names: list, *,
          input_scale: Optional[str] = None, input_mean: Optional[list] = None,
          input_std: Optional[list] = None,
          image_size: Optional[tuple] = None,
          color_mode: Optional[str] = None, output_kind: str = "auto",
          decoder: Optional[str] = None, eval_data: Optional[str] = None,
          resize=None, center_crop: Optional[tuple] = None,
          interpolation: Optional[str] = None, layout: Optional[str] = None,
          output_name: Optional[str] = None,
          preprocessing_config: Optional[str] = None,
          confirm_output_kind: bool = False,
          confirm_input_scale: bool = False,
          confirm_class_names: bool = False,
          embedding_layer: Optional[str] = None,
          say=print, warn=None) -> card_lib.ModelCard:
  """Writes the model folder; returns its card. Raises AdoptError.

  `resize` is N (the shorter side) or (height, width); `decoder` None
  means torchvision for an ONNX source or a recipe with torchvision steps,
  else tensorflow. The `confirm_*` flags keep a choice the probe or
  --eval_data contradicts; every warning is also recorded in the card
  (`adopted.warnings`), which predict repeats."""
  warnings, warn_and_record = _recorded(warn)
  source_path = os.path.abspath(source_path)
  out_dir = os.path.abspath(out_dir)
  if output_kind not in OUTPUT_KINDS:
    raise AdoptError(f"--output_kind must be one of {OUTPUT_KINDS}")
  flags = adopt_feeding.feeding_flags(dict(
      resize=resize, center_crop=center_crop, interpolation=interpolation,
      input_scale=input_scale, input_mean=input_mean, input_std=input_std,
      image_size=image_size, color_mode=color_mode), preprocessing_config)
  source, card = adopt_draft.load_and_draft(
      source_path, out_dir, class_names, flags, preprocessing_config,
      decoder, layout, output_name, say)
  scale_given = card.adopted["input_scale"] is not None
  eval_set = adopt_checks.eval_set(eval_data, class_names,
                                    warn_and_record)
  if not scale_given and not eval_set:
    raise AdoptError(adopt_feeding.needs_scale(source))
  check_pixels = adopt_checks.check_images(card, eval_set)
  checked_on = "--eval_data images" if eval_set else "generated check images"
  _add_embedding(source, card, embedding_layer, check_pixels, checked_on,
                 say)
  with adopt_output.StagedFolder(out_dir) as staged:
    _stage_source(source, staged.path)
    engine = engines.load_engine(staged.path, card.engines[0], card=card)
    adopt_checks.output_kind(source, card, engine, scale_given,
                             check_pixels, (output_kind, confirm_output_kind),
                             say, warn_and_record)
    if eval_set:
      verdict = adopt_eval.check(
          engine, card, eval_set, eval_data, scale_given,
          confirm_input_scale=confirm_input_scale,
          confirm_class_names=confirm_class_names, say=say)
      _take_verdict(verdict, source, card, engine, scale_given, check_pixels,
                    (output_kind, confirm_output_kind), say, warn_and_record)
    _add_tflite(source, card, staged.path, engine, check_pixels, checked_on,
                say)
    if eval_set:
      card.metrics = adopt_checks.evaluate(card, staged.path, eval_set,
                                           eval_data, say, warn_and_record)
    _seal(card, staged, warnings)
  say(f"adopted {source_path} as model {card.model_id} in {out_dir}: "
      f"{card.height}x{card.width} {card.color_mode}, {card.num_classes} "
      f"classes, decoder {card.decoder}, input_scale {card.input_scale} "
      f"({card.adopted['input_scale']}), engines {', '.join(card.engines)} "
      f"(default {card.default_engine})")
  return card


def _add_embedding(source, card, name: Optional[str], check_pixels,
                   checked_on: str, say) -> None:
  """Gives the card its embedding, `name` or the default guess
  (model/embeddings.py), and says which. A Keras source's is served by the
  Keras engine (and its TFLite conversion, when that passes its check); an
  ONNX source's becomes a second output of the served graph (source.model
  is replaced). A SavedModel or TFLite source has none; the card says why
  (`adopted.embedding`). A `name` that cannot serve is an AdoptError."""
  try:
    if source.kind in ("keras", "h5"):
      layer, chosen = embeddings.keras_layer(source.model, name)
      if layer is not None:
        card.embedding = embeddings.keras_record(source.model, layer, chosen)
    elif source.kind == "onnx":
      source.model, record, chosen = onnx_embedding.attach(
          source, card, name, check_pixels, checked_on)
      layer = record["layer"] if record else None
      if record:
        card.embedding = record
    else:
      if name is not None:
        raise AdoptError(
            f"--embedding_layer: a {source.kind} source serves its "
            "signature's one output; adopt the .keras or .onnx file it was "
            "made from")
      layer, chosen = None, (f"a {source.kind} source serves its one "
                             "output; adopt the .keras or .onnx file it "
                             "came from")
  except embeddings.EmbeddingError as error:
    raise AdoptError(str(error)) from None
  if layer is None:
    card.adopted["embedding"] = f"none: {chosen}"
    say(f"embedding: none ({chosen})")
  else:
    say(f"embedding: {layer!r}, {card.embedding['dimension']} values "
        f"({chosen})")


def _recorded(warn) -> tuple:
  """(the warnings list, a warn that also appends to it); `warn` None
  prints "warning: ..." to stderr."""
  warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
  warnings = []

  def warn_and_record(text: str) -> None:
    warnings.append(text)
    warn(text)

  return warnings, warn_and_record


def _seal(card, staged, warnings: list) -> None:
  """The card's warnings and model id, checked and written: the staged
  folder becomes the model folder."""
  if warnings:
    card.adopted["warnings"] = warnings
  card.model_id = card_lib.compute_model_id(
      card, *card_lib.model_payloads(staged.path, card))
  card.validate()
  staged.commit(card.to_json())


def _take_verdict(verdict, source, card, engine, scale_given, check_pixels,
                  kind_choice: tuple, say, warn) -> None:
  """Records what --eval_data found in the card, and where no flag gave
  the scale, takes the one it measured. `kind_choice` is (--output_kind,
  --confirm_output_kind)."""
  for text in verdict.warnings:
    warn(text)
  card.adopted["eval_check"] = verdict.record
  if not scale_given:
    _choose_scale(source, card, engine, verdict, check_pixels,
                  kind_choice[0], kind_choice[1], say, warn)


def _choose_scale(source, card, engine, verdict, check_pixels, output_kind,
                  confirm_output_kind, say, warn) -> None:
  """Serves with the scale --eval_data chose (the model did not say); the
  output is probed again at it."""
  scores = verdict.record["scales"][verdict.input_scale]
  card.adopted["input_scale"] = (
      f"chosen by --eval_data: accuracy {scores['accuracy']:.3f}, log loss "
      f"{scores['log_loss']:.2f}, clearly the best of "
      f"{', '.join(verdict.record['scales'])}")
  say(f"input_scale: {verdict.input_scale} ({card.adopted['input_scale']})")
  # The engine reads the card's recipe as it runs.
  card.preprocessing["input_scale"] = verdict.input_scale
  adopt_checks.record_output_kind(source, card, engine, output_kind,
                                  confirm_output_kind, check_pixels, say,
                                  warn)


def _add_tflite(source: model_formats.Source, card: card_lib.ModelCard,
                out_dir: str, engine, check_pixels, checked_on: str,
                say) -> None:
  """A Keras or SavedModel source also gets a TFLite conversion, served
  only if it agrees with the source."""
  if source.kind == "onnx":
    card.tflite = {"converted": False, "reason": "an ONNX source is served "
                   "by the onnx engine as it is"}
    return
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


def _add_decoding_flags(parser: cli.ArgumentParser) -> None:
  """How an image becomes the model's input, as the author's recipe did."""
  parser.add_argument("--decoder", default=None,
                      choices=preprocessing.DECODERS,
                      help="tensorflow: as keras.utils."
                      "image_dataset_from_directory; pillow: this project's; "
                      "torchvision: PIL as ImageFolder, Resize, CenterCrop "
                      "(default: torchvision for an ONNX source or with its "
                      "steps below, else tensorflow)")
  parser.add_argument("--resize", default=None,
                      help="torchvision's Resize: N sets the shorter side "
                      "(the longer int(N * long / short)), HEIGHT,WIDTH the "
                      "size")
  parser.add_argument("--center_crop", default=None,
                      help="torchvision's CenterCrop: N or HEIGHT,WIDTH, the "
                      "model's input size")
  parser.add_argument("--interpolation", default=None,
                      choices=tuple(torchvision_decoding.INTERPOLATIONS),
                      help="the resize's PIL filter (default: none, "
                      "Resize's bilinear)")
  parser.add_argument("--preprocessing_config", default=None,
                      help="the author's timm config.json (pretrained_cfg) "
                      "or Hugging Face preprocessor_config.json: sets the "
                      "flags above; a flag that contradicts it is refused")


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(
      prog="python -m model.adopt",
      description="Make a model folder that beam_jobs.predict serves from a "
      "classifier trained elsewhere.")
  parser.add_argument("source", help="a .keras, .h5, .tflite or .onnx file, "
                      "or a SavedModel folder")
  parser.add_argument("--output", required=True, help="the model folder")
  parser.add_argument("--class_names", required=True,
                      help="comma-separated, in the model's output order, or "
                      "a file: one name per line or a JSON list")
  parser.add_argument("--input_scale", default=None,
                      choices=preprocessing.INPUT_SCALES,
                      help="how [0, 255] pixels become the model input: "
                      "unit is x / 255, symmetric x / 127.5 - 1, raw as "
                      "they are (a model that rescales inside), torch "
                      "ToTensor then ImageNet's Normalize (default: what "
                      "the model says: raw with a Rescaling layer, a "
                      "quantised input's range; else measured on "
                      "--eval_data, or refused)")
  parser.add_argument("--input_mean", default=None,
                      help="custom: per-channel mean, in pixel units")
  parser.add_argument("--input_std", default=None,
                      help="custom: per-channel std, in pixel units")
  parser.add_argument("--image_size", default=None,
                      help="HEIGHT,WIDTH or N, only for a dynamic input size")
  parser.add_argument("--layout", default=None, choices=("NCHW", "NHWC"),
                      help="ONNX: where the input keeps its channels, only "
                      "when the graph cannot say (NCHW is PyTorch's)")
  parser.add_argument("--output_name", default=None,
                      help="ONNX: the output holding the class scores, for "
                      "a graph with several")
  parser.add_argument("--color_mode", default=None,
                      choices=tuple(card_lib.COLOR_MODES),
                      help="only for an input with dynamic channels")
  parser.add_argument("--output_kind", default="auto", choices=OUTPUT_KINDS,
                      help="what the model outputs; auto: read from its last "
                      "layer or a probe batch, which a declared kind must "
                      "agree with")
  parser.add_argument("--confirm_output_kind", action="store_true",
                      help="keep --output_kind although the probe batch "
                      "reads the other kind")
  _add_decoding_flags(parser)
  parser.add_argument("--embedding_layer", default=None,
                      help="the Keras layer or ONNX tensor whose output is "
                      "the embedding predict --write_embeddings writes "
                      "(default: the input of the final Dense, Gemm or "
                      "MatMul)")
  parser.add_argument("--eval_data", default=None,
                      help="a folder of class sub-folders to score the model "
                      "on through the serving decoder; every input scale "
                      "and the best class order are scored too, and one "
                      "clearly better than those given is refused, named")
  parser.add_argument("--confirm_input_scale", action="store_true",
                      help="keep --input_scale although --eval_data fits "
                      "another clearly better")
  parser.add_argument("--confirm_class_names", action="store_true",
                      help="keep the order of --class_names although "
                      "--eval_data fits another clearly better")
  parser.add_argument("--verbose", action="store_true",
                      help="also TensorFlow's and Keras' own log lines")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  cli.quiet_libraries(args.verbose)
  try:
    flags = adopt_flags
    adopt(args.source, args.output, flags.parse_class_names(args.class_names),
          input_scale=args.input_scale,
          input_mean=flags.parse_numbers("input_mean", args.input_mean),
          input_std=flags.parse_numbers("input_std", args.input_std),
          image_size=flags.parse_image_size(args.image_size),
          color_mode=args.color_mode, output_kind=args.output_kind,
          decoder=args.decoder, eval_data=args.eval_data,
          resize=flags.parse_image_size(args.resize, "resize", square=False),
          center_crop=flags.parse_image_size(args.center_crop, "center_crop"),
          interpolation=args.interpolation, layout=args.layout,
          output_name=args.output_name,
          preprocessing_config=args.preprocessing_config,
          confirm_output_kind=args.confirm_output_kind,
          confirm_input_scale=args.confirm_input_scale,
          confirm_class_names=args.confirm_class_names,
          embedding_layer=args.embedding_layer)
  except (AdoptError, OSError) as error:
    print(f"model.adopt: error: {error}", file=sys.stderr)
    return 2
  except Exception as error:  # pylint: disable=broad-except
    # A model file can fail a library in ways no check foresaw: one line,
    # and the traceback only when asked for.
    if args.verbose:
      raise
    print(f"model.adopt: error: {type(error).__name__}: "
          f"{model_formats.first_line(error)} (--verbose shows where)",
          file=sys.stderr)
    return 1
  cli.print_next(
      f"{args.output} (model_card.json and the model files)",
      [cli.predict_command(model=args.output)])
  return 0


if __name__ == "__main__":
  sys.exit(main())
