#!/usr/bin/env bash
# Sets up .venv and runs the lint and the test suite (the fast tier; `-m slow` adds the thorough one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -n 2 -q "$@"
