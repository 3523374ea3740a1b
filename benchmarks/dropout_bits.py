"""The dropout masks of one MiniLM training step, drawn from threefry keys vs the hash
generator (``lowrank.prng``), side by side.

A BERT step with dropout on draws one Bernoulli mask per attention-probability tensor
([batch, heads, tokens, tokens] per layer) and per hidden-state dropout (three
[batch, tokens, width] per layer). This times exactly those draws for all-MiniLM-L6-v2's shapes
(6 layers, 12 heads, width 384) at 16 x 128 tokens, jitted, the two generators alternating in
each round; it reports the median milliseconds of each and their ratio, and checks that both
keep the same fraction of entries.

    .venv/bin/python benchmarks/dropout_bits.py --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lowrank import prng

LAYERS, HEADS, WIDTH = 6, 12, 384


def shapes(batch: int, tokens: int) -> list[tuple[int, ...]]:
    """The mask shapes of one step: per layer one attention mask and three hidden ones.

    >>> len(shapes(2, 4)), shapes(2, 4)[0]
    (24, (2, 12, 4, 4))
    """
    per_layer = [(batch, HEADS, tokens, tokens)] + [(batch, tokens, WIDTH)] * 3
    return per_layer * LAYERS


def masks_fn(mask_shapes: list[tuple[int, ...]], rate: float = 0.1):
    """A jitted ``key -> kept fraction`` drawing every mask of ``mask_shapes``."""

    @jax.jit
    def draw(key):
        kept = [jnp.sum(jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate, s))
                for i, s in enumerate(mask_shapes)]
        return sum(kept) / sum(int(np.prod(s)) for s in mask_shapes)

    return draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    mask_shapes = shapes(args.batch, args.tokens)
    draw = masks_fn(mask_shapes)
    keys = {name: prng.key(0, name) for name in ("threefry", "hash")}
    kept = {name: float(draw(key)) for name, key in keys.items()}  # compiles both
    times = {name: [] for name in keys}
    for r in range(args.rounds):
        for name in (("threefry", "hash") if r % 2 == 0 else ("hash", "threefry")):
            start = time.perf_counter()
            jax.block_until_ready(draw(jax.random.fold_in(keys[name], r)))
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    print(json.dumps({
        "words": sum(int(np.prod(s)) for s in mask_shapes), "rounds": args.rounds,
        "median_ms": ms, "hash / threefry": round(ms["hash"] / ms["threefry"], 3),
        "kept": kept, "load_average": os.getloadavg(), "jax": jax.__version__,
        "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
