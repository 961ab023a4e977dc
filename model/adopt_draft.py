"""What an adopted source is before it runs: its input, resolved against
the flags; one line that describes it; and the draft card of everything
known before the model is probed (its feeding recipe and classes)."""

import os
from typing import Optional

from model import adopt_feeding
from model import adopt_output
from model import card as card_lib
from model import image_limits
from model import model_formats
from model import preprocessing_config
from model.model_formats import AdoptError


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
  try:
    image_limits.check_input_size(size[0], size[1], source.path)
  except ValueError as error:
    raise AdoptError(str(error)) from None
  return size[0], size[1], color_mode


def load_and_draft(source_path: str, out_dir: str, class_names: list,
                   flags, config_file: Optional[str],
                   decoder: Optional[str], layout: Optional[str],
                   output_name: Optional[str], say) -> tuple:
  """(source, draft card): the output checked, then the source loaded."""
  kind = model_formats.detect_kind(source_path)
  # Before anything is read or written: the output never costs the user
  # the source, or files adopting did not write.
  adopt_output.check_output(source_path, out_dir)
  decoder = adopt_feeding.choose_decoder(kind, decoder, flags)
  try:
    source = model_formats.load_source(
        source_path, layout=layout, image_size=flags.image_size,
        color_mode=flags.color_mode, output_name=output_name)
  except AdoptError as error:
    raise AdoptError(adopt_feeding.with_origin(str(error), flags)) from None
  say(describe_source(source))
  card = draft_card(source, class_names, flags, decoder)
  if config_file is not None:
    card.adopted["preprocessing_from"] = {
        "file": os.path.basename(config_file),
        "sha256": model_formats.sha256_of(config_file),
        "values": dict(flags.provenance)}
  return source, card


_KIND_NAMES = {"keras": "Keras .keras", "h5": "Keras .h5",
               "savedmodel": "TensorFlow SavedModel", "tflite": "TFLite",
               "onnx": "ONNX"}


def describe_source(source: model_formats.Source) -> str:
  """One line on what the source declares (for ONNX, as its graph says)."""
  if source.kind != "onnx":
    return (f"source: {_KIND_NAMES[source.kind]} model, input "
            f"{model_formats.shape_text(source.input_shape)} "
            f"{source.input_dtype}, output "
            f"{model_formats.shape_text(source.output_shape)}")
  record = source.model.record
  batch = {"dynamic": "dynamic batch",
           "made_dynamic": "fixed batch made symbolic (proven)",
           "one_at_a_time": "fixed batch of 1, served one image at a time"}
  return (f"source: ONNX model ({record['producer'] or 'unknown producer'}, "
          f"opset {record['opset'].get('ai.onnx', '?')}), input "
          f"{record['input']['name']!r} {record['input']['shape']} "
          f"{source.input_dtype} ({source.model.layout}, from the "
          f"{'graph' if record['layout_from'] == 'graph' else '--layout'}), "
          f"output {record['output']!r} (batch, "
          f"{source.model.num_classes}), {batch[source.model.batch]}")


def draft_card(source: model_formats.Source, class_names: list,
               flags: preprocessing_config.PreprocessingFlags, decoder: str
               ) -> card_lib.ModelCard:
  """The card of everything known before the model runs: its input, classes
  and feeding recipe (the output kind and model id come later).
  `adopted.input_scale` is None when the model does not say its scale and
  no flag did."""
  try:
    height, width, color_mode = resolve_input(source, flags.image_size,
                                              flags.color_mode)
  except AdoptError as error:
    raise AdoptError(adopt_feeding.with_origin(str(error), flags)) from None
  classes = source.output_shape[0]
  if classes is not None and classes != len(class_names):
    raise AdoptError(f"--class_names has {len(class_names)} names but the "
                     f"model outputs {classes} classes")
  input_scale, scale_from = adopt_feeding.input_scale(source, flags)
  recipe = adopt_feeding.feeding_recipe(decoder, height, width, color_mode,
                                        input_scale, flags)
  adopted = {"source": os.path.basename(source.path.rstrip(os.sep)),
             "sha256": model_formats.sha256_of(source.path),
             "format": source.kind, "input_scale": scale_from,
             "input_shape": "the model's input signature" + (
                 " and --image_size" if None in source.input_shape[:2]
                 else "")}
  if source.kind == "onnx":
    recipe["layout"] = source.model.layout
    adopted["onnx"] = source.model.record
    adopted["input_shape"] = "the ONNX graph" + (
        "" if source.model.record["size_from"] == "graph" else
        f" and {adopt_feeding.origin(flags, 'image_size')}")
  return card_lib.ModelCard(
      model_id="",
      architecture="adopted",
      class_names=list(class_names),
      input_shape=[height, width, card_lib.COLOR_MODES[color_mode]],
      color_mode=color_mode,
      output="logits",
      preprocessing=recipe,
      engines=[model_formats.SOURCE_ENGINE[source.kind]],
      adopted=adopted).validate()
