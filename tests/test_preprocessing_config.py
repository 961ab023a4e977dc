"""model.preprocessing_config on timm and Hugging Face files written here,
shaped like the ones those libraries publish."""

import json

import numpy as np
import pytest

from model import preprocessing
from model import preprocessing_config
from model import torchvision_decoding

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def write(tmp_path, content, name="config.json") -> str:
  path = tmp_path / name
  path.write_text(content if isinstance(content, str) else json.dumps(content))
  return str(path)


def read(tmp_path, content, name="config.json"):
  return preprocessing_config.read_preprocessing_config(
      write(tmp_path, content, name))


def one_line_error(call, *args) -> str:
  with pytest.raises(ValueError) as raised:
    call(*args)
  assert "\n" not in str(raised.value)
  return str(raised.value)


def test_timm_config_json_with_pretrained_cfg(tmp_path):
  flags = read(tmp_path, {
      "architecture": "resnet50", "num_classes": 1000,
      "pretrained_cfg": {"tag": "a1_in1k", "input_size": [3, 224, 224],
                         "test_input_size": [3, 288, 288],
                         "interpolation": "bicubic", "crop_pct": 0.95,
                         "crop_mode": "center", **IMAGENET}})
  # timm: Resize(floor(224 / 0.95)) = Resize(235), then CenterCrop(224).
  assert flags.values() == {
      "resize": 235, "center_crop": [224, 224], "interpolation": "bicubic",
      "crop_rounding": "half_even", "input_scale": "torch",
      "input_mean": None, "input_std": None, "image_size": [224, 224],
      "color_mode": "rgb"}
  assert flags.provenance["resize"] == (
      "config.json pretrained_cfg: input_size, crop_pct")
  assert set(flags.provenance) >= {"resize", "center_crop", "interpolation",
                                   "input_scale", "image_size"}


def test_timm_defaults_and_other_means(tmp_path):
  flags = read(tmp_path, {"input_size": [3, 299, 299],
                          "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
  assert (flags.resize, flags.interpolation, flags.input_scale) == (
      341, "bicubic", "symmetric")  # floor(299 / 0.875) = 341
  assert "default" in flags.provenance["interpolation"]
  squash = read(tmp_path, {"input_size": [3, 224, 160], "crop_pct": 1.0,
                           "crop_mode": "squash"})
  assert (squash.resize, squash.center_crop) == ([224, 160], [224, 160])
  clip = read(tmp_path, {"input_size": [3, 224, 224], "crop_pct": 1.0,
                         "mean": CLIP_MEAN, "std": CLIP_STD})
  assert clip.input_scale == "custom"
  np.testing.assert_allclose(clip.input_mean, np.multiply(CLIP_MEAN, 255))
  gray = read(tmp_path, {"input_size": [1, 28, 28], "crop_pct": 1.0,
                         "mean": [0.5], "std": [0.5]})
  assert (gray.color_mode, gray.input_scale, gray.resize) == (
      "grayscale", "symmetric", 28)


@pytest.mark.parametrize("cfg, message", [
    ({"input_size": [3, 224, 160]}, "ResizeKeepRatio"),
    ({"input_size": [3, 224, 224], "crop_mode": "border"}, "crop_mode"),
    ({"input_size": [3, 224, 224], "crop_border_pixels": 4},
     "crop_border_pixels"),
    ({"input_size": [3, 224, 224], "interpolation": "random"},
     "interpolation"),
    ({"input_size": [4, 224, 224]}, "4 channels"),
    ({"input_size": [3, 224]}, "input_size"),
    ({"input_size": [3, 224, 224], "mean": [0.5, 0.5]}, "mean"),
])
def test_timm_recipes_not_reproduced_are_refused(tmp_path, cfg, message):
  assert message in one_line_error(
      preprocessing_config.read_preprocessing_config, write(tmp_path, cfg))


def test_hugging_face_vit_resizes_exactly(tmp_path):
  flags = read(tmp_path, {
      "do_normalize": True, "do_rescale": True, "do_resize": True,
      "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
      "image_processor_type": "ViTImageProcessor", "resample": 2,
      "rescale_factor": 0.00392156862745098,
      "size": {"height": 224, "width": 224}}, "preprocessor_config.json")
  assert flags.values() == {
      "resize": [224, 224], "center_crop": None, "interpolation": "bilinear",
      "crop_rounding": None, "input_scale": "symmetric", "input_mean": None,
      "input_std": None, "image_size": [224, 224], "color_mode": None}
  assert flags.provenance["interpolation"] == (
      "preprocessor_config.json: resample 2")


def test_hugging_face_convnext_crop_pct_and_centre_crop(tmp_path):
  convnext = read(tmp_path, {
      "crop_pct": 0.875, "do_normalize": True, "do_rescale": True,
      "do_resize": True, "image_processor_type": "ConvNextImageProcessor",
      "image_mean": IMAGENET["mean"], "image_std": IMAGENET["std"],
      "resample": 3, "rescale_factor": 1 / 255,
      "size": {"shortest_edge": 224}})
  assert (convnext.resize, convnext.center_crop, convnext.interpolation,
          convnext.crop_rounding, convnext.input_scale) == (
              256, [224, 224], "bicubic", "floor", "torch")
  mobilenet = read(tmp_path, {
      "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
      "do_normalize": True, "do_rescale": True, "do_resize": True,
      "image_processor_type": "MobileNetV2ImageProcessor",
      "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2,
      "size": {"shortest_edge": 256}})
  assert (mobilenet.resize, mobilenet.center_crop, mobilenet.image_size) == (
      256, [224, 224], [224, 224])
  # What the file asks for is a recipe the decoder takes.
  torchvision_decoding.TorchvisionDecoder(
      mobilenet.resize, mobilenet.center_crop, mobilenet.interpolation, "rgb",
      224, 224, crop_rounding=mobilenet.crop_rounding)
  legacy = read(tmp_path, {"feature_extractor_type": "ViTFeatureExtractor",
                           "size": 384, "resample": 2, **{
                               "image_mean": [0.5] * 3,
                               "image_std": [0.5] * 3}})
  assert legacy.resize == [384, 384]
  unscaled = read(tmp_path, {"do_resize": False, "do_normalize": False,
                             "image_processor_type": "ViTImageProcessor"})
  assert (unscaled.resize, unscaled.input_scale) == (None, "unit")


def test_hugging_face_legacy_feature_extractor_names(tmp_path):
  # microsoft/resnet-50's and facebook/convnext-tiny-224's
  # preprocessor_config.json, as published: the legacy feature-extractor name
  # (an alias of ConvNextImageProcessor in transformers), an int size and
  # crop_pct. ConvNext reads an int size as the shorter side.
  resnet = read(tmp_path, {
      "crop_pct": 0.875, "do_normalize": True, "do_resize": True,
      "feature_extractor_type": "ConvNextFeatureExtractor",
      "image_mean": IMAGENET["mean"], "image_std": IMAGENET["std"],
      "resample": 3, "size": 224}, "preprocessor_config.json")
  assert (resnet.resize, resnet.center_crop, resnet.interpolation,
          resnet.crop_rounding, resnet.input_scale, resnet.image_size) == (
              256, [224, 224], "bicubic", "floor", "torch", [224, 224])
  # CLIP's and MobileNetV2's legacy names read an int size as the shorter
  # side too; DeiT's as a square.
  clip = read(tmp_path, {
      "feature_extractor_type": "CLIPFeatureExtractor", "size": 224,
      "resample": 3, "do_center_crop": True, "crop_size": 224,
      "image_mean": CLIP_MEAN, "image_std": CLIP_STD})
  assert (clip.resize, clip.center_crop) == (224, [224, 224])
  deit = read(tmp_path, {
      "feature_extractor_type": "DeiTFeatureExtractor", "size": 256,
      "resample": 3, "do_center_crop": True, "crop_size": 224,
      **{"image_mean": IMAGENET["mean"], "image_std": IMAGENET["std"]}})
  assert (deit.resize, deit.center_crop) == ([256, 256], [224, 224])


@pytest.mark.parametrize("cfg, message", [
    ({"do_flip_channel_order": True, "size": 256, "resample": 2},
     "do_flip_channel_order"),
    ({"image_processor_type": "EfficientNetImageProcessor",
      "rescale_offset": True}, "rescale_offset"),
    ({"image_processor_type": "ViTImageProcessor", "rescale_factor": 1 / 127.5,
      "do_resize": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
     "rescale_factor"),
    ({"image_processor_type": "SomeImageProcessor", "size": 224,
      "resample": 2}, "int size"),
    ({"image_processor_type": "ViTImageProcessor",
      "size": {"longest_edge": 224}, "resample": 2}, "not reproduced"),
    ({"image_processor_type": "ViTImageProcessor",
      "size": {"height": 224, "width": 224}}, "resample"),
    ({"image_processor_type": "ViTImageProcessor", "crop_pct": 0.9,
      "size": {"height": 224, "width": 224}, "resample": 2}, "crop_pct"),
])
def test_hugging_face_recipes_not_reproduced_are_refused(tmp_path, cfg,
                                                         message):
  assert message in one_line_error(
      preprocessing_config.read_preprocessing_config, write(tmp_path, cfg))


def test_explicit_flags_agree_fill_in_or_are_refused(tmp_path):
  from_file = read(tmp_path, {"input_size": [3, 224, 224], "crop_pct": 0.875,
                              "interpolation": "bilinear", **IMAGENET})
  merged = preprocessing_config.merge_flags(from_file, {
      "resize": [256], "center_crop": 224, "interpolation": "bilinear",
      "input_scale": "torch", "color_mode": None})
  assert merged.values() == from_file.values()
  message = one_line_error(preprocessing_config.merge_flags, from_file,
                           {"interpolation": "bicubic"})
  assert message == ("--interpolation bicubic contradicts config.json: "
                     "interpolation, which gives bilinear")
  assert "--resize 232 contradicts" in one_line_error(
      preprocessing_config.merge_flags, from_file, {"resize": 232})
  assert "--input_mean" in one_line_error(
      preprocessing_config.merge_flags, from_file,
      {"input_mean": [120.0, 110.0, 100.0]})
  vit = read(tmp_path, {"image_processor_type": "ViTImageProcessor",
                        "do_resize": False, "image_mean": [0.5] * 3,
                        "image_std": [0.5] * 3})
  filled = preprocessing_config.merge_flags(vit, {"image_size": [32, 32],
                                                  "color_mode": "rgb"})
  assert filled.image_size == [32, 32]
  assert filled.provenance["image_size"] == "argument"


def test_untrusted_files_are_bounded_before_parsing(tmp_path, monkeypatch):
  read_file = preprocessing_config.read_preprocessing_config
  deep = write(tmp_path, "[" * 100 + "]" * 100, "deep.json")
  assert "nests deeper than 32" in one_line_error(read_file, deep)
  # Brackets inside strings are not nesting.
  brackets = read(tmp_path, {"input_size": [3, 8, 8], "crop_pct": 1.0,
                             "tag": "[" * 100})
  assert brackets.resize == 8
  assert "not a number" in one_line_error(
      read_file, write(tmp_path, '{"input_size": [3, 8, NaN]}', "nan.json"))
  assert "not valid JSON" in one_line_error(
      read_file, write(tmp_path, "{input_size", "bad.json"))
  assert "not a JSON object" in one_line_error(
      read_file, write(tmp_path, "[1, 2]", "list.json"))
  assert "neither a timm config" in one_line_error(
      read_file, write(tmp_path, {"architectures": ["X"]}, "other.json"))
  monkeypatch.setattr(preprocessing_config, "MAX_CONFIG_BYTES", 64)
  big = write(tmp_path, {"input_size": [3, 8, 8], "tag": "x" * 100},
              "big.json")
  assert "above the limit of 64" in one_line_error(read_file, big)


def test_custom_scale_from_a_file_is_close_to_normalize_not_bit_exact():
  # (x - 255 m) / (255 s) against torchvision's (x / 255 - m) / s, every
  # uint8 value: within 4e-7, not bit for bit (the known scales are).
  values = np.arange(256, dtype=np.float32)
  pixels = np.repeat(values[:, None], 3, axis=1)[None, None]
  scale = preprocessing_config.scale_from_mean_std(CLIP_MEAN, CLIP_STD, True,
                                                   "test")
  got = preprocessing.scale_pixels(pixels, scale["input_scale"],
                                   scale["input_mean"], scale["input_std"])
  torchvision = ((values[:, None] / np.float32(255) -
                  np.asarray(CLIP_MEAN, np.float32)) /
                 np.asarray(CLIP_STD, np.float32))
  assert np.max(np.abs(got[0, 0] - torchvision)) < 4e-7
