"""experiments/sweep.py as a real process: killed with SIGKILL in the middle it loses no
finished row, a rerun completes only what is missing, and a failing run is recorded with its
traceback while the sweep goes on."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lowrank.results import ResultsDB

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "sweep.py"

# A toy task (an MLP on Gaussian features): each run is a few seconds, mostly start-up.
TOY_CONFIG = '''
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
    # rank 0 is invalid: that run must fail, be recorded, and not stop the sweep
    return [{"lora.rank": 1}, {"lora.rank": 2}, {"lora.rank": 0}]
'''


def _rows(db_path, status=None):
    db = ResultsDB(db_path)
    try:
        return db.rows(status)
    finally:
        db.close()


def _sweep_args(config, db_path):
    return [sys.executable, str(SWEEP), f"--config={config}", f"--db={db_path}", "--seeds=1"]


def test_sweep_killed_midway_then_resumed(tmp_path):
    config = tmp_path / "toy_sweep.py"
    config.write_text(TOY_CONFIG)
    db_path = tmp_path / "results.sqlite"
    proc = subprocess.Popen(_sweep_args(config, db_path), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if db_path.exists() and _rows(db_path, "ok"):
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the run it is waiting on
        proc.wait()
    before = _rows(db_path, "ok")
    assert len(before) == 1, f"expected the kill to land after the first run, got {before}"
    assert before[0]["config.lora.rank"] == 1

    done = subprocess.run(_sweep_args(config, db_path), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # one run failed
    assert "1 run, 1 already done, 1 failed" in done.stdout
    ok = _rows(db_path, "ok")
    assert [r["config.lora.rank"] for r in ok] == [1, 2]
    assert ok[0] == before[0]  # the finished row survived the kill untouched
    assert len({r["config_hash"] for r in ok}) == 2
    failed = _rows(db_path, "failed")
    assert [r["config.lora.rank"] for r in failed] == [0]
    assert "rank must be an integer >= 1, got 0" in failed[0]["traceback"]

    again = subprocess.run(_sweep_args(config, db_path) + ["--dry_run"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    lines = [line.split()[0] for line in again.stdout.splitlines() if "{" in line]
    assert lines == ["done", "done", "todo"]  # failed runs are retried, finished ones not
