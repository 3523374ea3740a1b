#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels lowrank's experiments import beyond what the
# device machine's Python 3.12 has (jax, flax, optax, orbax-checkpoint, numpy), for a run there:
# carry .whl and `pip install --no-index --no-deps .whl/*.whl` first (experiments/lm_study.sh
# does). About 18 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -d .whl \
  ml_collections absl-py tensorboardX protobuf tqdm pandas python-dateutil pytz tzdata six \
  safetensors tokenizers PyYAML
du -sh .whl
