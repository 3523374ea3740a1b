"""Size and speed of a low-rank compressed base against the dense and the quantized one.

all-MiniLM-L6-v2 (real weights), its 36 encoder kernels compressed or quantized (embeddings,
norms, biases stay float32), batch 8 x 128 tokens of BBC News (``--batch``), float32 compute,
CPU. For each base: bytes of the whole frozen tree and of the encoder kernels, parameters
stored in them, the forward time (jit, median over rounds, the variants interleaved within
each round, so the machine's load hits all alike) and its ratio to the dense forward of the
same round, and the error of the last hidden state against the dense model's (relative
Frobenius norm).

    .venv/bin/python benchmarks/compress.py --rounds 5 --reps 3 --batch 8
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import lowrank as lr
from lowrank import assets, data, models
from lowrank.compression import activation_stats, compression_summary

SEQ = 128
TARGETS = r".*encoder/layer_\d+/.*/kernel"  # the encoder layers' kernels


def bases(params, model, calib) -> dict[str, dict]:
    """The frozen trees to compare, by name."""
    out = {"dense f32": params}
    for fmt in ("int8", "nf4"):
        out[fmt] = lr.quantize_tree(params, lr.QuantSpec(fmt, targets=TARGETS))
    stats = activation_stats(model, params, calib, TARGETS)
    for budget in (0.5, 0.25):
        spec = lr.CompressSpec(targets=TARGETS, budget=budget)
        out[f"rank {budget:.0%} f32"] = lr.compress(params, spec)
        out[f"rank {budget:.0%} f32 aware"] = lr.compress(params, spec, stats=stats)
        out[f"rank {budget:.0%} nf4"] = lr.compress(params, spec, stats=stats,
                                                    quant=lr.QuantSpec("nf4"))
    return out


def kernel_bytes(tree) -> tuple[int, int]:
    """(bytes, stored parameters) of the encoder kernels."""
    flat = lr.paths.flatten(lr.paths.params_of(tree))
    picked = [flat[p] for p in lr.paths.select(list(flat), TARGETS)]
    nbytes = lr.memory_report(picked).bytes
    summary = compression_summary(tree)
    stored = sum(summary[p]["kept"] if p in summary else int(np.prod(lr.frozen.shape_of(flat[p])))
                 for p in lr.paths.select(list(flat), TARGETS))
    return nbytes, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3, help="forwards per variant per round")
    parser.add_argument("--batch", type=int, default=8, help="articles per forward")
    args = parser.parse_args()

    model, params = models.from_pretrained(assets.minilm_dir())
    tok = data.load_tokenizer(assets.minilm_dir(), max_length=SEQ)
    texts = data.load_bbc().texts
    batch = data.encode(tok, texts[:args.batch])
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    calib_batch = data.encode(tok, texts[-16:])  # other articles than the timed ones
    calib = [(calib_batch["input_ids"], calib_batch["attention_mask"],
              calib_batch["token_type_ids"])]
    trees = bases(params, model, calib)

    forward = jax.jit(lambda frozen, *x: lr.apply(model, frozen, {}, *x).last_hidden_state)
    ref = forward(params, *inputs)
    rows = {}
    for name, tree in trees.items():
        out = forward(tree, *inputs).block_until_ready()  # compiles
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        kb, stored = kernel_bytes(tree)
        rows[name] = dict(total=lr.memory_report(tree).bytes, kernels=kb, stored=stored, err=err,
                          times=[], ratios=[])

    for _ in range(args.rounds):
        this_round = {}
        for name, tree in trees.items():
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                forward(tree, *inputs).block_until_ready()
                times.append(time.perf_counter() - start)
            this_round[name] = float(np.median(times))
            rows[name]["times"] += times
        for name in trees:
            rows[name]["ratios"].append(this_round[name] / this_round["dense f32"])

    dense_kb = rows["dense f32"]["kernels"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"jax {jax.__version__} ({jax.default_backend()})")
    print(f"all-MiniLM-L6-v2, batch {args.batch} x {SEQ} tokens, float32 compute, "
          f"{args.rounds} rounds x {args.reps} reps; encoder kernels: {TARGETS}")
    print("| base | tree MiB | kernel MiB | kernel bytes / dense | kernel params stored | "
          "forward ms (median) | / dense (median of rounds) | rel. error of output |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['total'] / 2**20:.2f} | {r['kernels'] / 2**20:.2f} | "
              f"{r['kernels'] / dense_kb:.3f} | {r['stored']:,} | "
              f"{1e3 * np.median(r['times']):.1f} | {np.median(r['ratios']):.2f} | "
              f"{r['err']:.3f} |")


if __name__ == "__main__":
    main()
