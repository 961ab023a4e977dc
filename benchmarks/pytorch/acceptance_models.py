"""The ONNX files of the acceptance pass (issue 28), made in-process the way
PyTorch users make them, with PyTorch's own answers beside them.

Usage (the torch venv of setup.sh; benchmarks/onnx_acceptance.py runs it):
  TORCH_VENV/bin/python benchmarks/pytorch/acceptance_models.py \\
      --images DIR --out DIR [--models resnet18,...] [--threads 2]

Random-weight torchvision architectures (nothing is downloaded) with a
10-class head; their BatchNorm statistics are measured on the images, as
training would leave them, so that activations have a trained net's
scale. Each export is a call a user makes (torch.onnx.export's default,
dynamic batch, TorchScript at several opsets, fp16, ONNX Runtime's QDQ int8
quantisation), and beside each one the author's answers on the same images
through torchvision's transforms: PyTorch's float32 forward and ONNX
Runtime's on the exported file. The hostile files are small graphs that
break a rule: several inputs, several outputs, external data outside the
model's folder, huge declared sizes. Writes OUT/exports.json.
"""

import argparse
import copy
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from PIL import Image
from torchvision import transforms

CLASSES = 10
# name: (Resize, CenterCrop, interpolation), torchvision's own for each.
ARCHITECTURES = {
    "resnet18": (256, 224, "bilinear"),
    "mobilenet_v3_small": (256, 224, "bilinear"),
    "efficientnet_b0": (256, 224, "bicubic"),
    "convnext_tiny": (236, 224, "bilinear"),
    "vit_b_16": (256, 224, "bilinear"),
}
DYNAMIC_AXES = {"input": {0: "batch"}, "output": {0: "batch"}}
NAMES = {"input_names": ["input"], "output_names": ["output"]}
# (architecture, export name, torch.onnx.export keywords; "fp16" and "qdq"
# are made from the TorchScript opset 17 call).
EXPORTS = [
    ("resnet18", "default", {}),
    ("resnet18", "dynamo_dynamic_batch", {"dynamic": True}),
    ("resnet18", "torchscript_opset11", {"dynamo": False,
                                         "opset_version": 11}),
    ("resnet18", "torchscript_opset17_dynamic",
     dict(dynamo=False, opset_version=17, dynamic_axes=DYNAMIC_AXES, **NAMES)),
    ("resnet18", "fp16", {}),
    ("resnet18", "qdq_int8", {}),
    ("mobilenet_v3_small", "default", {}),
    ("mobilenet_v3_small", "torchscript_opset13_dynamic",
     dict(dynamo=False, opset_version=13, dynamic_axes=DYNAMIC_AXES, **NAMES)),
    ("efficientnet_b0", "default", {}),
    ("convnext_tiny", "default", {}),
    ("vit_b_16", "default", {}),
]


def transform(arch: str):
  resize, crop, interpolation = ARCHITECTURES[arch]
  mode = getattr(transforms.InterpolationMode, interpolation.upper())
  return transforms.Compose([
      transforms.Resize(resize, interpolation=mode),
      transforms.CenterCrop(crop), transforms.ToTensor(),
      transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def load_images(folder: str, arch: str) -> tuple:
  """(paths relative to `folder`, one float32 batch) as ImageFolder
  loads them."""
  paths = sorted(os.path.relpath(os.path.join(root, name), folder)
                 for root, _, names in os.walk(folder) for name in names)
  tf = transform(arch)
  batch = torch.stack([
      tf(Image.open(os.path.join(folder, path)).convert("RGB"))
      for path in paths])
  return paths, batch


def build(arch: str, batch: torch.Tensor) -> torch.nn.Module:
  """A random-weight torchvision net whose BatchNorm statistics are
  measured on `batch`, and whose head is drawn at a trained one's scale."""
  torch.manual_seed(0)
  model = getattr(torchvision.models, arch)(weights=None,
                                            num_classes=CLASSES)
  for layer in model.modules():
    # The 10-class head drawn at a trained head's scale: torchvision starts
    # ViT's at zero (every answer uniform) and MobileNet's at std 0.01.
    if isinstance(layer, torch.nn.Linear) and layer.out_features == CLASSES:
      torch.nn.init.normal_(layer.weight, std=2 / layer.in_features**0.5)
  norms = [m for m in model.modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]  # pylint: disable=protected-access
  for norm in norms:
    norm.reset_running_stats()
    norm.momentum = None  # a cumulative average
  if norms:
    model.train()
    with torch.no_grad():
      for start in range(0, len(batch), 12):
        model(batch[start:start + 12])
  return model.eval()


def export(model, arch: str, name: str, keywords: dict, path: str) -> None:
  dummy = torch.randn(1, 3, ARCHITECTURES[arch][1], ARCHITECTURES[arch][1])
  if name == "fp16":
    model, dummy = _half(model), dummy.half()
  if name in ("fp16", "qdq_int8"):
    keywords = dict(dynamo=False, opset_version=17)
  if keywords.pop("dynamic", False):
    keywords["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
  torch.onnx.export(model, (dummy,), path, **keywords)


def _half(model):
  return copy.deepcopy(model).half()


def quantize(float_path: str, path: str, batch: np.ndarray) -> None:
  """ONNX Runtime's static QDQ int8 quantisation, calibrated on `batch`."""
  from onnxruntime import quantization  # pylint: disable=import-outside-toplevel

  class Reader(quantization.CalibrationDataReader):

    def __init__(self):
      name = onnx.load(float_path, load_external_data=False).graph.input[0]
      self.feeds = iter([{name.name: batch[i:i + 1]}
                         for i in range(min(len(batch), 16))])

    def get_next(self):
      return next(self.feeds, None)

  quantization.quantize_static(float_path, path, Reader(),
                               quant_format=quantization.QuantFormat.QDQ)


def ort_probabilities(path: str, batch: np.ndarray) -> np.ndarray:
  """ONNX Runtime's forward of the exported file, image by image."""
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  feed = session.get_inputs()[0]
  dtype = np.float16 if "float16" in feed.type else np.float32
  logits = np.concatenate([
      session.run(None, {feed.name: batch[i:i + 1].astype(dtype)})[0]
      for i in range(len(batch))]).astype(np.float64)
  return softmax(logits)


def softmax(logits: np.ndarray) -> np.ndarray:
  logits = logits - logits.max(1, keepdims=True)
  return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def make_exports(images: str, out: str, wanted: list) -> list:
  """Every export of EXPORTS whose architecture is wanted; one record
  each."""
  records, by_arch = [], {}
  for arch, name, keywords in EXPORTS:
    if arch not in wanted:
      continue
    if arch not in by_arch:
      paths, batch = load_images(images, arch)
      model = build(arch, batch)
      with torch.no_grad():
        reference = softmax(model(batch).double().numpy())
      by_arch[arch] = (model, batch.numpy(), reference)
    model, batch, reference = by_arch[arch]
    folder = os.path.join(out, f"{arch}_{name}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    if name == "qdq_int8":
      export(model, arch, name, {}, path + ".float.onnx")
      quantize(path + ".float.onnx", path, batch)
      os.remove(path + ".float.onnx")
    else:
      export(model, arch, name, dict(keywords), path)
    np.savez(os.path.join(folder, "author.npz"), paths=np.array(paths),
             torch=reference, ort=ort_probabilities(path, batch))
    resize, crop, interpolation = ARCHITECTURES[arch]
    records.append({"model": arch, "export": name, "path": path,
                    "flags": ["--input_scale", "torch", "--resize",
                              str(resize), "--center_crop", str(crop),
                              "--interpolation", interpolation]})
    print(f"made {arch} {name}", flush=True)
  return records


class Tiny(torch.nn.Module):
  """Conv, ReLU, pooling and a 10-class head; `two_inputs` adds a second
  image, `two_outputs` returns the pooled features after the logits."""

  def __init__(self, two_inputs=False, two_outputs=False):
    super().__init__()
    torch.manual_seed(1)
    self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)
    self.head = torch.nn.Linear(8, CLASSES)
    self.two_inputs, self.two_outputs = two_inputs, two_outputs

  def forward(self, x, *more):
    if self.two_inputs:
      x = x + more[0]
    features = torch.relu(self.conv(x)).mean((2, 3))
    logits = self.head(features) * 8.0
    return (logits, features) if self.two_outputs else logits


def _export(model, path, inputs=1, outputs=("logits",)):
  dummies = tuple(torch.randn(1, 3, 224, 224) for _ in range(inputs))
  torch.onnx.export(model, dummies, path, dynamo=False, opset_version=17,
                    input_names=[f"image{i}" for i in range(inputs)],
                    output_names=list(outputs))


def _external(path, location):
  """The graph's weights moved to an external file, whose recorded
  location is then set to `location`."""
  graph = onnx.load(path)
  onnx.save_model(graph, path, save_as_external_data=True,
                  all_tensors_to_one_file=True, location="weights.bin",
                  size_threshold=0)
  graph = onnx.load(path, load_external_data=False)
  for tensor in graph.graph.initializer:
    for entry in tensor.external_data:
      if entry.key == "location":
        entry.value = location
  onnx.save_model(graph, path)


def make_hostile(out: str, images: str) -> list:
  """Writes the hostile files under OUT/hostile_*; their records: each
  file's path, the model.adopt flags and what should happen (`expect`:
  served, or refused in one line)."""
  records = []

  def record(name, expect, flags=(), maker=None):
    folder = os.path.join(out, "hostile_" + name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    maker(path)
    records.append({"model": "hostile", "export": name, "path": path,
                    "expect": expect, "flags": ["--input_scale", "torch",
                                                "--resize", "256",
                                                "--center_crop", "224",
                                                *flags]})
    return folder, path

  two = Tiny(two_outputs=True).eval()
  folder, path = record("two_outputs", "served", ["--output_name", "logits"],
                        lambda p: _export(two, p, outputs=("logits",
                                                           "features")))
  record("two_outputs_unnamed", "refused",
         maker=lambda p: _export(two, p, outputs=("logits", "features")))
  record("two_inputs", "refused",
         maker=lambda p: _export(Tiny(two_inputs=True).eval(), p, inputs=2))
  tiny = Tiny().eval()
  outside = os.path.join(out, "outside_weights.bin")
  record("external_data_outside", "refused", maker=lambda p: (
      _export(tiny, p), _external(p, "../outside_weights.bin")))
  os.replace(os.path.join(out, "hostile_external_data_outside",
                          "weights.bin"), outside)
  record("external_data_absolute", "refused",
         maker=lambda p: (_export(tiny, p), _external(p, outside)))
  record("huge_declared_input", "refused",
         maker=lambda p: _declare(tiny, p, input_dims=(1, 3, 10**6, 10**6)))
  record("huge_fixed_batch", "refused",
         maker=lambda p: _declare(tiny, p, input_dims=(10**9,)))
  record("huge_declared_initializer", "refused",
         maker=lambda p: _declare(tiny, p, weight_dims=(2**20, 2**20)))
  _reference(two, folder, path, images)
  return records


def _declare(model, path, input_dims=None, weight_dims=None):
  """The exported graph with its input, or an external weight, declared
  far larger than anything the file holds."""
  _export(model, path)
  if weight_dims:
    _external(path, "weights.bin")
  graph = onnx.load(path, load_external_data=False)
  if input_dims:
    for dim, value in zip(graph.graph.input[0].type.tensor_type.shape.dim,
                          input_dims):
      dim.dim_value = value
  if weight_dims:
    del graph.graph.initializer[0].dims[:]
    graph.graph.initializer[0].dims.extend(weight_dims)
  onnx.save_model(graph, path)


def _reference(model, folder, path, images):
  """PyTorch's and ONNX Runtime's answers for the served hostile file."""
  paths, batch = load_images(images, "resnet18")
  with torch.no_grad():
    reference = softmax(model(batch)[0].double().numpy())
  np.savez(os.path.join(folder, "author.npz"), paths=np.array(paths),
           torch=reference, ort=ort_probabilities(path, batch.numpy()))


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--models", default=",".join(
      a for a in ARCHITECTURES if a != "vit_b_16"))
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  made = make_exports(args.images, args.out, args.models.split(","))
  made += make_hostile(args.out, args.images)
  with open(os.path.join(args.out, "exports.json"), "w",
            encoding="utf-8") as handle:
    json.dump(made, handle, indent=1)
