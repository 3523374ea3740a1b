#!/usr/bin/env bash
# Sets up .venv and runs the main job: a quick rank ablation (MiniLM LoRA on BBC News: ranks
# 2 and 8 on W_q / W_q,W_v / all linear layers, and the classifier head alone; 7 runs of 20
# steps, a few minutes on 2 CPU cores) and prints its paper-style table. Rerunning skips the
# finished runs. The full ablations behind experiments/results: experiments/results/reproduce.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DB=workdir/quickstart.sqlite
.venv/bin/python -m lowrank.assets
.venv/bin/python experiments/sweep.py --config=configs/rank_ablation.py:quick --seeds=1 \
  --db="$DB" --experiment=rank_ablation
.venv/bin/python experiments/report.py --db="$DB"
