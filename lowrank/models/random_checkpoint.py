"""Random-weight Hugging Face Llama checkpoints of any shape, written one tensor at a time.

For trying the 4-bit path at the scale it exists for without downloading a model: a
Llama-2-7B-shaped directory (13.5 GB of bfloat16) is written with the memory of its largest
tensor. The files are what transformers saves (``config.json``, ``model-0000i-of-0000n``
shards with an index) and load with :func:`lowrank.models.from_pretrained` or transformers::

    python -m lowrank.models.random_checkpoint /tmp/llama-2-7b --preset llama-2-7b
    python -m lowrank.models.random_checkpoint /tmp/small --preset llama-2-7b \\
        --set num_hidden_layers=2 --set vocab_size=1000

Values: norms are ones, every other tensor is drawn uniformly with mean 0 and standard
deviation ``initializer_range`` by its own generator (seeded by the seed and the tensor's
position), so a tensor's values do not depend on the shard size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lowrank.models.hf import hf_layout, write_config
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.models.loading import abstract_params
from lowrank.models.safetensors_files import write_checkpoint

PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
}
"""Architectures of published Llama checkpoints (their config.json fields)."""

DEFAULT_SHARD_BYTES = 2 * 10**9


def preset(name: str, **overrides: Any) -> LlamaConfig:
    """The ``LlamaConfig`` of preset ``name`` with fields replaced by ``overrides``.

    >>> preset("llama-3-8b").num_key_value_heads
    8
    >>> preset("llama-2-7b", num_hidden_layers=2).num_hidden_layers
    2
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; accepted: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"LlamaConfig has no field(s) {unknown}; accepted: {sorted(fields)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def write_random_llama(
    directory: str | Path,
    config: LlamaConfig,
    *,
    seed: int = 0,
    dtype: Any = jnp.bfloat16,
    max_shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    progress: bool = False,
) -> Path:
    """Writes a random-weight ``LlamaForCausalLM`` checkpoint of shape ``config``.

    Args:
      directory: created if missing; weight files already there are replaced.
      config: the architecture (see :data:`PRESETS` and :func:`preset`).
      seed: the values' seed.
      dtype: the stored dtype (bfloat16, as published Llama checkpoints).
      max_shard_bytes: shard size (about 2 GB by default, with an index); None: one file.
      progress: print a progress line every 20 tensors.

    Returns:
      ``directory``.

    >>> import tempfile
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
    ...                   num_hidden_layers=2, num_attention_heads=2)
    >>> d = write_random_llama(tempfile.mkdtemp(), cfg, max_shard_bytes=1000)
    >>> sorted(p.name for p in d.iterdir())[:2]
    ['config.json', 'model-00001-of-00005.safetensors']
    """
    directory = Path(directory)
    model = LlamaForCausalLM(config, param_dtype=dtype)
    write_config(directory, model)
    layout = {name: spec for name, (_, _, spec) in hf_layout(model, abstract_params(model)).items()}
    order = {name: i for i, name in enumerate(layout)}
    start = time.perf_counter()

    def produce(name: str) -> np.ndarray:
        spec = layout[name]
        if progress and order[name] % 20 == 0:
            print(f"  tensor {order[name] + 1}/{len(layout)}, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if _is_norm(name):
            return np.ones(spec.shape, spec.dtype)
        rng = np.random.default_rng([seed, order[name]])
        # Uniform with the standard deviation of the init: 6x faster to draw than normal.
        values = rng.random(spec.shape, dtype=np.float32)
        values -= np.float32(0.5)
        values *= np.float32(config.initializer_range * 12**0.5)
        return values.astype(spec.dtype)

    write_checkpoint(directory, layout, produce, max_shard_bytes=max_shard_bytes,
                     metadata={"format": "pt"})
    return directory


def main(argv: list[str] | None = None) -> None:
    """The command line: ``python -m lowrank.models.random_checkpoint DIR --preset NAME``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="where to write (created if missing)")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="replace a config field (JSON value), e.g. num_hidden_layers=2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1e9)
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected FIELD=VALUE")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {item!r}: {value!r} is not a JSON value")
    try:
        config = preset(args.preset, **overrides)
    except ValueError as e:
        parser.error(str(e))
    start = time.perf_counter()
    write_random_llama(args.directory, config, seed=args.seed,
                       max_shard_bytes=int(args.shard_gb * 1e9), progress=True)
    print(f"wrote {args.directory} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
