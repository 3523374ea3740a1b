"""experiments/sweep.py --backend=ray on a real two-node Ray cluster on the loopback (Ray's
own ``cluster_utils.Cluster``: a head and one more node, each its own raylet): its rows equal
the local backend's, a killed driver is resumed by a rerun that writes only the missing rows,
a killed worker is retried and its run written once, and bad input fails fast.

Slow tier (``pytest -m slow tests/test_sweep_ray.py``): the killed worker."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Read when Ray is imported: no usage report, and 127.0.0.1 kept as given (Ray would rewrite
# it to the machine's outward address, where a loopback cluster does not listen).
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from lowrank.results import ResultsDB  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "sweep.py"

TOY_CONFIG = '''
from configs.common import base_config

def get_config(arg=None):
    config = base_config("lowrank.train.toy:classifier")
    config.adapt = "custom"
    config.lora.targets = r"hidden_\\d+/kernel"
    config.lora.trainable = r"head/.*"
    config.steps, config.batch_size = STEPS, 8
    config.lock()
    return config

def get_sweep(config):
    return [{"lora.rank": 1}, {"lora.rank": 2}]
'''
METRICS = ("metric.accuracy", "metric.loss", "metric.train_loss", "trainable_params")


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node on 127.0.0.1, one CPU each, no dashboard."""
    node = dict(num_cpus=1, node_ip_address="127.0.0.1")
    c = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **node))
    c.add_node(**node)
    yield c
    c.shutdown()


def _config(tmp_path, steps=3):
    path = tmp_path / "toy_sweep.py"
    path.write_text(TOY_CONFIG.replace("STEPS", str(steps)))
    return path


def _args(config, db, *extra):
    return [sys.executable, str(SWEEP), f"--config={config}", f"--db={db}", "--seeds=2", *extra]


def _rows(db_path, status="ok"):
    db = ResultsDB(db_path)
    try:
        return db.rows(status)
    finally:
        db.close()


def _by_run(rows):
    return {(r["config.lora.rank"], r["seed"]): r for r in rows}


def test_ray_rows_equal_local_and_a_killed_driver_resumes(cluster, tmp_path):
    config = _config(tmp_path)
    ray_db, local_db = tmp_path / "ray.sqlite", tmp_path / "local.sqlite"
    # --artifacts relative to the driver's directory: the workers get it made absolute.
    ray_args = _args(config, ray_db, "--backend=ray", f"--address={cluster.address}",
                     "--artifacts=art")
    proc = subprocess.Popen(ray_args, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if ray_db.exists() and _rows(ray_db):
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver; Ray ends its job's tasks
        proc.wait()
    before = _rows(ray_db)
    assert 1 <= len(before) < 4, f"the kill should land mid-sweep, got {len(before)} rows"

    done = subprocess.run(ray_args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{4 - len(before)} run, {len(before)} already done, 0 failed" in done.stdout
    after = _rows(ray_db)
    assert len(after) == 4 and len({(r["config_hash"]) for r in after}) == 4
    assert after[:len(before)] == before  # the rows written before the kill, untouched
    assert not _rows(ray_db, "failed")
    runs = tmp_path / "art" / "toy_sweep"  # each run's checkpoints, by its config hash
    assert sorted(p.name for p in runs.iterdir()) == sorted(r["config_hash"] for r in after)
    assert all(any((p / "checkpoints").iterdir()) for p in runs.iterdir())

    local = subprocess.run(_args(config, local_db), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    ray_runs, local_runs = _by_run(after), _by_run(_rows(local_db))
    assert sorted(ray_runs) == sorted(local_runs) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for run, row in ray_runs.items():
        assert row["config_hash"] == local_runs[run]["config_hash"]
        for column in METRICS:
            assert row[column] == pytest.approx(local_runs[run][column], abs=1e-5), (run, column)


def _task_pids() -> list[int]:
    """Ray worker processes running a sweep task now (Ray titles them ``ray::run_group``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::run_group"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_its_run_written_once(cluster, tmp_path):
    config = _config(tmp_path, steps=200)
    db = tmp_path / "ray.sqlite"
    proc = subprocess.Popen(_args(config, db, "--backend=ray", f"--address={cluster.address}",
                                  "--max_retries=2"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.time() + 240
    while killed is None and time.time() < deadline and proc.poll() is None:
        pids = _task_pids()
        if pids:
            time.sleep(1.0)  # into the run: importing, compiling or training
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.1)
    out, err = proc.communicate(timeout=400)
    assert killed is not None, "no task was seen running"
    assert proc.returncode == 0, err[-3000:]
    assert "4 run, 0 already done, 0 failed" in out
    rows = _rows(db)
    assert len(rows) == 4 and len({r["config_hash"] for r in rows}) == 4
    assert not _rows(db, "failed")


def test_unreachable_address_fails_fast(tmp_path):
    # "Fast": within subprocess.run's timeout (Ray itself retries a missing head for minutes).
    done = subprocess.run(_args(_config(tmp_path), tmp_path / "r.sqlite", "--backend=ray",
                                "--address=127.0.0.1:1"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "cannot reach a Ray cluster at 127.0.0.1:1" in done.stderr
    assert "ray start --head" in done.stderr
    assert not _rows(tmp_path / "r.sqlite", None)


def test_workers_without_the_project_are_named(cluster):
    sys.path.insert(0, str(ROOT))
    from experiments import sweep_ray

    sweep_ray.connect(cluster.address)
    try:
        sweep_ray.check_workers()  # the project imports on both nodes
        with pytest.raises(sweep_ray.RayBackendError) as e:
            sweep_ray.check_workers(("lowrank", "lowrank_not_installed_here"))
    finally:
        sweep_ray.shutdown()
    message = str(e.value)
    assert message.count("No module named 'lowrank_not_installed_here'") == 2  # both nodes
    assert "pip install -e '.[ray]'" in message
