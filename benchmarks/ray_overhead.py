"""Ray's overhead per run: the same sweep of 8 tiny runs (the toy classifier, LoRA ranks 1, 2,
4, 8 x seeds 0, 1, 3 steps each) through ``experiments/sweep.py`` with the local backend (one
``run.py`` process after another) and with ``--backend=ray`` at the same parallelism (one task
in flight, on a private one-CPU Ray started by the sweep, bound to 127.0.0.1). Each arm is the
whole command, fresh database, from start to exit: the Ray arm includes starting and stopping
Ray; the start-up alone is measured too, so the per-run overhead is given with and without it.
Rounds alternate which arm goes first; figures are medians over rounds.

    .venv/bin/python benchmarks/ray_overhead.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "sweep.py"
RUNS = 8
CONFIG = '''
from configs.common import base_config

def get_config(arg=None):
    config = base_config("lowrank.train.toy:classifier")
    config.adapt = "custom"
    config.lora.targets = r"hidden_\\d+/kernel"
    config.lora.trainable = r"head/.*"
    config.steps, config.batch_size = 3, 8
    config.lock()
    return config

def get_sweep(config):
    return [{"lora.rank": r} for r in (1, 2, 4, 8)]
'''


def _sweep(config: Path, db: Path, *extra: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(SWEEP), f"--config={config}", f"--db={db}",
                           "--seeds=2", *extra], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    seconds = time.perf_counter() - start
    if done.returncode != 0 or f"{RUNS} run, 0 already done, 0 failed" not in done.stdout:
        raise RuntimeError(f"the sweep failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return seconds


def _ray_startup() -> float:
    """Seconds to start a private one-CPU Ray (as the sweep does), run one empty task, stop."""
    code = ("import time, ray; t = time.perf_counter(); "
            "ray.init(num_cpus=1, include_dashboard=False, _node_ip_address='127.0.0.1', "
            "log_to_driver=False); ray.get(ray.remote(lambda: 0).remote()); ray.shutdown(); "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    arms = {"local": (), "ray": ("--backend=ray", "--ray_num_cpus=1", "--max_in_flight=1")}
    times: dict[str, list[float]] = {name: [] for name in arms}
    startup = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "ray_overhead.py"
        config.write_text(CONFIG)
        for r in range(args.rounds):
            order = list(arms) if r % 2 == 0 else list(arms)[::-1]
            for name in order:
                times[name].append(_sweep(config, Path(tmp) / f"{name}-{r}.sqlite",
                                          *arms[name]))
            startup.append(_ray_startup())
            print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.1f} s" for n in arms)
                  + f", ray start-up {startup[-1]:.1f} s", flush=True)
    local, ray_ = (statistics.median(times[n]) for n in arms)
    up = statistics.median(startup)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; {RUNS} runs per sweep, medians of {args.rounds} rounds")
    print("| arm | whole sweep, s | all rounds | s per run |")
    print("|---|---:|---|---:|")
    for name, median in (("local", local), ("ray", ray_)):
        rounds = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"| {name} | {median:.1f} | {rounds} | {median / RUNS:.2f} |")
    print(f"\nRay start-up + shutdown (private, 1 CPU): {up:.1f} s (median)")
    print(f"Ray / local, whole sweep: {ray_ / local:.2f}x; overhead per run "
          f"{(ray_ - local) / RUNS:+.2f} s with start-up, {(ray_ - up - local) / RUNS:+.2f} s "
          "without")


if __name__ == "__main__":
    main()
