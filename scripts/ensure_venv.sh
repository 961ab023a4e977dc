# Sourced by run_local.sh and run_tests.sh: creates .venv and installs the
# project (with its test extra) when missing or when setup.py has changed.
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
STAMP=$VENV/.installed-$(sha256sum "$ROOT/setup.py" | cut -c1-16)
if [[ ! -f "$STAMP" ]]; then
  echo "== Installing the project into $VENV (first run: about 2 minutes; pip's own progress follows)"
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # pip's own lines (Collecting, Downloading with a bar, Installing) show
  # that the long install is moving.
  "$VENV/bin/python" -m pip install --progress-bar on -e "$ROOT[test,gcp]"
  echo "== Installed; later runs reuse $VENV"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
