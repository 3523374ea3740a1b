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
)

# The pins must be the commits runs.csv records, experiment by experiment.
recorded=$("$PY" - <<'EOF'
import pandas as pd
frame = pd.read_csv("experiments/results/runs.csv")
for (experiment, commit), _ in frame[frame.status == "ok"].groupby(["experiment", "git_commit"]):
    print(f"{experiment}|{commit}")
EOF
)
pinned=$(printf '%s\n' "${PINS[@]}" | cut -d'|' -f1,2 | sort)
if [ "$(echo "$recorded" | sort)" != "$pinned" ]; then
  echo "reproduce.sh: the pinned commits differ from those runs.csv records:" >&2
  diff <(echo "$recorded" | sort) <(echo "$pinned") >&2 || true
  exit 1
fi
[ "${1:-}" = "--check" ] && { echo "reproduce.sh: pins match runs.csv"; exit 0; }

mkdir -p "$WORK/src"
for pin in "${PINS[@]}"; do
  IFS='|' read -r experiment commit command <<< "$pin"
  src="$WORK/src/$commit"
  [ -d "$src" ] || git worktree add --detach "$src" "$commit"
  echo "== $experiment at ${commit:0:7}: $command"
  (cd "$src" && export PY DB RUNS && eval "$command")
done
"$PY" experiments/report.py --db="$DB" --runs="$RUNS" --out=experiments/results \
  --readme=experiments/results/README.md
