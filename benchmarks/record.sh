#!/usr/bin/env bash
# Runs one benchmark command and keeps what it prints under benchmarks/figures/, headed by the
# command, the commit, the date and the machine's load, so that a figure in RESULTS.md has its
# raw output committed beside it. A second run the same day is appended, never overwritten.
#
#   bash benchmarks/record.sh NAME COMMAND...     # -> benchmarks/figures/NAME_<UTC date>.txt
#   bash benchmarks/record.sh lora_vs_full .venv/bin/python benchmarks/lora_vs_full.py --rounds 12
set -euo pipefail
usage="usage: bash benchmarks/record.sh NAME COMMAND..."
name="${1:?$usage}"
shift
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
case "$name" in
  *[!A-Za-z0-9_.-]*) echo "NAME='$name': use letters, digits, '_', '.' and '-' only" >&2; exit 2 ;;
esac
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$repo/benchmarks/figures/${name}_$(date -u +%Y-%m-%d).txt"
commit="$(git -C "$repo" rev-parse HEAD)"
# The code a figure depends on: the library, the configs and the benchmark scripts.
git -C "$repo" diff --quiet HEAD -- lowrank configs 'benchmarks/*.py' 'benchmarks/peers/*.py' \
  || commit="$commit (with uncommitted changes to the code)"
{
  echo "# command: $*"
  echo "# commit: $commit"
  echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# machine: $(uname -m), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start"
} >> "$out"
set +e
"$@" 2>&1 | tee -a "$out"
status=${PIPESTATUS[0]}
set -e
echo "# exit status: $status" >> "$out"
echo "recorded in ${out#"$repo"/}" >&2
exit "$status"
