#!/usr/bin/env bash
# Issue 15's LM study on one accelerator: configs/lm_domain.py:study under the results protocol
# (pretraining the 10.7M-parameter decoder on the whole standard library first, then full
# fine-tuning, LoRA and QLoRA on English, 3 seeds), as one prepared command.
#
#   bash scripts/device_wheels.sh                   # here, once: the wheels the device lacks
#   bash experiments/lm_study.sh OUTDIR             # there (carry .whl); resumable
#   LM_STUDY_TINY=1 bash experiments/lm_study.sh OUTDIR   # the tiny twin: a smoke run (CPU too)
#
# Writes OUTDIR/lm_study.sqlite (every run's row), OUTDIR/pretrain_metrics.jsonl (the
# pretraining's validation curve) and OUTDIR/lm_study.log; the model and checkpoints stay in
# LOWRANK_CACHE (default /tmp/lowrank_cache), so a second call on the same machine resumes.
# Stops itself after LM_STUDY_LIMIT_S seconds (default 540). The corpus is the running
# Python's standard library: note its version beside the figures.
set -euo pipefail
out="${1:?usage: bash experiments/lm_study.sh OUTDIR}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$repo"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then "$PY" -m pip install -q --no-index --no-deps .whl/*.whl; fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export LOWRANK_CACHE="${LOWRANK_CACHE:-/tmp/lowrank_cache}"
"$PY" -c 'import jax, sys; print("python", sys.version.split()[0], "jax", jax.__version__, jax.devices())' \
  | tee "$out/lm_study.log"
variant=study${LM_STUDY_TINY:+_tiny}
set +e
timeout --signal=INT --kill-after=15 "${LM_STUDY_LIMIT_S:-540}" "$PY" experiments/tune.py \
  --config="configs/lm_domain.py:$variant" --seeds=3 --batch=3 --db="$out/lm_study.sqlite" \
  --workdir="$LOWRANK_CACHE/lm_study_runs" 2>&1 | tee -a "$out/lm_study.log"
status=${PIPESTATUS[0]}
set -e
for curve in "$LOWRANK_CACHE"/lm_domain/*/pretrain_metrics.jsonl; do
  [ -f "$curve" ] && cp "$curve" "$out/pretrain_metrics.jsonl"
done
[ "$status" -ne 0 ] && echo "tune.py exited with status $status (124: time limit); rerun to resume" >&2
exit "$status"
