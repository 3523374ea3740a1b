#!/usr/bin/env bash
# Sets up .venv and runs the lint, the test suite with the docstring examples (the fast tier;
# `-m slow` adds the thorough one), then builds the documentation with warnings as errors.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# The notebooks run once: the tests write them executed, the docs build renders those.
export LOWRANK_EXECUTED_NOTEBOOKS="$(mktemp -d)"
trap 'rm -rf "$LOWRANK_EXECUTED_NOTEBOOKS"' EXIT
.venv/bin/python -m pytest -n 2 -q "$@"
bash scripts/docs.sh docs docs/_build/html -E -j auto  # -E: re-read every page; -j: in parallel
