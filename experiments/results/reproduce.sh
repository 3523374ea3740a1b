#!/usr/bin/env bash
# Regenerates every committed table, figure, runs.csv and the adapters the subspace table reads,
# each experiment from the commit its rows record (runs.csv's git_commit), so the code that ran
# is the code that made the rows. Resumable: rerunning skips every run already in the database.
#
#   bash experiments/results/reproduce.sh           # run what is missing, then the report
#   bash experiments/results/reproduce.sh --check   # only check the pins against runs.csv
#
# Each experiment runs in a detached git worktree at its commit (under $WORK/src/<commit>),
# with this checkout's virtual environment; the report is made by this checkout.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
WORK=${WORK:-$ROOT/workdir}
DB=${DB:-$WORK/results.sqlite}
RUNS=${RUNS:-$WORK/runs}
PY=${PY:-$ROOT/.venv/bin/python}

# experiment | commit its rows record | the command that made them (run from that commit)
PINS=(
  "rank_ablation|eb38e647586c73058a04b3735f312894aefa63f7|for s in 1 2; do \$PY experiments/sweep.py --config=configs/rank_ablation.py --seeds=\$s --db=\$DB --workdir=\$RUNS --config.export_adapters=True; done"
  "quant_ablation|eb38e647586c73058a04b3735f312894aefa63f7|for s in 1 2; do \$PY experiments/sweep.py --config=configs/quant_ablation.py --seeds=\$s --db=\$DB --workdir=\$RUNS; done"
  "lm_domain|4603a78b87f48dbebfa581ab9ab562c8b1b38cb1|\$PY experiments/sweep.py --config=configs/lm_domain.py --seeds=2 --db=\$DB --workdir=\$RUNS"
  "quant_perplexity|ad552972802cff2845967dccbd92452ae250868c|\$PY experiments/sweep.py --config=configs/quant_perplexity.py --db=\$DB"
  "lm_domain:types|ad552972802cff2845967dccbd92452ae250868c|\$PY experiments/sweep.py --config=configs/lm_domain.py --seeds=2 --db=\$DB --experiment=lm_domain:types '--config.sweep.data_types=(\"none\",\"int8\",\"int4\",\"fp4\",\"nf4\")'"
  "method_ablation|52423a71dd3ac3e7dd81bb1f3132bf7c3c009a65|\$PY experiments/tune.py --config=configs/method_ablation.py --seeds=3 --db=\$DB --workdir=\$RUNS"
  "method_ablation:lm|b29ab201ad4bb603de67fc9c8d64509731063d33|\$PY experiments/tune.py --config=configs/method_ablation.py:lm --seeds=3 --db=\$DB --workdir=\$RUNS"
  "lm_domain:protocol|82acb236f3feff1d4c891f7453c4e9b30ee5df86|\$PY experiments/tune.py --config=configs/lm_domain.py:protocol --seeds=3 --batch=3 --db=\$DB --workdir=\$RUNS"
  "lm_domain:protocol|11c84e6bb51cb74495fd86d0eecae0d27c8913b1|\$PY experiments/tune.py --config=configs/lm_domain.py:protocol --seeds=3 --batch=3 --db=\$DB --workdir=\$RUNS"
  "lm_domain:protocol|c61197148e324bde11b683556306ad6f323e92a0|\$PY experiments/tune.py --config=configs/lm_domain.py:protocol --seeds=3 --batch=3 --db=\$DB --workdir=\$RUNS"
  "lm_domain:protocol|7e6411eb9f4f92f5fd33dcf54cf6513119ada515|\$PY experiments/tune.py --config=configs/lm_domain.py:protocol --seeds=3 --batch=3 --db=\$DB --workdir=\$RUNS"
  "rank_ablation:protocol|3e419f1706dbe78d418958f3a812102cf0611557|for a in qv all; do \$PY experiments/sweep.py --config=configs/rank_ablation.py --experiment=rank_ablation:protocol --batch=3 --db=\$DB --workdir=\$RUNS '--config.sweep.baselines=()' --seeds=1 '--config.sweep.ranks=(8,)' '--config.sweep.learning_rates.lora=(0.0003,)' \"--config.sweep.adapts=(\\\"\$a\\\",)\"; done"
  "rank_ablation:protocol|e8109bebb132346b09d8bc5ce38d458248582b20|for a in qv all; do \$PY experiments/tune.py --config=configs/rank_ablation.py --experiment=rank_ablation:protocol --batch=3 --db=\$DB --workdir=\$RUNS '--config.sweep.baselines=()' --seeds=3 --config.export_adapters=True '--config.sweep.ranks=(1,8,64)' \"--config.sweep.adapts=(\\\"\$a\\\",)\"; done"
  "method_ablation|5e2f8b987797e4b0e267cc751ca3564222d61fea|\$PY experiments/tune.py --config=configs/method_ablation.py --seeds=3 --batch=3 --db=\$DB --workdir=\$RUNS"
  "rank_ablation:protocol|aacde7a371f305761e0e5f71ad3471915a4ae558|for a in qv all; do \$PY experiments/tune.py --config=configs/rank_ablation.py --experiment=rank_ablation:protocol --batch=3 --db=\$DB --workdir=\$RUNS '--config.sweep.baselines=()' --seeds=3 --config.export_adapters=True '--config.sweep.ranks=(1,2,4,8,64)' \"--config.sweep.adapts=(\\\"\$a\\\",)\"; done"
  "rank_ablation:protocol|5a924500b62b1138690193369152c2aad43c3178|for a in qkvo q; do \$PY experiments/tune.py --config=configs/rank_ablation.py --experiment=rank_ablation:protocol --batch=3 --db=\$DB --workdir=\$RUNS '--config.sweep.baselines=()' --seeds=3 --config.export_adapters=True '--config.sweep.ranks=(1,2,4,8,64)' \"--config.sweep.adapts=(\\\"\$a\\\",)\"; done; \$PY experiments/tune.py --config=configs/rank_ablation.py --experiment=rank_ablation:protocol --batch=3 --db=\$DB --workdir=\$RUNS '--config.sweep.baselines=()' --seeds=3 --config.export_adapters=True '--config.sweep.ranks=(1,2,4,8,64)' '--config.sweep.adapts=(\"v\",)' '--config.sweep.learning_rates.lora=(0.0003,0.001,0.003,0.01,0.03)'"
  "method_ablation|59c6ab0165cdb14e3e7b3a07634664dfa0d90f47|\$PY experiments/tune.py --config=configs/method_ablation.py --seeds=3 --batch=3 --db=\$DB --workdir=\$RUNS '--config.sweep.methods=(\"lora\",\"rslora\",\"dora\",\"pissa\",\"loftq\")' '--config.sweep.learning_rates.lora=(0.0003,0.001,0.003,0.01)' || true; \$PY experiments/tune.py --config=configs/method_ablation.py --seeds=3 --batch=3 --db=\$DB --workdir=\$RUNS '--config.sweep.methods=(\"adalora\",)' '--config.sweep.learning_rates.lora=(0.0001,0.0003,0.001,0.003)'"
  "method_ablation|c0fb3a6480041c4fb2f0d335c7b1f49be24dc24c|\$PY experiments/tune.py --config=configs/method_ablation.py --seeds=3 --batch=3 --db=\$DB --workdir=\$RUNS '--config.sweep.methods=(\"lora\",\"rslora\",\"dora\",\"pissa\",\"loftq\")' '--config.sweep.learning_rates.lora=(0.0003,0.001,0.003,0.01)'"
  "quant_ablation:protocol|ddd7c8245ba2ea1e31dff14dbdd1c93613499ccb|\$PY experiments/tune.py --config=configs/quant_ablation.py:protocol --seeds=3 --batch=3 --db=\$DB --workdir=\$RUNS"
)
# (rank_ablation:protocol: a first launch at 3e419f1 ran three r=8 runs at 3e-4 (W_q,W_v at both
# scales, every linear layer at alpha = 2r; its pin reruns the fourth too) before it was stopped; the rest ran at
# e8109be, which changed only how tune.py finds its rows; ranks 2 and 4 ran at aacde7a (the
# same rows' rates, chosen at r=8; the done rows are skipped); W_q, W_k, W_v, W_o and W_q alone
# ran at 5a92450, and W_v alone too, its grid widened to 3e-2 when it chose 1e-2. method_ablation's
# full fine-tuning chose the top of its grid at 52423a7; 5e2f8b9 adds 3e-4 and runs what that
# choice needs; at 59c6ab0 the adapters at an edge of theirs tried one rate beyond it, but the
# batched sweep put PiSSA in a stack with LoRA's runs, which failed those three (hence
# `|| true`: the sweep exits nonzero on a failed run); c0fb3a6 keeps unstackable runs alone
# and ran them.)
# (lm_domain:protocol ran at 82acb23, then full fine-tuning chose its grid's top twice and the
# grid gained 1e-3 at 11c84e6, 3e-3 at c611971 and 1e-2 at 7e6411e. Before e085f2f tune.py
# chose within each pass's own rows, so each later pass ran its new rate at all 3 seeds; the
# report chooses over every rate tried (3e-3), and the 1e-2 seeds 1 and 2 go unused.)

# The compression ablation's pins, checked against compression_runs.csv (made by
# experiments/compression_report.py).
COMPRESSION_PINS=(
  "compress_ablation:lm|439646f348bb52da1135e4e37de7b2f33fd335d7|\$PY experiments/tune.py --config=configs/compress_ablation.py:lm --seeds=3 --batch=3 --db=\$DB --workdir=\$RUNS || true; \$PY experiments/tune.py --config=configs/compress_ablation.py:lm --seeds=3 --batch=1 --db=\$DB --workdir=\$RUNS"
  "compress_ablation|d035e046f74c751826475a0c42637bd90bcc21d1|\$PY experiments/tune.py --config=configs/compress_ablation.py --seeds=3 --batch=3 --db=\$DB --workdir=\$RUNS"
  "compress_ablation|e085f2fba2e35de38aeeb7d12a2a0861d89d9f50|\$PY experiments/tune.py --config=configs/compress_ablation.py --seeds=3 --batch=3 --db=\$DB --workdir=\$RUNS"
)
# (At 439646f a stack of untrained runs fails: the first pass leaves the untrained bases of
# seeds 1 and 2 undone, the second runs them one by one.)
# (MiniLM ran at d035e04; the head alone chose its grid's top over most compressed bases, and
# at e085f2f the head's grid gained 1e-1: that pass runs the new rate and the seeds it chooses.)

# The pins must be the commits each CSV records, experiment by experiment.
check_pins() {  # check_pins CSV PIN...
  local csv=$1
  shift
  local recorded pinned
  recorded=$(CSV="$csv" "$PY" - <<'EOF'
import os

import pandas as pd
frame = pd.read_csv(os.environ["CSV"])
for (experiment, commit), _ in frame[frame.status == "ok"].groupby(["experiment", "git_commit"]):
    print(f"{experiment}|{commit}")
EOF
)
  pinned=$( (( $# )) && printf '%s\n' "$@" | cut -d'|' -f1,2 | sort || true)
  if [ "$(echo "$recorded" | sed '/^$/d' | sort)" != "$(echo "$pinned" | sed '/^$/d')" ]; then
    echo "reproduce.sh: the pinned commits differ from those $csv records:" >&2
    diff <(echo "$recorded" | sed '/^$/d' | sort) <(echo "$pinned" | sed '/^$/d') >&2 || true
    exit 1
  fi
}
check_pins experiments/results/runs.csv "${PINS[@]}"
check_pins experiments/results/compression_runs.csv "${COMPRESSION_PINS[@]}"
[ "${1:-}" = "--check" ] && { echo "reproduce.sh: pins match runs.csv and compression_runs.csv"; exit 0; }

mkdir -p "$WORK/src"
for pin in "${PINS[@]}" "${COMPRESSION_PINS[@]}"; do
  IFS='|' read -r experiment commit command <<< "$pin"
  src="$WORK/src/$commit"
  [ -d "$src" ] || git worktree add --detach "$src" "$commit"
  echo "== $experiment at ${commit:0:7}: $command"
  (cd "$src" && export PY DB RUNS && eval "$command")
done
# The adapters the adapter table and the subspace figure read (W_q,W_v at alpha = 2r, seed 0,
# r=1, 8 and 64): their rows ran in stacks at e8109be, which exported nothing from a stack
# (fixed in 8fb1c4b), so this checkout reruns the three into a database of its own
# (the results database keeps the rows that were measured) and exports them under $RUNS.
"$PY" experiments/sweep.py --config=configs/rank_ablation.py --experiment=rank_ablation:protocol \
  --batch=2 --seeds=1 --db="$WORK/exports.sqlite" --workdir="$RUNS" --config.export_adapters=True \
  '--config.sweep.baselines=()' '--config.sweep.ranks=(1,8,64)' '--config.sweep.scales=("constant",)' \
  '--config.sweep.learning_rates.lora=(0.003,)' '--config.sweep.adapts=("qv",)'
"$PY" experiments/report.py --db="$DB" --runs="$RUNS" --out=experiments/results \
  --readme=experiments/results/README.md
"$PY" experiments/compression_report.py --db="$DB" --out=experiments/results \
  --readme=experiments/results/compression.md
