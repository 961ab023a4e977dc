# Sourced by run_local.sh and run_tests.sh: creates .venv and installs the
# project (with its test extra) when missing or when setup.py has changed.
ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
STAMP=$VENV/.installed-$(sha256sum "$ROOT/setup.py" | cut -c1-16)
if [[ ! -f "$STAMP" ]]; then
  echo "== Installing the project into $VENV (first run takes a few minutes)"
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test,gcp]"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
