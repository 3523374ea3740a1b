"""A K=8 rank and seed QLoRA sweep on one GPU: stacked (one program) vs one run after another.

A BERT classifier with random weights (BERT-base widths, ``--layers`` layers under one
``nn.scan``) whose transformer kernels are stored in NF4 with double quantization; LoRA on
query, key, value and output (ranks 4, 8, 16, 32 times seeds 0, 1 by default), the classifier
head trained in full, compute in bfloat16, adapters and AdamW state in float32. Batches are
synthetic token ids (a function of seed and step, as a run's data must be); the loss and
metrics are real. The sequential arm calls ``lowrank.train.train`` once per run; the stacked
arm calls ``lowrank.stack.train_stacked`` once. Both train the same runs for the same steps
and evaluate on the same batches. Needs only jax, flax, optax, orbax-checkpoint, numpy,
ml_collections and lowrank (no downloads).

    python benchmarks/gpu_stacked.py --out DIR            # one H200: well under 3 minutes
    python benchmarks/gpu_stacked.py --out DIR --tiny     # a CPU check of the script

Prints a table and writes ``DIR/gpu_stacked.json``: the whole sweep's wall time per arm, the
steady-state time per step of all runs (compilation excluded), the stacked program's memory
(arguments, temporaries) for K runs and for 1, the device's peak memory, and the largest
difference between the two arms' evaluation metrics. Should compilation be slow enough to
threaten the 3 minutes, the sequential arm stops starting runs after ``--budget-s`` seconds
and its figures are extrapolated from the runs it finished (the JSON says how many).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lowrank as lr  # noqa: E402
from lowrank import models, quant, stack  # noqa: E402
from lowrank.train import (  # noqa: E402
    Task,
    default_config,
    init_state,
    make_loss_fn,
    optimizer,
    resolve_dtype,
    train,
)

LAYER = r"bert/encoder/layer"
TARGETS = LAYER + r"/attention/(self/(query|key|value)|output/dense)/kernel"
CLASSES = 5


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def build_task(args) -> Task:
    """Random-weight BERT (scanned layers), its NF4 base, synthetic batches."""
    cfg = models.BertConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            intermediate_size=4 * args.hidden, max_position_embeddings=512)
    dtype = resolve_dtype(args.dtype)
    model = models.BertForSequenceClassification(cfg, num_labels=CLASSES, pooling="mean",
                                                 scan_layers=True, dtype=dtype)
    ids = jnp.ones((1, args.seq), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    layouts = lr.discover_layouts(model, params, ids, jnp.ones_like(ids))
    frozen = params
    if args.quant != "none":
        frozen = quant.quantize_tree(params, quant.QuantSpec(
            args.quant, block_size=64, double_quant=True, targets=LAYER + r"/.*/kernel",
            stacked=LAYER + r"/.*"))

    def batch(seed: int, step: int, size: int) -> dict:
        rng = np.random.default_rng((seed, step))
        return {"input_ids": rng.integers(1, args.vocab, (size, args.seq), dtype=np.int32),
                "attention_mask": np.ones((size, args.seq), np.int32),
                "labels": rng.integers(0, CLASSES, (size,), dtype=np.int32)}

    def forward(model, frozen, trainable, batch, rng):
        return lr.apply(model, frozen, trainable, batch["input_ids"], batch["attention_mask"],
                        lora_rng=rng)

    return Task(model, frozen, lambda seed, step: batch(seed, step, args.batch),
                "classification",
                lambda: [batch(10**6, i, args.batch) for i in range(args.eval_batches)],
                forward=forward, layouts=layouts, source="random-bert")


def run_configs(args) -> list:
    configs = []
    for seed in args.seeds:
        for rank in args.ranks:
            c = default_config()
            c.steps, c.batch_size, c.seed, c.quiet = args.steps, args.batch, seed, True
            c.compute_dtype, c.param_dtype = args.dtype, "float32"
            c.lora.rank, c.lora.alpha, c.lora.targets = rank, 16.0, TARGETS
            c.lora.trainable = r"classifier/.*"
            c.optimizer.learning_rate, c.optimizer.schedule = 1e-3, "warmup_cosine"
            c.optimizer.warmup_steps, c.optimizer.clip_norm = max(args.steps // 10, 1), 1.0
            c.log.tensorboard, c.export_adapters = False, False
            configs.append(c)
    return configs


def program_memory(configs, task) -> dict:
    """Argument and temporary bytes of the compiled stacked step, for all runs and for one."""
    loss_fn = make_loss_fn(task.model, task.forward, task.loss,
                           compute_dtype=resolve_dtype(configs[0].compute_dtype))
    batch = task.train_batch(0, 0)
    state = init_state(configs[0], task)
    out = {}
    for k in sorted({1, len(configs)}):
        schedule, tx = optimizer(configs[0])
        stacked = stack.stack_states([state] * k, task.params, [tx] * k)
        step = stack.make_stacked_train_step(
            loss_fn, [stack.adamw_arguments(configs[0], schedule)] * k)
        m = jax.jit(step).lower(stacked, task.params, batch).compile().memory_analysis()
        out[k] = {"argument_bytes": int(m.argument_size_in_bytes),
                  "temp_bytes": int(m.temp_size_in_bytes),
                  "stacked_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(stacked)))}
    return out


def peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_stacked.json")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ranks", type=_ints, default=(4, 8, 16, 32))
    parser.add_argument("--seeds", type=_ints, default=(0, 1))
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--quant", default="nf4", choices=("none", *quant.FORMATS))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budget-s", type=float, default=120.0,
                        help="start no further sequential run after this many seconds "
                             "(the rest is extrapolated), so the script ends within 3 minutes")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip compiling the stacked step for K=1 and K=8 to read memory")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU-sized check: 2 layers of 64, 16 tokens, 4 steps, float32")
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.hidden, args.heads, args.vocab = 2, 64, 4, 1000
        args.seq, args.batch, args.steps, args.dtype = 16, 8, 4, "float32"
        args.ranks = tuple(r for r in args.ranks if r <= 16)
    started = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    task = build_task(args)
    configs = run_configs(args)
    report = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
              "jax": jax.__version__, "host": platform.machine(), "cpus": os.cpu_count(),
              "args": {k: v for k, v in vars(args).items()}, "runs": len(configs),
              "frozen_bytes": int(sum(x.nbytes for x in jax.tree.leaves(task.params)))}
    print(f"{len(configs)} runs of {args.steps} steps, batch {args.batch} x {args.seq} tokens, "
          f"BERT {args.layers} x {args.hidden}, base {args.quant}, compute {args.dtype}, on "
          f"{report['device']}", flush=True)

    # Stacked first, so that the device's peak after it is the stack's alone.
    t = time.perf_counter()
    stacked = stack.train_stacked(configs, task)
    stacked_wall = time.perf_counter() - t
    report["stacked_peak_bytes"] = peak_bytes()
    print(f"stacked: {stacked_wall:.1f} s", flush=True)
    t = time.perf_counter()
    alone = []
    for c in configs:
        if time.perf_counter() - started > args.budget_s and alone:
            print(f"  time budget of {args.budget_s} s spent: the sequential figures below "
                  f"are extrapolated from {len(alone)} of {len(configs)} runs", flush=True)
            break
        alone.append(train(c, task))
        print(f"  run {len(alone)}: rank {c.lora.rank} seed {c.seed}, "
              f"{time.perf_counter() - t:.1f} s so far", flush=True)
    scale = len(configs) / len(alone)  # 1 unless the budget cut the sequential arm short
    sequential_wall = (time.perf_counter() - t) * scale
    print(f"sequential: {sequential_wall:.1f} s", flush=True)

    failed = [i for i, r in enumerate(stacked) if isinstance(r, Exception)]
    if failed:
        raise SystemExit(f"stacked runs {failed} failed: {stacked[failed[0]]}")
    seq_step = scale * sum(r.loop_seconds / r.timed_steps for r in alone)
    stk_step = stacked[0].loop_seconds / stacked[0].timed_steps
    worst = max(abs(a.eval_metrics[k] - s.eval_metrics[k])
                for a, s in zip(alone, stacked, strict=False) for k in a.eval_metrics)
    report.update({
        "sequential_runs_timed": len(alone),
        "sequential_wall_s": sequential_wall, "stacked_wall_s": stacked_wall,
        "sweep_speedup": sequential_wall / stacked_wall,
        "sequential_ms_per_step_of_all_runs": 1e3 * seq_step,
        "stacked_ms_per_step_of_all_runs": 1e3 * stk_step,
        "steady_state_speedup": seq_step / stk_step,
        "max_eval_metric_difference": worst,
        "eval_accuracy": [r.eval_metrics["accuracy"] for r in stacked],
        "peak_bytes": peak_bytes(),
    })
    if not args.no_memory and time.perf_counter() - started < args.budget_s + 20:
        report["stacked_program_memory"] = program_memory(configs, task)
    report["total_s"] = time.perf_counter() - started
    (out_dir / "gpu_stacked.json").write_text(json.dumps(report, indent=2, default=str))
    print("| arm | sweep wall s | ms per step of all runs |")
    print("|---|---:|---:|")
    print(f"| sequential | {sequential_wall:.1f} | {1e3 * seq_step:.2f} |")
    print(f"| stacked | {stacked_wall:.1f} | {1e3 * stk_step:.2f} |")
    print(f"speed-up: sweep {report['sweep_speedup']:.2f}x, steady state "
          f"{report['steady_state_speedup']:.2f}x; eval metrics agree to {worst:.1e}")
    if "stacked_program_memory" in report:
        print(f"stacked program memory: {json.dumps(report['stacked_program_memory'])}")
    print(f"frozen base {report['frozen_bytes'] / 2**20:.1f} MiB; total {report['total_s']:.0f} s")


if __name__ == "__main__":
    main()
