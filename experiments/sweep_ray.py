"""The Ray backend of ``experiments/sweep.py --backend=ray``: each pending run (or ``--batch``
stack) becomes a Ray task; the driver alone writes the results database.

The driver computes the pending runs exactly as the local backend does, submits at most
``max_in_flight`` tasks at a time, each declaring its CPUs and GPUs and retried
``max_retries`` times when its worker or node dies, and writes each returned row as it
arrives. A task trains in a fresh worker process (``max_calls=1``, as the local backend's
``run.py`` process), returns its rows' fields and metrics (a run that raises returns its
traceback: recorded as "failed", not retried), and writes checkpoints and other large files
only under ``workdir``, which must be a path every node sees. A rerun skips what finished; a
retried task resumes from its checkpoints there.

Nothing here is imported unless ``--backend=ray`` is given; Ray is the optional extra
``pip install -e '.[ray]'``.

Security: a Ray cluster runs whatever anyone who reaches its ports sends it, without
authentication. A cluster this module starts binds to 127.0.0.1; one given by ``--address``
must be kept on a private network.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a worker imports to train: the project, installed (or at the same path) on every node.
PROJECT_MODULES = ("lowrank", "configs.tasks", "experiments.run", "experiments.sweep_ray")
CONNECT_TIMEOUT_S = 5.0


class RayBackendError(RuntimeError):
    """The Ray cluster cannot be used (unreachable, or workers without the project); the
    message says what to fix."""


def parse_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of a ``HOST:PORT`` Ray address.

    >>> parse_address("127.0.0.1:6379")
    ('127.0.0.1', 6379)
    >>> try:
    ...     parse_address("head")
    ... except RayBackendError as e:
    ...     print(e)
    --address 'head' is not HOST:PORT (such as 127.0.0.1:6379, the head's GCS port) or 'auto'
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayBackendError(f"--address {address!r} is not HOST:PORT (such as "
                              "127.0.0.1:6379, the head's GCS port) or 'auto'")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface.

    >>> is_loopback("localhost"), is_loopback("127.0.0.1"), is_loopback("10.0.0.2")
    (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auto_address() -> str:
    """The address ``ray.init(address="auto")`` would use: RAY_ADDRESS, else the cluster that
    ``ray start`` last recorded on this machine."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    import tempfile

    recorded = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if recorded.is_file() and recorded.read_text().strip():
        return recorded.read_text().strip()
    raise RayBackendError(
        "--address=auto found no running Ray cluster (no RAY_ADDRESS, nothing recorded by "
        "`ray start` on this machine): start one with `ray start --head "
        "--node-ip-address=127.0.0.1 --port=6379`, or pass --address=HOST:PORT")


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raises ``RayBackendError`` unless a TCP connection to ``address`` opens within
    ``timeout`` seconds (Ray itself retries an unreachable head for minutes).

    >>> try:
    ...     check_reachable("127.0.0.1:1", timeout=1.0)
    ... except RayBackendError as e:
    ...     print(str(e)[:41])
    cannot reach a Ray cluster at 127.0.0.1:1
    """
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise RayBackendError(
            f"cannot reach a Ray cluster at {address} ({type(e).__name__}: {e}): start its "
            "head there (`ray start --head --node-ip-address=HOST --port=PORT`), or fix "
            "--address (HOST:PORT of the head's GCS port; 'auto' for the cluster `ray start` "
            "made on this machine)") from None


def connect(address: str | None, *, num_cpus: int | None = None) -> None:
    """Connects this process to the Ray cluster at ``address`` (HOST:PORT or "auto"), or
    starts a private one on this machine bound to 127.0.0.1 (``address`` None).

    Raises:
      RayBackendError: the address is malformed or unreachable (within seconds).
    """
    if address is not None:
        address = _auto_address() if address == "auto" else address
        check_reachable(address)
        if is_loopback(parse_address(address)[0]):
            # Ray rewrites a loopback address to the machine's outward one, which a cluster
            # bound to the loopback does not listen on; this flag keeps the loopback.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    # code_search_path: workers import the project from where this driver has it (and the
    # task functions by name), instead of unpickling code the driver sends.
    job = ray.job_config.JobConfig(code_search_path=[str(ROOT)])
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 job_config=job, log_to_driver=False)
    else:
        ray.init(address=address, job_config=job, log_to_driver=False)


def probe(modules: Sequence[str]) -> tuple[str, str | None]:
    """Runs on a worker: ``(node address, None)`` when every module of ``modules`` imports,
    else ``(node address, the first error)``.

    >>> probe(["json", "no_such_module_here"])[1]
    "ModuleNotFoundError: No module named 'no_such_module_here'"
    """
    host = socket.gethostname()
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # any failure to import is what the driver must report
            return host, f"{type(e).__name__}: {e}"
    return host, None


def check_workers(modules: Sequence[str] = PROJECT_MODULES, timeout: float = 120.0) -> None:
    """Raises ``RayBackendError`` naming each node whose workers cannot import ``modules``
    (one probe task pinned to every alive node), with what to install.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    task = ray.remote(num_cpus=0, max_retries=0)(probe)
    refs = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")": task.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
    ).remote(list(modules)) for n in nodes}
    problems = []
    for node, ref in refs.items():
        try:
            _, error = ray.get(ref, timeout=timeout)
        except Exception as e:  # the probe itself could not be loaded or run there
            error = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        if error:
            problems.append(f"node {node}: {error}")
    if problems:
        raise RayBackendError(
            "workers cannot import the project on " + "; ".join(problems) + ". Install it on "
            f"every node at the same path as here ({ROOT}, e.g. a shared filesystem or the same "
            "checkout, with `pip install -e '.[ray]'`), with the same Python packages")


def run_group(spec: str, base_args: list[str], members: list[dict], experiment: str,
              workdir: str | None) -> list[dict]:
    """The body of one Ray task: trains the runs ``members`` (override dicts of ``spec``;
    several: one stack) and returns per run ``{"status", "fields", "metrics", "traceback"}``.
    A run that raises comes back "failed" with its traceback (not retried by Ray).

    >>> rows = run_group("configs/rank_ablation.py:tiny", [], [{"lora.rank": 1}], "e",
    ...                  None)  # doctest: +SKIP
    """
    start = time.perf_counter()
    from experiments import run as run_py
    from experiments import sweep
    from lowrank import results

    run_py.enable_compilation_cache()
    try:
        config = sweep.parsed_config(spec, base_args)
        configs = [results.apply_overrides(config, o) for o in members]
        if len(configs) == 1:
            resolved = run_py.tasks.training_config(configs[0])
            if workdir:
                resolved.workdir = str(Path(workdir) / experiment
                                       / results.config_hash(configs[0]))
            outs = [run_py.measure(configs[0], resolved, start)]
        else:
            outs = run_py.measure_stacked(
                configs, start, run_py.stack_workdir(workdir, experiment, configs))
    except Exception:
        return [failed(traceback.format_exc())] * len(members)
    return [failed(o) if isinstance(o, str) else
            {"status": "ok", "fields": o[0], "metrics": o[1], "traceback": None} for o in outs]


def failed(error: str) -> dict:
    """A failed run's result, as a task returns it.

    >>> failed("boom")["status"]
    'failed'
    """
    return {"status": "failed", "fields": {}, "metrics": {}, "traceback": error}


def run_groups(
    groups: list[list[dict]],
    *,
    spec: str,
    base_args: list[str],
    experiment: str,
    workdir: str | None,
    cpus_per_run: float,
    gpus_per_run: float,
    max_retries: int,
    max_in_flight: int | None,
    on_result: Callable[[list[dict], list[dict], int, float], None],
) -> None:
    """Submits each group of override dicts as one task, at most ``max_in_flight`` at a time
    (default: as many as the cluster's CPUs hold), and calls ``on_result(members, rows,
    running, seconds)`` in the driver as each finishes (a task that failed for good, its
    worker killed more than ``max_retries`` times, gives "failed" rows naming why).
    """
    import ray

    if cpus_per_run <= 0 and gpus_per_run <= 0:
        raise ValueError("--cpus_per_run and --gpus_per_run are both 0: a run must declare "
                         "what it uses, or Ray packs them all onto one node")
    if max_in_flight is None:
        cpus = ray.cluster_resources().get("CPU", 1)
        max_in_flight = max(int(cpus // cpus_per_run) if cpus_per_run > 0 else 1, 1)
    if max_in_flight < 1:
        raise ValueError(f"--max_in_flight must be >= 1, got {max_in_flight}")
    task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=max_retries,
                      max_calls=1, retry_exceptions=False)(run_group)
    queue, in_flight = list(groups), {}
    while queue or in_flight:
        while queue and len(in_flight) < max_in_flight:
            members = queue.pop(0)
            in_flight[task.remote(spec, base_args, members, experiment, workdir)] = (
                members, time.perf_counter())
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            members, submitted = in_flight.pop(ref)
            try:
                rows = ray.get(ref)
            except ray.exceptions.RayError as e:  # lost for good, or not runnable there
                reason = " ".join(str(e).split())[:2000]
                rows = [failed(f"the Ray task failed after {max_retries} retries: "
                               f"{type(e).__name__}: {reason}")] * len(members)
            on_result(members, rows, len(in_flight), time.perf_counter() - submitted)


def shutdown() -> None:
    """Disconnects from (or stops the private) Ray cluster, if connected."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()
