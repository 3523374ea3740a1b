"""The training loop's overhead vs the bare jitted step, side by side in one run.

Both run the same step (``make_train_step`` under ``jax.jit`` with a donated state) on the
same small model and the same batches (``task.train_batch(seed, step)``, built on the host in
both). The bare loop only dispatches steps and waits at the end; ``lowrank.train.train`` also
reads every step's metrics (one step late), checks the loss, writes JSONL and TensorBoard
records, draws the progress bar, and saves an orbax checkpoint every 100 steps. Compilation is
excluded from both (the first step is not timed). Rounds alternate the two so that the
machine's noise hits both alike; figures are medians over rounds.

    .venv/bin/python benchmarks/loop_overhead.py --rounds 5 --steps 500 2>/dev/null
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import jax
import ml_collections
import numpy as np

from lowrank import train as lt
from lowrank.train import toy


def make_config(args, workdir: str | None) -> ml_collections.ConfigDict:
    config = lt.default_config()
    config.steps, config.batch_size, config.quiet = args.steps, args.batch_size, False
    config.workdir = workdir
    config.checkpoint.every, config.checkpoint.keep = args.checkpoint_every, 2
    config.lora.rank, config.lora.targets = 8, r"hidden_\d+/kernel"
    config.export_adapters = False
    with config.unlocked():
        config.toy = ml_collections.ConfigDict(dict(
            width=args.width, depth=args.depth, features=args.width, examples=4096,
            eval_examples=args.batch_size,
        ))
    return config


def bare_seconds_per_step(config, task) -> float:
    schedule, tx = lt.optimizer(config)
    dtype = lt.resolve_dtype(config.compute_dtype)  # as train() computes
    loss_fn = lt.make_loss_fn(task.model, task.forward, task.loss, compute_dtype=dtype)
    step = jax.jit(lt.make_train_step(loss_fn, tx, schedule=schedule), donate_argnums=0)
    state = lt.init_state(config, task)
    state, _ = step(state, task.params, task.train_batch(config.seed, 0))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(1, config.steps):
        state, _ = step(state, task.params, task.train_batch(config.seed, i))
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / (config.steps - 1)


def loop_seconds_per_step(config, task) -> float:
    with tempfile.TemporaryDirectory() as workdir:
        config.workdir = workdir
        result = lt.train(config, task)
    return result.loop_seconds / result.timed_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    args = parser.parse_args()

    config = make_config(args, None)
    task = toy.classifier(config)
    bare, loop = [], []
    for _ in range(args.rounds):
        bare.append(bare_seconds_per_step(make_config(args, None), task))
        loop.append(loop_seconds_per_step(make_config(args, None), task))
    b, lo = float(np.median(bare)), float(np.median(loop))
    print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} "
          f"{jax.default_backend()} device(s), jax {jax.__version__}")
    print(f"model: toy MLP, {args.depth} x Dense({args.width}), LoRA r=8, batch "
          f"{args.batch_size}, {args.steps} steps, {args.rounds} rounds, checkpoint every "
          f"{args.checkpoint_every} steps, compute dtype {lt.resolve_dtype(config.compute_dtype)}")
    print("| | ms / step (median) | all rounds |")
    print("|---|---|---|")
    print(f"| bare jitted step | {1e3 * b:.3f} | {', '.join(f'{1e3 * x:.3f}' for x in bare)} |")
    print(f"| train() loop | {1e3 * lo:.3f} | {', '.join(f'{1e3 * x:.3f}' for x in loop)} |")
    print(f"overhead: {100 * (lo / b - 1):+.1f}%")


if __name__ == "__main__":
    main()
