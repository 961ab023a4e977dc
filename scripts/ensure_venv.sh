# Sourced by run_local.sh and run_tests.sh: creates .venv and installs the
# project (with every extra) when missing or when setup.py has changed, and
# .venv-slim, the base install alone (no TensorFlow, what a Dataflow worker
# serving a TFLite or ONNX model installs), which tests serve from.
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
VENV=${VENV:-$ROOT/.venv}
SLIM_VENV=${SLIM_VENV:-$ROOT/.venv-slim}
PYTHON=${PYTHON:-python3}
SETUP_HASH=$(sha256sum "$ROOT/setup.py" | cut -c1-16)

# ensure_install VENV SPEC: installs SPEC into VENV unless its stamp is there.
ensure_install() {
  local venv=$1 spec=$2 stamp=$1/.installed-$SETUP_HASH
  [[ -f "$stamp" ]] && return 0
  echo "== Installing $spec into $venv (first run: about 2 minutes; pip's own progress follows)"
  [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # pip's own lines (Collecting, Downloading with a bar, Installing) show
  # that the long install is moving.
  "$venv/bin/python" -m pip install --progress-bar on -e "$spec"
  echo "== Installed; later runs reuse $venv"
  rm -f "$venv"/.installed-*
  touch "$stamp"
}

ensure_install "$VENV" "$ROOT[tensorflow,onnx,tools,gcp,test]"
ensure_install "$SLIM_VENV" "$ROOT"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
