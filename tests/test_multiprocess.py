"""One training run over 2 processes x 2 CPU devices on the loopback (jax.distributed, gloo
collectives), a (data, fsdp) = (2, 2) mesh over all four devices: it trains what 1 process x
4 devices trains, within 1e-5; killed after a checkpoint, a rerun resumes and ends bit-identical
to the uninterrupted run (slow tier: ``pytest -m slow tests/test_multiprocess.py``); processes
given different counts fail with an error saying so."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multiprocess_train.py"
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PARK_AT_STEP")}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
               PYTHONPATH=str(ROOT), **extra)
    return env


def _start_two(out, workdir, steps=STEPS, counts=(2, 2), **extra):
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(WORKER), str(out), str(workdir), str(steps),
                              str(i), str(counts[i]), str(port)],
                             env=_env(2, **extra), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def _two_processes(out, workdir, steps=STEPS, counts=(2, 2), timeout=300, **extra):
    procs = _start_two(out, workdir, steps, counts, **extra)
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outputs


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 2-process run (with checkpoints) and the 1-process, 4-device run, STEPS steps each."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    single = subprocess.Popen([sys.executable, str(WORKER), str(tmp / "single.npz"), "-",
                               str(STEPS)], env=_env(4), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    codes, outputs = _two_processes(tmp / "two.npz", tmp / "two")
    single_out = single.communicate(timeout=300)[0]
    assert codes == [0, 0], outputs
    assert single.returncode == 0, single_out
    return _load(tmp / "two.npz"), _load(tmp / "single.npz"), tmp, outputs, single_out


def test_two_processes_train_as_one_with_four_devices(uninterrupted):
    two, single, tmp, _, _ = uninterrupted
    assert sorted(two) == sorted(single) and int(two["step"]) == STEPS
    for name in single:
        np.testing.assert_allclose(two[name], single[name], atol=1e-5, err_msg=name)
    # One process wrote the metrics and the export; both wrote the checkpoints.
    lines = (tmp / "two" / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if "train/loss" in line]) == STEPS
    assert sorted(p.name for p in (tmp / "two" / "checkpoints").iterdir()) == ["2", "4"]


def test_each_process_loads_only_its_rows_of_every_batch(uninterrupted):
    """Batch 16 over 4 devices, 2 per process: process 0 asks the task for rows 0:8 of every
    batch, process 1 for 8:16 (Task.train_rows); one process builds whole batches."""
    *_, outputs, single_out = uninterrupted
    asked = [next(line for line in out.splitlines() if line.startswith("ROWS "))
             for out in outputs]
    assert sorted(asked) == ["ROWS 0 [(0, 8)]", "ROWS 1 [(8, 16)]"]
    assert "ROWS 0 []" in single_out


@pytest.mark.slow  # ~60 s on 2 loaded cores: pytest -m slow tests/test_multiprocess.py
def test_killed_after_a_checkpoint_resumes_bit_identically(uninterrupted, tmp_path):
    two = uninterrupted[0]
    procs = _start_two(tmp_path / "x.npz", tmp_path / "run", PARK_AT_STEP="3")
    try:
        for p in procs:  # both wait at step 3, after checkpoint 2 is on disk
            for line in p.stdout:
                if line.strip() == "PARKED":
                    break
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    assert [p.returncode for p in procs] == [-9, -9]
    assert not (tmp_path / "x.npz").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]

    codes, outputs = _two_processes(tmp_path / "resumed.npz", tmp_path / "run")
    assert codes == [0, 0], outputs
    resumed = _load(tmp_path / "resumed.npz")
    assert int(resumed["start_step"]) == 2
    for name in two:
        if name != "start_step":
            np.testing.assert_array_equal(resumed[name], two[name], err_msg=name)


def test_mismatched_process_counts_fail_fast(tmp_path):
    # Both processes exit (a hang in the first step would hit communicate's timeout) with the
    # count check's message, not the connection timeout's (distributed._failed).
    # No wall-clock bound: CI's 2 loaded cores made a 100 s one flaky.
    codes, outputs = _two_processes(tmp_path / "x.npz", "-", counts=(2, 3), timeout=300,
                                    TIMEOUT_S="20")
    assert codes[0] != 0 and codes[1] != 0, outputs
    for output in outputs:
        assert "must be started with the same coordinator_address" not in output, output[-3000:]
        assert ("config.distributed.num_processes differs between the processes: process i "
                "was given [2, 3]") in output, output[-3000:]
