# Sourced by scripts/run and scripts/test: go to the repo root and set up what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
"${D2L_PYTHON:-python3}" scripts/setup.py
VENV_PY=.d2l/venv/bin/python
