#!/usr/bin/env bash
# lowrank's training steps on one accelerator in bfloat16, with MFU (benchmarks/gpu_bench.py).
#
#   bash benchmarks/gpu.sh OUTDIR                      # about 4 minutes on one H200
#   LOWRANK_GPU_TINY=1 bash benchmarks/gpu.sh OUTDIR   # tiny sizes: a smoke run (CPU too)
#
# Needs python3 with jax (jax[cuda] on a GPU), flax, optax, orbax-checkpoint and numpy; lowrank
# installed (`pip install --no-deps -e .`) or not (the repository is put on PYTHONPATH). No
# downloads: random weights and synthetic tokens. Prints a summary and writes
# OUTDIR/gpu_bench.json (after each part, so a run cut short keeps what it measured) and
# OUTDIR/gpu_bench.log. Set PYTHON to use another interpreter, GPU_BENCH_LIMIT_S to change
# the time limit (default 345 s, leaving room under 6 minutes).
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUTDIR}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The default 75% preallocation is fine for one process; without it the allocator's peak
# (recorded in the JSON) follows the steps' real use more closely.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
"${PYTHON:-python3}" -c 'import jax; print("jax", jax.__version__, jax.devices())'
set +e
timeout --signal=INT --kill-after=15 "${GPU_BENCH_LIMIT_S:-345}" \
  "${PYTHON:-python3}" -m benchmarks.gpu_bench --out "$out" "${@:2}" 2>&1 | tee "$out/gpu_bench.log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "gpu_bench exited with status $status (124: time limit); partial results in $out" >&2
fi
exit "$status"
