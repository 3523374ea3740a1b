"""One training step of full fine-tuning vs LoRA (r=8 on every Dense), side by side.

A 4-layer, d=512 pre-LN transformer, batch 8 x 256 tokens, float32, on this machine's CPU.
The two steps are timed alternately (one of each per round) so that the machine's noise
hits both alike; the figures are medians over rounds.

    .venv/bin/python benchmarks/lora_vs_full.py --rounds 15
"""

from __future__ import annotations

import argparse
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank as lr


class Block(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        h = nn.LayerNorm(name="ln1")(x)
        split = lambda y: y.reshape(b, t, self.heads, -1)  # noqa: E731
        q, k, v = (split(nn.Dense(self.d, name=n)(h)) for n in ("query", "key", "value"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.d // self.heads)
        mask = jnp.tril(jnp.ones((t, t), bool))
        att = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, self.d)
        x = x + nn.Dense(self.d, name="out")(y)
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(self.d, name="down")(nn.gelu(nn.Dense(4 * self.d, name="up")(h)))


class Transformer(nn.Module):
    layers: int = 4
    d: int = 512
    heads: int = 8

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = Block(self.d, self.heads, name=f"layer_{i}")(x)
        return nn.LayerNorm(name="ln_f")(x)


def make_steps(model, params, x, y, rank):
    tx = optax.adamw(1e-4)

    def full_loss(p):
        return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    @jax.jit
    def full_step(p, opt):
        g = jax.grad(full_loss)(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt

    spec = lr.LoraSpec(rank=rank, targets=".*kernel")
    adapters = lr.init_adapters(jax.random.key(1), params, spec)

    def lora_loss(a, frozen):
        return jnp.mean((lr.apply(model, frozen, a, x) - y) ** 2)

    @jax.jit
    def lora_step(a, opt, frozen):
        g = jax.grad(lora_loss)(a, frozen)
        u, opt = tx.update(g, opt, a)
        return optax.apply_updates(a, u), opt

    return (
        lambda s: full_step(*s),
        (params, tx.init(params)),
        lambda s: lora_step(*s, params),
        (adapters, tx.init(adapters)),
    )


def time_once(step, state):
    t0 = time.perf_counter()
    state = step(state)
    jax.block_until_ready(state)
    return time.perf_counter() - t0, state


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    model = Transformer(args.layers, args.d)
    key = jax.random.key(0)
    x = jax.random.normal(key, (args.batch, args.tokens, args.d))
    y = jax.random.normal(jax.random.key(1), x.shape)
    params = model.init(jax.random.key(2), x)["params"]
    full_step, full_state, lora_step, lora_state = make_steps(model, params, x, y, args.rank)
    for _ in range(2):  # compile and warm up
        _, full_state = time_once(full_step, full_state)
        _, lora_state = time_once(lora_step, lora_state)
    full_t, lora_t = [], []
    for _ in range(args.rounds):
        t, full_state = time_once(full_step, full_state)
        full_t.append(t)
        t, lora_state = time_once(lora_step, lora_state)
        lora_t.append(t)
    full_med, lora_med = float(np.median(full_t)), float(np.median(lora_t))
    ratios = np.array(lora_t) / np.array(full_t)
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{jax.device_count()} x {jax.devices()[0].platform}, jax {jax.__version__}")
    print(f"model: {args.layers} layers, d={args.d}, batch {args.batch} x {args.tokens} tokens, "
          f"float32, LoRA r={args.rank} on every Dense, {args.rounds} rounds")
    print(f"full fine-tuning step: median {full_med * 1e3:.1f} ms")
    print(f"LoRA step:             median {lora_med * 1e3:.1f} ms")
    print(f"LoRA / full: {lora_med / full_med:.3f} (median of per-round ratios "
          f"{float(np.median(ratios)):.3f})")


if __name__ == "__main__":
    main()
