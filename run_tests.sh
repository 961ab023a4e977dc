#!/usr/bin/env bash
# The test suite: creates .venv and installs the project if needed, then runs
# pytest. Extra arguments go to pytest. pytest's "no tests ran" exit (5) is a
# failure here, as is any failing test.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
source "$ROOT/scripts/ensure_venv.sh"
export TF_CPP_MIN_LOG_LEVEL=2
python -m pytest tests "$@"
