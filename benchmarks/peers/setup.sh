#!/usr/bin/env bash
# Creates the peers' virtualenv from scratch: Ray Data and PySpark with what
# the project's serving code needs (LiteRT and ONNX Runtime, Pillow,
# imagecodecs, simplejpeg, pyarrow), but neither Apache Beam nor the project
# itself: the jobs put this checkout on their path (common.py). It is never a
# project dependency. TensorFlow is installed as in the venv measured on
# 2026-12-07, though the jobs no longer import it (the `tensorflow` decoder
# recipe runs without it).
#
# Usage: benchmarks/peers/setup.sh [VENV_DIR]
#   VENV_DIR  default: benchmarks/peers/.venv (git-ignored); replaced if present
#
# PySpark 4 needs Java 17 or 21. Without `java` on PATH the script installs
# Debian's openjdk-17-jre-headless when it runs as root, and otherwise stops
# saying so. Ray and PySpark are pinned to the versions measured in
# benchmarks/README.md. The serving libraries (decoders, engine) take the
# versions of the project's own .venv when it exists, so the peers decode and
# infer with the very same code, and the project's ranges (setup.py)
# otherwise. pandas stays below 3: PySpark 4.3 warns that it "does not yet
# fully support pandas >= 3.0.0".
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$here/.venv}"
python="${PYTHON:-python3}"

if ! java -version >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "no java on PATH: installing Debian's openjdk-17-jre-headless" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless
  else
    echo "no java on PATH, and this is not root on Debian: install a Java 17" \
         "or 21 runtime (Debian: apt-get install openjdk-17-jre-headless);" \
         "PySpark 4 needs it" >&2
    exit 1
  fi
fi

start=$(date +%s)
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
constraints="$venv/serving-constraints.txt"
if [ -x "$repo/.venv/bin/pip" ]; then
  "$repo/.venv/bin/pip" freeze | grep -iE \
    '^(ai-edge-litert|pillow|imagecodecs|simplejpeg|onnxruntime|numpy|tensorflow|keras|pyarrow)==' \
    > "$constraints" || true
else
  : > "$constraints"
fi
"$venv/bin/pip" install --quiet -c "$constraints" \
  "ray[data]==2.60.0" "pyspark==4.3.0" "pandas>=2.2,<3" \
  "tensorflow>=2.21,<2.22" "ai-edge-litert>=2.0,<3" "pillow>=10.0" \
  "imagecodecs>=2024.1" "simplejpeg>=1.8,<2" "onnxruntime>=1.20" \
  "pyarrow>=14" "numpy>=1.26,<3"

# Check: the project's serving modules import from the checkout, without Beam.
PYTHONPATH="$repo" "$venv/bin/python" - <<'PY'
import sys
from model import card, engines, keras_decoding, preprocessing  # noqa: F401
import onnxruntime  # noqa: F401
import pyspark, ray
assert "apache_beam" not in sys.modules
print(f"ok: ray {ray.__version__}, pyspark {pyspark.__version__}; "
      "model imports without apache_beam")
PY
"$venv/bin/pip" freeze > "$venv/freeze.txt"
echo "installed in $(( $(date +%s) - start )) s; size $(du -sh "$venv" | cut -f1);" \
     "versions in $venv/freeze.txt"
