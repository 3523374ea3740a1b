"""Timing the same work in several worker processes, in alternation, with their peak memory.

Each framework runs in its own process (ours in lowrank's environment, the peers in the
reference one), so this module needs only the standard library and numpy. A worker builds
its step once, warms it up, then for each request ``n`` on stdin runs ``n`` timed steps and
answers with their times and the peak resident memory over them. The driver asks the workers
for repetitions in turns (the order rotating every round), so the machine's load, which
drifts, falls on every worker alike; ratios are taken per round, between neighbours in time.

    # in a worker:   serve(lambda: (run_one_step, {"framework": ...}))
    # in the driver: workers = {"ours": Worker([...]), "peer": Worker([...])}
    #                result = alternate(workers, rounds=5, reps=2)
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    """The repository's commit (with "+dirty" when lowrank/ has changes), or None.

    >>> git_commit() is None or len(git_commit()) >= 7
    True
    """
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lowrank"], cwd=REPO,
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def cpu_info() -> dict:
    """The CPU (``lscpu``'s "Model name"), its vector-ISA flags that matter to matmul kernels
    (``avx512*``, ``amx*``), and the core count: what step times depend on.

    >>> sorted(cpu_info())
    ['cpus', 'flags', 'model']
    """
    try:
        text = subprocess.run(["lscpu"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"model": fields.get("Model name", "").strip() or None, "cpus": os.cpu_count(),
            "flags": sorted(f for f in flags if f.startswith(("avx512", "amx")))}


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (``VmRSS``) or its high-water mark (``VmHWM``), bytes.

    >>> rss_bytes() > 0
    True
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def reset_peak_rss() -> None:
    """Restarts ``VmHWM`` from the current resident size (Linux ``clear_refs`` code 5), so that
    the peak of the next steps excludes what loading and compiling once took."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def serve(build: Callable[[], tuple[Callable[[], Any], dict]],
          preload: Sequence[str] = ()) -> None:
    """The worker's loop: ``build() -> (run, info)``, then time ``run`` on request.

    ``run`` performs one whole step and returns when its results are ready. The modules named
    in ``preload`` (the framework) are imported first. The first line written is ``info`` plus
    ``rss_baseline`` (resident bytes before ``build``: the interpreter and the preloaded
    modules) and ``rss_built`` (after building and two warm-up steps); then one line per
    request: ``{"times": [...], "peak_rss": bytes}``.
    """
    for name in preload:
        importlib.import_module(name)
    baseline = rss_bytes()
    run, info = build()
    for _ in range(2):  # compilation, first-touch allocations, lazy initialisation
        run()
    info = {**info, "rss_baseline": baseline, "rss_built": rss_bytes()}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        reset_peak_rss()
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        print(json.dumps({"times": times, "peak_rss": rss_bytes("VmHWM")}), flush=True)


class Worker:
    """A worker process: ``cmd`` must call :func:`serve`; the repository is on its path.

    >>> w = Worker([sys.executable, "-c", "..."])  # doctest: +SKIP
    >>> w.info["rss_baseline"], w.run(3)["times"]  # doctest: +SKIP
    """

    def __init__(self, cmd: Sequence[str], env: Mapping[str, str] | None = None):
        # stderr goes to a file, so that a worker that dies (a flag XLA rejects) can be
        # reported with its last words while the other workers carry on.
        self.cmd = list(cmd)
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, cwd=REPO)
        self.info = self._reply()

    def stderr_lines(self) -> list[str]:
        """What the worker has written to stderr so far, line by line."""
        # A new open file description: seeking the shared one would move the worker's writes.
        with open(f"/proc/self/fd/{self.stderr.fileno()}") as f:
            return f.read().splitlines()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            tail = "\n".join(self.stderr_lines()[-15:])
            raise RuntimeError(f"worker {' '.join(self.cmd)} exited with code {code} before "
                               f"answering; its stderr ends:\n{tail}")
        return json.loads(line)

    def run(self, n: int) -> dict:
        """Times ``n`` steps: ``{"times": [...], "peak_rss": bytes}``."""
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
        self.proc.wait()
        self.stderr.close()


def alternate(workers: Mapping[str, Worker], rounds: int, reps: int) -> dict[str, dict]:
    """``reps`` steps of each worker per round, in an order that rotates every round.

    Returns per worker: ``times`` (all steps), ``round_medians`` (one per round, in round
    order, so that two workers' lists pair up by round) and ``peak_rss`` (the largest over
    all rounds).
    """
    names = list(workers)
    out = {k: {"times": [], "round_medians": [], "peak_rss": 0} for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        if r % 2:
            order = order[::-1]
        for k in order:
            reply = workers[k].run(reps)
            out[k]["times"] += reply["times"]
            out[k]["round_medians"].append(float(np.median(reply["times"])))
            out[k]["peak_rss"] = max(out[k]["peak_rss"], reply["peak_rss"])
    return out


def paired_ratio(num: dict, den: dict) -> float:
    """Median over rounds of ``num``'s round median / ``den``'s (robust to load drift).

    >>> paired_ratio({"round_medians": [1.0, 2.0, 3.0]}, {"round_medians": [2.0, 2.0, 2.0]})
    1.0
    """
    return float(np.median(np.divide(num["round_medians"], den["round_medians"])))
