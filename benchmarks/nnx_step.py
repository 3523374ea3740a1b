"""The same LoRA / QLoRA training step on the linen Llama and on its NNX twin.

Both models run the same params and adapters trees (``llama_nnx.from_linen``: same paths), so
what differs is only how ``lowrank.apply`` reaches the layers: linen's interceptor, or NNX's
clone with its adapted layers swapped. That is trace-time work; the compiled steps should be
the same program. Reported per model: the first call (trace + compile), XLA's FLOPs and
temporary bytes of the compiled step, whether its instructions (shape and opcode, names and
order aside) are the linen step's, and the step time (timed alternately, one of each per
round, medians), for a float base (LoRA) and an nf4 + double quantization base (QLoRA).

    .venv/bin/python benchmarks/nnx_step.py --rounds 10
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
from lora_vs_full import time_once

import lowrank as lr
from lowrank import models
from lowrank.models import llama_nnx


def hlo_ops(compiled) -> Counter:
    """The compiled program's instructions as a multiset of (result shape, opcode): equal for
    two programs that differ only in instruction names, order (also of a loop's carried
    values) and source metadata."""
    ops = Counter()
    for line in compiled.as_text().splitlines():
        m = re.search(r" = (.*?) ([\w\-]+)\(", line)
        if m and not line.startswith(("FileNames", "FunctionNames")):
            shape, opcode = m.groups()
            if shape.startswith("("):  # a loop's carried tuple: its elements in any order
                shape = tuple(sorted(re.sub(r"/\*index=\d+\*/", "", shape)[1:-1].split(", ")))
            ops[shape, opcode] += 1
    return ops


def make_step(model, frozen, adapters, ids):
    tx = optax.adamw(1e-4)

    def loss(a, f):
        logits = lr.apply(model, f, a, ids[:, :-1])
        return -jnp.mean(jax.nn.log_softmax(logits)[
            jnp.arange(ids.shape[0])[:, None], jnp.arange(ids.shape[1] - 1), ids[:, 1:]])

    @jax.jit
    def step(a, opt, f):
        g = jax.grad(loss)(a, f)
        u, opt = tx.update(g, opt, a)
        return optax.apply_updates(a, u), opt

    state = (adapters, tx.init(adapters))
    t0 = time.perf_counter()
    compiled = step.lower(*state, frozen).compile()
    first = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    stats = {"compile_s": first, "gflop": cost.get("flops", float("nan")) / 1e9,
             "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
             "ops": hlo_ops(compiled)}
    return (lambda s: step(*s, frozen)), state, stats


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    cfg = models.LlamaConfig(vocab_size=512, hidden_size=args.d, intermediate_size=4 * args.d,
                             num_hidden_layers=args.layers, num_attention_heads=8,
                             num_key_value_heads=4)
    linen = models.LlamaForCausalLM(cfg, scan_layers=True)
    twin = llama_nnx.from_linen(linen)
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.tokens + 1), 0, 512)
    params = linen.init(jax.random.key(1), ids[:, :-1])["params"]
    layouts = lr.discover_layouts(linen, params, ids[:, :-1])
    spec = lr.LoraSpec(rank=args.rank, targets=r"model/layers/.*_proj/kernel")
    adapters = lr.init_adapters(jax.random.key(2), params, spec, layouts=layouts)
    nf4 = lr.quantize_tree(params, lr.QuantSpec("nf4", double_quant=True, targets="model/.*"),
                           layouts=layouts)
    runs = {}
    for base_name, base in (("LoRA", params), ("QLoRA", nf4)):
        for model_name, model in (("linen", linen), ("nnx", twin)):
            runs[f"{base_name} {model_name}"] = make_step(model, base, adapters, ids)
    states = {name: state for name, (_, state, _) in runs.items()}
    times = {name: [] for name in runs}
    for i in range(args.rounds + 1):  # one round to warm up
        for name, (step, _, _) in runs.items():
            t, states[name] = time_once(step, states[name])
            if i >= 1:
                times[name].append(t)
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{jax.device_count()} x {jax.devices()[0].platform}, jax {jax.__version__}")
    print(f"model: Llama, {args.layers} scanned layers, d={args.d}, batch {args.batch} x "
          f"{args.tokens} tokens, float32, r={args.rank} on every projection, AdamW, "
          f"{args.rounds} rounds")
    for name, (_, _, stats) in runs.items():
        ref = name.replace("nnx", "linen")
        ratio = float(np.median(np.array(times[name]) / np.array(times[ref])))
        print(f"{name:12s} step median {np.median(times[name]) * 1e3:8.1f} ms  / linen "
              f"{ratio:.3f} (per-round median)  first call {stats['compile_s']:5.1f} s  "
              f"{stats['gflop']:.3f} GFLOP  temp {stats['temp_mib']:.1f} MiB  "
              f"{sum(stats['ops'].values())} HLO instructions, same as linen's: "
              f"{stats['ops'] == runs[ref][2]['ops']}")


if __name__ == "__main__":
    main()
