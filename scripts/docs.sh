#!/usr/bin/env bash
# Builds the documentation into docs/_build/html, warnings as errors (a broken reference, a
# docstring Sphinx cannot parse or a notebook cell that raises fails the build). The notebooks
# are executed in small mode (LOWRANK_NOTEBOOK_SMALL=1, as the tests run them).
#
#   bash scripts/docs.sh                      # docs/ -> docs/_build/html
#   bash scripts/docs.sh SRC OUT [OPTIONS]    # another source folder (the tests use this)
#
# Uses .venv's Python if there is one (bash scripts/setup.sh installs the docs extra), else
# $PYTHON or python3. Open docs/_build/html/index.html in a browser.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="${1:-$root/docs}"
out="${2:-$root/docs/_build/html}"
shift $(( $# < 2 ? $# : 2 ))
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # the kernels run in the notebooks' folder
export LOWRANK_NOTEBOOK_SMALL="${LOWRANK_NOTEBOOK_SMALL:-1}"
unset MPLBACKEND  # the notebooks' inline backend draws the figures
exec "$python" -m sphinx -b html -W --keep-going -n -q "$src" "$out" "$@"
