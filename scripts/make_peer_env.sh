#!/usr/bin/env bash
# Makes (or checks) the peers' reference environment: torch 2.13.0 (CPU), transformers, peft,
# bitsandbytes, safetensors, accelerate, in a venv of their own. lowrank never imports them;
# only benchmarks/peers/ workers and scripts/fixtures/ generators run there.
#
#   bash scripts/make_peer_env.sh              # /work/refenv, or $PEER_ENV
#   bash scripts/make_peer_env.sh /some/venv
#
# Idempotent: an environment whose packages already import at the pinned torch is left as it
# is; otherwise the missing pieces are installed (torch from the package index, or from pip's
# find-links where a machine keeps its CPU wheel on disk, as this one does).
set -euo pipefail
env_dir="${1:-${PEER_ENV:-/work/refenv}}"
torch_version="2.13.0"
python="${PYTHON:-python3}"

check() {
  "$env_dir/bin/python" - "$torch_version" <<'EOF'
import sys
import bitsandbytes, peft, safetensors, torch, transformers  # noqa: F401
want = sys.argv[1]
if torch.__version__.split("+")[0] != want:
    sys.exit(f"torch {torch.__version__} != {want}")
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}")
EOF
}

if [ -x "$env_dir/bin/python" ] && check 2>/dev/null; then
  echo "peer environment ready: $env_dir"
  exit 0
fi
if [ ! -x "$env_dir/bin/python" ]; then
  "$python" -m venv "$env_dir"
fi
"$env_dir/bin/python" -m pip install -q --upgrade pip
# Any build of torch will do; for the small CPU one where the index offers CUDA builds only,
# set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (off by default: machines without
# that host would wait on it).
"$env_dir/bin/python" -m pip install -q "torch==$torch_version" \
  ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
"$env_dir/bin/python" -m pip install -q transformers peft bitsandbytes safetensors accelerate numpy
check
echo "peer environment ready: $env_dir"
