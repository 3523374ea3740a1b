"""One training step of each adapter method relative to LoRA at the same rank.

The pre-LN transformer of ``lora_vs_full.py`` (every Dense adapted), a float32 base and an nf4
base: LoRA, DoRA (what its per-step weight norm costs), VeRA (its projections regenerated in
the step), AdaLoRA (the orthogonality penalty in the loss, and its budget transform masking
ranks every step: sensitivity averages, a sort of every rank's score), QLoRA and QDoRA. The
steps are timed
alternately (one of each per round) so the machine's noise hits them alike; medians over
rounds, each method's median divided by LoRA's (QLoRA's for the quantized pair).

    .venv/bin/python benchmarks/methods_step.py --rounds 10
    .venv/bin/python benchmarks/methods_step.py --cost   # XLA's cost analysis, no timing
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax
from lora_vs_full import Transformer, time_once

import lowrank as lr
from lowrank.adalora import orthogonality_penalty
from lowrank.adalora_budget import adalora_budget


def make_step(model, frozen, x, y, spec):
    tx = optax.adamw(1e-4)
    adapters = lr.init_adapters(jax.random.key(1), frozen, spec)
    penalty = 0.0
    if spec.method == "adalora":  # masking every step: the budget's most expensive phase
        tx = adalora_budget(tx, target_rank=max(1, spec.rank // 2), total_steps=10**6)
        penalty = 0.5

    def loss(a, f):
        mse = jnp.mean((lr.apply(model, f, a, x) - y) ** 2)
        return mse + penalty * orthogonality_penalty(a) if penalty else mse

    @jax.jit
    def step(a, opt, f):
        g = jax.grad(loss)(a, f)
        u, opt = tx.update(g, opt, a)
        return optax.apply_updates(a, u), opt

    def cost(s):
        """XLA's cost analysis of the compiled step: (GFLOP, GB accessed), noise-free."""
        analysis = step.lower(*s, frozen).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        return analysis["flops"] / 1e9, analysis["bytes accessed"] / 1e9

    run = lambda s: step(*s, frozen)  # noqa: E731
    run.cost = cost
    return run, (adapters, tx.init(adapters))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--cost", action="store_true",
                        help="print XLA's cost analysis of each step instead of timing")
    args = parser.parse_args()

    model = Transformer(args.layers, args.d)
    x = jax.random.normal(jax.random.key(0), (args.batch, args.tokens, args.d))
    y = jax.random.normal(jax.random.key(1), x.shape)
    params = model.init(jax.random.key(2), x)["params"]
    nf4 = lr.quantize_tree(params, lr.QuantSpec("nf4", double_quant=True))
    runs = {}
    for name, base, method in (("LoRA", params, "lora"), ("DoRA", params, "dora"),
                               ("VeRA", params, "vera"), ("AdaLoRA", params, "adalora"),
                               ("QLoRA", nf4, "lora"),
                               ("QDoRA", nf4, "dora")):
        spec = lr.LoraSpec(rank=args.rank, targets=".*kernel", method=method)
        runs[name] = make_step(model, base, x, y, spec)
    states = {name: state for name, (_, state) in runs.items()}
    if args.cost:
        costs = {name: step.cost(states[name]) for name, (step, _) in runs.items()}
        for name, ref in (("LoRA", "LoRA"), ("DoRA", "LoRA"), ("VeRA", "LoRA"),
                          ("AdaLoRA", "LoRA"), ("QLoRA", "LoRA"), ("QDoRA", "QLoRA")):
            (f, b), (rf, rb) = costs[name], costs[ref]
            print(f"{name:7s} {f:8.3f} GFLOP ({f / rf:.3f} x {ref}), {b:7.3f} GB accessed "
                  f"({b / rb:.3f} x {ref})")
        return
    times = {name: [] for name in runs}
    for i in range(args.rounds + 2):  # two rounds to compile and warm up
        for name, (step, _) in runs.items():
            t, states[name] = time_once(step, states[name])
            if i >= 2:
                times[name].append(t)
    med = {name: float(np.median(t)) for name, t in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{jax.device_count()} x {jax.devices()[0].platform}, jax {jax.__version__}")
    print(f"model: {args.layers} layers, d={args.d}, batch {args.batch} x {args.tokens} tokens, "
          f"float32 compute, r={args.rank} on every Dense, {args.rounds} rounds")
    for name, ref in (("LoRA", "LoRA"), ("DoRA", "LoRA"), ("VeRA", "LoRA"),
                      ("AdaLoRA", "LoRA"), ("QLoRA", "LoRA"), ("QDoRA", "QLoRA")):
        ratio = np.median(np.array(times[name]) / np.array(times[ref]))
        print(f"{name:7s} step: median {med[name] * 1e3:8.1f} ms   / {ref}: "
              f"{med[name] / med[ref]:.3f} (median of per-round ratios {ratio:.3f})")


if __name__ == "__main__":
    main()
