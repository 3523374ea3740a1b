"""Faults, part two: a training run, a sweep and a database writer killed with SIGKILL at
random moments. Invariants on every trial: a resumed run's adapters equal an uninterrupted
run's bit for bit, its log reads as one run's, and no finished row is lost or doubled. The
fast tier runs a few seeds; ``-m slow`` runs many.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import test_faults
from test_faults import ROOT, STEPS, TASK, same_leaves, train_config

from lowrank import results
from lowrank import train as lt

uninterrupted = test_faults.uninterrupted  # the module-scoped fixture, shared

WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("results", sys.argv[1])
results = importlib.util.module_from_spec(spec); spec.loader.exec_module(results)
db = results.ResultsDB(sys.argv[2])
for i in range(10**6):
    db.write({"i": i, "seed": 0}, {"x": float(i)}, experiment="kill")
    print(i, flush=True)
"""


@pytest.mark.parametrize("seed", [*range(3), *(pytest.param(s, marks=pytest.mark.slow)
                                               for s in range(3, 40))])
def test_a_database_writer_killed_at_random_loses_and_doubles_no_row(tmp_path, seed):
    path = tmp_path / "r.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT / "lowrank/results.py"),
                             str(path)], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3 + np.random.default_rng(seed).uniform(0, 1.0))
    proc.send_signal(signal.SIGKILL)
    reported = [int(line) for line in proc.communicate()[0].split()]
    rows = [int(r["config.i"]) for r in results.ResultsDB(path).rows()]
    assert rows[:len(reported)] == reported and rows == list(range(len(rows)))
    assert len(rows) - len(reported) <= 1  # at most the row committed as it was killed
    print(f"fault: database writer killed after {len(rows)} rows, none lost or doubled")


# ---- a training run killed at a random moment ---------------------------------------------

KILLED = """
import dataclasses, sys, time
sys.path.insert(0, sys.argv[2])
from test_faults import TASK, train_config
from lowrank import train as lt

def slow_batch(seed, step):  # slow enough to be killed in the middle
    time.sleep(0.1)
    return TASK.train_batch(seed, step)

lt.train(train_config(sys.argv[1]), dataclasses.replace(TASK, train_batch=slow_batch))
"""


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow)
                                       for s in range(1, 20))])
def test_a_run_killed_at_a_random_moment_resumes_bit_identical(seed, uninterrupted, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path), str(ROOT / "tests")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # The kill lands in the training (after start-up and compilation): from the first
    # checkpoint (step 4) on, within the next 20 steps of >= 0.1 s, or just after the end.
    started = time.monotonic() + 300
    while not (tmp_path / "checkpoints" / "4").exists() and time.monotonic() < started:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    delay = np.random.default_rng(seed).uniform(0.0, 2.5)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    err = proc.communicate()[1]
    assert proc.returncode in (0, -signal.SIGKILL), err
    resumed = lt.train(train_config(tmp_path), TASK)
    assert same_leaves(resumed.trainable, uninterrupted)
    steps = [r["step"] for r in lt.read_jsonl(tmp_path) if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1))  # the log reads as one run's
    print(f"fault: training run killed {delay:.1f} s after its first checkpoint: resumed from step "
          f"{resumed.start_step}, bit-identical")


def test_a_log_left_by_a_run_killed_before_its_first_checkpoint_is_restarted(tmp_path):
    with lt.MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss": 1.0}, prefix="train/")
    lt.MetricsWriter(tmp_path, start_step=0, tensorboard=False).close()
    assert lt.read_jsonl(tmp_path) == []


# ---- a sweep killed at a random moment ---------------------------------------------------

SWEEP_CONFIG = """
from configs.common import base_config

def get_config(arg=None):
    config = base_config("lowrank.train.toy:classifier")
    config.adapt, config.lora.targets = "custom", r"hidden_\\d+/kernel"
    config.lora.trainable, config.steps, config.batch_size = r"head/.*", 20, 8
    config.lock()
    return config

def get_sweep(config):
    return [{"lora.rank": 1}, {"lora.rank": 2}, {"lora.rank": 4}]
"""


def _sweep(tmp_path, name):
    config = tmp_path / "toy_sweep.py"
    config.write_text(SWEEP_CONFIG)
    return [sys.executable, str(ROOT / "experiments" / "sweep.py"), f"--config={config}",
            f"--db={tmp_path / name}.sqlite", f"--workdir={tmp_path / name}", "--seeds=1"]


def _finished(db_path):
    return {r["config_hash"]: r for r in results.ResultsDB(db_path).rows("ok")}


@pytest.fixture(scope="module")
def sweep_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    subprocess.run(_sweep(tmp, "reference"), cwd=ROOT, check=True, capture_output=True)
    return _finished(tmp / "reference.sqlite")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_a_sweep_killed_at_a_random_moment_loses_and_doubles_nothing(
        seed, sweep_reference, tmp_path):
    args = _sweep(tmp_path, "killed")
    proc = subprocess.Popen(args, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    delay = np.random.default_rng(seed).uniform(2.0, 30.0)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the run it waits on
    proc.wait()
    before = _finished(tmp_path / "killed.sqlite") if (tmp_path / "killed.sqlite").exists() \
        else {}
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
    after = _finished(tmp_path / "killed.sqlite")
    assert all(after[h] == row for h, row in before.items())  # nothing lost or rewritten
    assert len(results.ResultsDB(tmp_path / "killed.sqlite").rows("ok")) == 3  # none doubled
    assert after.keys() == sweep_reference.keys()
    for h, row in after.items():  # resumed runs computed what the uninterrupted ones did
        for name in ("metric.accuracy", "metric.train_loss", "metric.loss"):
            assert row[name] == sweep_reference[h][name], (h, name)
    print(f"fault: sweep killed at {delay:.1f} s with {len(before)} of 3 rows written: "
          "completed, none lost or doubled")
