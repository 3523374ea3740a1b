#!/usr/bin/env bash
# The exact commands behind the committed results (this folder). Resumable: rerunning skips
# every run already in the database. Seed 0 of both ablations first, then seed 1, so that a
# cut-short session still has every setting once.
set -euo pipefail
cd "$(dirname "$0")/../.."
DB=${DB:-workdir/results.sqlite}
RUNS=${RUNS:-workdir/runs}
PY=${PY:-.venv/bin/python}
for seeds in 1 2; do
  $PY experiments/sweep.py --config=configs/rank_ablation.py --seeds=$seeds --db=$DB \
    --workdir=$RUNS --config.export_adapters=True
  $PY experiments/sweep.py --config=configs/quant_ablation.py --seeds=$seeds --db=$DB \
    --workdir=$RUNS
done
$PY experiments/sweep.py --config=configs/lm_domain.py --seeds=2 --db=$DB --workdir=$RUNS
$PY experiments/report.py --db=$DB --runs=$RUNS --out=experiments/results
