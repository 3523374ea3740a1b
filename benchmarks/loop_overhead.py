"""The training loop's overhead vs the bare jitted step, side by side in one run.

Both run the same step (``make_train_step`` under ``jax.jit`` with a donated state, in the
compute dtype ``train`` uses) on the same small model and the same batches
(``task.train_batch(seed, step)``, built on the host in both). The bare loop only dispatches
steps and waits at the end; ``lowrank.train.train`` also reads every step's metrics, checks
the loss, writes JSONL and TensorBoard records, draws the progress bar, and saves an orbax
checkpoint every 100 steps. Compilation is excluded from both (the first step is not timed);
so is the checkpoint after the last step. Rounds alternate the two so that the machine's
noise hits both alike; figures are medians over rounds, of wall time and of the process's
CPU time (all threads), per step.

    .venv/bin/python benchmarks/loop_overhead.py --rounds 7 --steps 500 2>/dev/null
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


def make_config(args) -> ml_collections.ConfigDict:
    config = lt.default_config()
    config.steps, config.batch_size, config.quiet = args.steps, args.batch_size, False
    config.checkpoint.every, config.checkpoint.keep = args.checkpoint_every, 2
    config.lora.rank, config.lora.targets = 8, r"hidden_\d+/kernel"
    config.export_adapters = False
    with config.unlocked():
        config.toy = ml_collections.ConfigDict(dict(
            width=args.width, depth=args.depth, features=args.width, examples=4096,
            eval_examples=args.batch_size,
        ))
    return config


def bare(config, task) -> tuple[float, float]:
    """(wall, CPU) seconds per step of the bare jitted step."""
    schedule, tx = lt.optimizer(config)
    dtype = lt.resolve_dtype(config.compute_dtype)  # as train() computes
    loss_fn = lt.make_loss_fn(task.model, task.forward, task.loss, compute_dtype=dtype)
    step = jax.jit(lt.make_train_step(loss_fn, tx, schedule=schedule), donate_argnums=0)
    state = lt.init_state(config, task)
    state, _ = step(state, task.params, task.train_batch(config.seed, 0))
    jax.block_until_ready(state)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(1, config.steps):
        state, _ = step(state, task.params, task.train_batch(config.seed, i))
    jax.block_until_ready(state)
    n = config.steps - 1
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def loop(config, task) -> tuple[float, float]:
    """(wall, CPU) seconds per step of ``train``."""
    with tempfile.TemporaryDirectory() as workdir:
        config.workdir = workdir
        result = lt.train(config, task)
    return result.loop_seconds / result.timed_steps, result.loop_cpu_seconds / result.timed_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    args = parser.parse_args()

    config = make_config(args)
    task = toy.classifier(config)
    runs = {"bare jitted step": [], "train() loop": []}
    for _ in range(args.rounds):
        runs["bare jitted step"].append(bare(make_config(args), task))
        runs["train() loop"].append(loop(make_config(args), task))
    print(f"machine: {platform.machine()}, {jax.device_count()} {jax.default_backend()} "
          f"device(s), jax {jax.__version__}")
    print(f"model: toy MLP, {args.depth} x Dense({args.width}), LoRA r=8, batch "
          f"{args.batch_size}, {args.steps} steps, {args.rounds} rounds, checkpoint every "
          f"{args.checkpoint_every} steps, compute dtype {lt.resolve_dtype(config.compute_dtype)}")
    print("| | wall ms / step (median) | CPU ms / step (median) | wall, all rounds |")
    print("|---|---|---|---|")
    medians = {}
    for name, values in runs.items():
        wall, cpu = (float(np.median([v[i] for v in values])) for i in (0, 1))
        medians[name] = wall, cpu
        rounds = ", ".join(f"{1e3 * v[0]:.2f}" for v in values)
        print(f"| {name} | {1e3 * wall:.3f} | {1e3 * cpu:.3f} | {rounds} |")
    (bw, bc), (lw, lc) = medians.values()
    print(f"overhead: wall {100 * (lw / bw - 1):+.1f}%, CPU {100 * (lc / bc - 1):+.1f}%")


if __name__ == "__main__":
    main()
