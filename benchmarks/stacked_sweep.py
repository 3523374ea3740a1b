"""A K=8 rank and seed sweep, stacked (one program) vs one run after another, in one process.

The sweep is the tiny BBC config (``configs/finetune_bbc.py:tiny``: a 2-layer, d=32 random
BERT classifying BBC News, LoRA on query and value, head trained in full) at ranks 1, 2, 4, 8
times seeds 0, 1. The sequential arm calls ``lowrank.train.train`` once per run (each
compiles its own step, as a run does); the stacked arm calls
``lowrank.stack.train_stacked`` once for all 8. Both train the same 8 runs for the same steps
on the same task object (data and model built once, outside the timing), then evaluate. Rounds
alternate which arm goes first, so the machine's noise hits both alike; figures are medians.

Reported: the whole sweep's wall time (initialisation, compilation, steps, evaluation), and
the steady-state training time (steps after the first, compilation excluded) per step of all
8 runs. The two arms' final evaluation metrics are compared run by run.

    .venv/bin/python benchmarks/stacked_sweep.py --rounds 3 --steps 30 2>/dev/null
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # configs name their tasks as "configs.tasks:..."
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import tasks  # noqa: E402
from configs.finetune_bbc import get_config  # noqa: E402
from lowrank import results, stack  # noqa: E402
from lowrank.train import train  # noqa: E402

RANKS, SEEDS = (1, 2, 4, 8), (0, 1)


def sweep_configs(steps: int) -> list:
    """The 8 resolved run configs (ranks x seeds) of the tiny BBC config."""
    base = get_config("tiny")
    configs = []
    for seed in SEEDS:
        for rank in RANKS:
            config = results.apply_overrides(base, {"lora.rank": rank, "seed": seed,
                                                    "steps": steps})
            configs.append(tasks.training_config(config))
    return configs


def sequential(configs, task) -> tuple[float, float, list]:
    start = time.perf_counter()
    runs = [train(c, task) for c in configs]
    wall = time.perf_counter() - start
    loop = sum(r.loop_seconds / r.timed_steps for r in runs)  # per step of all runs
    return wall, loop, [r.eval_metrics for r in runs]


def stacked(configs, task) -> tuple[float, float, list]:
    start = time.perf_counter()
    runs = stack.train_stacked(configs, task)
    wall = time.perf_counter() - start
    return wall, runs[0].loop_seconds / runs[0].timed_steps, [r.eval_metrics for r in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30,
                        help="steps of every run (the tiny config itself has 3)")
    args = parser.parse_args()

    configs = sweep_configs(args.steps)
    assert stack.group_compatible(configs) == [list(range(len(configs)))]
    task, _ = tasks.build(configs[0])
    arms = {"sequential": sequential, "stacked": stacked}
    walls = {name: [] for name in arms}
    loops = {name: [] for name in arms}
    evals = {}
    for r in range(args.rounds):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]
        for name in order:
            wall, loop, evals[name] = arms[name](configs, task)
            walls[name].append(wall)
            loops[name].append(loop)
            print(f"round {r} {name}: {wall:.2f} s, {1e3 * loop:.2f} ms per step of all "
                  "runs", flush=True)
    worst = max(abs(a[k] - b[k]) for a, b in zip(evals["sequential"], evals["stacked"],
                                                 strict=True) for k in a)
    med = {name: (float(np.median(walls[name])), float(np.median(loops[name])))
           for name in arms}
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f}; {jax.device_count()} {jax.default_backend()} device(s), "
          f"jax {jax.__version__}")
    print(f"sweep: tiny BBC, ranks {RANKS} x seeds {SEEDS} = {len(configs)} runs, "
          f"{args.steps} steps of {configs[0].batch_size} each, {args.rounds} rounds")
    print("| arm | sweep wall s (median) | all rounds | ms per step of all 8 runs (median) |")
    print("|---|---:|---|---:|")
    for name in arms:
        print(f"| {name} | {med[name][0]:.2f} | "
              f"{', '.join(f'{w:.2f}' for w in walls[name])} | {1e3 * med[name][1]:.2f} |")
    print(f"speed-up, whole sweep: {med['sequential'][0] / med['stacked'][0]:.2f}x; "
          f"steady-state steps: {med['sequential'][1] / med['stacked'][1]:.2f}x")
    print(f"largest difference between the arms' eval metrics: {worst:.2e}")


if __name__ == "__main__":
    main()
