"""One training run over several processes (and hosts): ``jax.distributed`` set up from the
config, each process's share of a global batch, and which process speaks.

With ``config.distributed.enabled``, :func:`initialize` connects this process to the others
before anything touches a device: the coordinator address, process count and id come from
the config, or, left None, are detected as JAX detects them (SLURM, Open MPI). Then
``jax.devices()`` lists every process's devices, so ``parallel.mode="mesh"`` spans them all;
each process loads only its own rows of every global batch (``Task.train_rows``, given
:func:`local_rows`) and transfers them to its devices (:func:`local_batch`; a task without
``train_rows`` builds the whole batch and :func:`global_batch` keeps its rows); checkpoints
are written by all processes together (orbax's rule), and metrics files, the progress bar and
the adapters export come from process 0 only (:func:`is_primary`).

Security: the JAX coordinator accepts any process that reaches its port, without
authentication. It is bound to the coordinator address as given (127.0.0.1 for a run on one
machine); keep a multi-host run's address on a private network.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

CONNECT_TIMEOUT_S = 5.0


def is_primary() -> bool:
    """Whether this process writes the run's metrics files, progress bar and exports
    (process 0; the only process of a run that is not distributed).

    >>> is_primary()
    True
    """
    return jax.process_index() == 0


def check_settings(coordinator_address: str | None, num_processes: int | None,
                   process_id: int | None) -> None:
    """Raises a ValueError naming the first of the three ``config.distributed`` settings that
    cannot work together (all None means: detect them, as JAX does under SLURM or Open MPI).

    >>> check_settings("127.0.0.1:1234", 2, 2)
    Traceback (most recent call last):
    ...
    ValueError: config.distributed.process_id 2 is not in 0 .. 1 (num_processes 2): give each \
process its own id below the process count
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "config.distributed: give coordinator_address, num_processes and process_id "
            f"together (got {coordinator_address!r}, {num_processes!r}, {process_id!r}), or "
            "none of them to detect them as JAX does under SLURM or Open MPI")
    if not all(given):
        return
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"config.distributed.num_processes must be an integer >= 1, got "
                         f"{num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(
            f"config.distributed.process_id {process_id!r} is not in 0 .. {num_processes - 1} "
            f"(num_processes {num_processes}): give each process its own id below the process "
            "count")
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"config.distributed.coordinator_address {coordinator_address!r} is "
                         "not HOST:PORT (such as 127.0.0.1:12345)")


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Polls until a TCP connection to the coordinator opens (process 0 may start later)."""
    import time

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise ValueError(
                    f"cannot reach the JAX coordinator at {address} within {timeout:.0f} s "
                    f"({type(e).__name__}: {e}): start process 0 (it serves there), or fix "
                    "config.distributed.coordinator_address") from None
            time.sleep(0.2)


def initialize(distributed: Mapping[str, Any] | None) -> None:
    """Connects this process to the run's others, once, as ``config.distributed`` says
    (nothing when ``enabled`` is False or JAX is already connected).

    Raises:
      ValueError: settings that cannot work (named), a coordinator that cannot be reached
        within ``timeout_s``, or a process count that differs from what the processes
        actually are (each process must be given the same ``num_processes``).

    >>> initialize({"enabled": False})  # a run in one process: nothing to connect
    >>> jax.process_count()
    1
    """
    if not distributed or not distributed["enabled"] or jax.distributed.is_initialized():
        return
    address = distributed["coordinator_address"]
    count, index = distributed["num_processes"], distributed["process_id"]
    check_settings(address, count, index)
    timeout = int(distributed["timeout_s"])
    if address is not None and index != 0:
        _wait_for_coordinator(address, timeout)
    try:
        # Bound to the address as given (the loopback for one machine), not every interface.
        jax.distributed.initialize(address, count, index, initialization_timeout=timeout,
                                   coordinator_bind_address=address)
    except RuntimeError as e:
        if "must be called before" not in str(e):
            raise ValueError(_failed(address, count, index, e)) from e
        raise RuntimeError(
            "config.distributed.enabled, but this process already used JAX (a computation, "
            "jax.devices()...): call lowrank.train.train, or "
            "lowrank.train.distributed.initialize(config.distributed), first") from e
    except Exception as e:  # JAX raises XlaRuntimeError (DEADLINE_EXCEEDED and such)
        raise ValueError(_failed(address, count, index, e)) from e
    if count is not None:
        _check_count(count)


def _check_count(count: int) -> None:
    """Raises on every process when the processes were not all given ``count`` (one small
    collective, so that none of them goes on to hang in the first step)."""
    from jax.experimental import multihost_utils

    given = np.asarray(multihost_utils.process_allgather(np.int32(count))).ravel().tolist()
    if jax.process_count() != count or len(set(given)) > 1:
        raise ValueError(
            f"config.distributed.num_processes differs between the processes: process i was "
            f"given {given[:16]} (index i), and JAX counts {jax.process_count()} processes: "
            "start every process with the same num_processes, the number actually started")


def _failed(address, count, index, error) -> str:
    return (f"jax.distributed.initialize({address!r}, num_processes={count!r}, "
            f"process_id={index!r}) failed: {' '.join(str(error).split())[:400]}. Every "
            "process must be started with the same coordinator_address and num_processes, each "
            "with its own process_id, and all of them within config.distributed.timeout_s")


def local_rows(sharding: jax.sharding.Sharding, batch_size: int) -> slice:
    """The rows of a global batch of ``batch_size`` examples that this process's devices hold
    under ``sharding`` (all of them in a single process).

    >>> from lowrank.train.parallel import make_mesh
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> local_rows(NamedSharding(make_mesh((-1, 1)), P(("data", "fsdp"))), 8)
    slice(0, 8, None)
    """
    spans = [index[0].indices(batch_size)[:2]
             for index in sharding.addressable_devices_indices_map((batch_size,)).values()]
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in set(spans)) != stop - start:
        raise ValueError(f"this process's devices hold rows that are not contiguous in the "
                         f"batch ({sorted(set(spans))}): build the mesh from jax.devices() in "
                         "order")
    return slice(start, stop)


def local_batch(batch: Mapping[str, Any], sharding: jax.sharding.Sharding,
                size: int) -> dict:
    """This process's rows (:func:`local_rows`) of a global batch of ``size`` examples as
    global arrays split by ``sharding``: every process passes its own rows, none holds all.

    >>> from lowrank.train.parallel import make_mesh
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> sharding = NamedSharding(make_mesh((-1, 1)), P(("data", "fsdp")))
    >>> local_batch({"x": np.ones((4, 2))}, sharding, 4)["x"].shape
    (4, 2)
    """
    rows = local_rows(sharding, size)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.shape[:1] != (rows.stop - rows.start,):
            raise ValueError(
                f"batch entry {name!r} has shape {value.shape}: this process (index "
                f"{jax.process_index()}) holds rows {rows.start}:{rows.stop} of the global "
                f"batch of {size}, so a leading axis of {rows.stop - rows.start} was expected")
        out[name] = jax.make_array_from_process_local_data(sharding, value,
                                                           (size, *value.shape[1:]))
    return out


def global_batch(batch: Mapping[str, Any], sharding: jax.sharding.Sharding) -> dict:
    """A global batch (every process holds all of it) as arrays split by ``sharding``, each
    process transferring only the rows of its own devices (:func:`local_rows`).

    >>> from lowrank.train.parallel import make_mesh
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> sharding = NamedSharding(make_mesh((-1, 1)), P(("data", "fsdp")))
    >>> global_batch({"x": np.ones((4, 2))}, sharding)["x"].shape
    (4, 2)
    """
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        size = value.shape[0]
        out.update(local_batch({name: value[local_rows(sharding, size)]}, sharding, size))
    return out
