"""Three ways to run a train step: ``jit`` on one device, ``pmap`` data parallel, and ``jit``
over a ``Mesh`` with a ``data`` and an ``fsdp`` axis.

A :class:`Runner` bundles the compiled step with how its arguments are placed, so that the
training loop is the same for all three. On the mesh the batch is split over both axes (every
device sees different examples), the frozen tree is split along the ``fsdp`` axis (each leaf,
quantized codes and scales included, along its largest axis that divides evenly; XLA gathers
it where it is used) and the small trainable tree and optimizer state are replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lowrank.train import distributed
from lowrank.train.state import TrainState
from lowrank.train.step import StepFn

MODES = ("jit", "pmap", "mesh")
PMAP_AXIS = "batch"
"""The axis name a step for ``pmap_runner`` must be built with (``make_train_step(...,
axis_name=PMAP_AXIS)``)."""
MESH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class Runner:
    """A compiled train step and the placement of its arguments.

    Attributes:
      mode: "jit", "pmap" or "mesh".
      devices: how many devices a batch is split over.
      step: ``(state, frozen, batch) -> (state, metrics)`` on placed arguments; the state is
        donated (its buffers are reused for the new state).
      place_state, place_frozen, place_batch: put host values where ``step`` wants them.
      host_state: one copy of a placed state (for checkpoints and results).
      host_metrics: one copy of the metrics.
      eval_view: ``(placed state, placed frozen) -> (trainable, frozen)`` for a jitted eval.
      local_rows: ``batch_size -> slice``, the rows of every global batch this process feeds,
        in a multi-process run (None: one process feeds the whole batch).
      place_local_batch: ``(those rows, batch_size) -> placed global batch`` (with
        ``local_rows``).
    """

    mode: str
    devices: int
    step: Callable
    place_state: Callable[[TrainState], Any]
    place_frozen: Callable[[Any], Any]
    place_batch: Callable[[Mapping[str, Any]], Any]
    host_state: Callable[[Any], TrainState]
    host_metrics: Callable[[Any], dict]
    eval_view: Callable[[Any, Any], tuple[Any, Any]]
    local_rows: Callable[[int], slice] | None = None
    place_local_batch: Callable[[Mapping[str, Any], int], Any] | None = None


def _identity(x):
    return x


def _check_split(batch: Mapping[str, Any], devices: int, mode: str) -> int:
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in batch.items()}
    for name, size in sizes.items():
        if size is None or size % devices:
            raise ValueError(
                f"batch entry {name!r} has {size} examples, which do not split over {devices} "
                f"devices (parallel.mode={mode!r}): the batch size must be a multiple of "
                f"{devices}"
            )
    return devices


def jit_runner(train_step: StepFn) -> Runner:
    """``jax.jit`` on the default device, donating the state.

    >>> runner = jit_runner(lambda state, frozen, batch: (state, {}))
    >>> runner.mode, runner.devices
    ('jit', 1)
    """
    step = jax.jit(train_step, donate_argnums=0)
    return Runner(
        "jit", 1, step, _identity, _identity, _identity, _identity, _identity,
        lambda state, frozen: (state.trainable, frozen),
    )


def pmap_runner(train_step: StepFn, devices: list | None = None) -> Runner:
    """``jax.pmap`` over ``devices`` (default: all), each taking an equal slice of the batch;
    ``train_step`` must be built with ``axis_name=PMAP_AXIS`` so that gradients are averaged.

    >>> runner = pmap_runner(lambda state, frozen, batch: (state, {}))
    >>> runner.devices == jax.device_count()
    True
    """
    devices = list(devices or jax.devices())
    n = len(devices)
    stacked = NamedSharding(Mesh(np.array(devices), (PMAP_AXIS,)), P(PMAP_AXIS))

    def replicate(tree):
        return jax.device_put(jax.tree.map(lambda x: np.broadcast_to(x, (n, *np.shape(x))),
                                           jax.device_get(tree)), stacked)

    def place_batch(batch):
        _check_split(batch, n, "pmap")
        split = {k: np.reshape(v, (n, -1, *np.shape(v)[1:])) for k, v in batch.items()}
        return jax.device_put(split, stacked)

    def first(tree):
        return jax.tree.map(lambda x: x[0], tree)

    step = jax.pmap(train_step, axis_name=PMAP_AXIS, devices=devices, donate_argnums=0)
    return Runner(
        "pmap", n, step, replicate, replicate, place_batch, first, first,
        lambda state, frozen: (first(state).trainable, first(frozen)),
    )


def make_mesh(shape: tuple[int, int] = (-1, 1), devices: list | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh with Auto axes (XLA inserts the collectives); one entry may be
    -1 for "the rest of the devices".

    >>> make_mesh((-1, 1)).axis_names
    ('data', 'fsdp')
    """
    devices = list(devices or jax.devices())
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
        raise ValueError(
            f"mesh shape {shape} is not accepted: expected (data, fsdp), positive sizes with at "
            "most one -1"
        )
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        shape = tuple(len(devices) // known if s == -1 else s for s in shape)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh shape (data, fsdp) = {shape} needs {int(np.prod(shape))} devices, "
            f"{len(devices)} are available"
        )
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shards the largest axis that ``fsdp`` divides evenly (replicated when none does).

    >>> fsdp_spec((6, 8), 4), fsdp_spec((6, 3), 4)
    (P(None, 'fsdp'), P())
    """
    if fsdp > 1:
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % fsdp == 0:
                return P(*([None] * axis), "fsdp")
    return P()


def fsdp_shardings(tree: Any, mesh: Mesh) -> Any:
    """A ``NamedSharding`` per array of ``tree`` (quantized arrays are descended into, so their
    codes and scales are each split on their own largest axis).

    >>> mesh = make_mesh((1, 1))
    >>> fsdp_shardings({"w": np.ones((4, 2))}, mesh)["w"].spec
    P()
    """
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp)), tree)


def mesh_runner(train_step: StepFn, mesh: Mesh) -> Runner:
    """``jax.jit`` over ``mesh``: batch split over (data, fsdp), frozen tree split along fsdp,
    state replicated and donated.

    >>> runner = mesh_runner(lambda state, frozen, batch: (state, {}), make_mesh((-1, 1)))
    >>> runner.mode
    'mesh'
    """
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(MESH_AXES))
    n = mesh.size

    def place_batch(batch):
        _check_split(batch, n, "mesh")
        if jax.process_count() > 1:  # each process transfers only its own rows
            return distributed.global_batch(batch, batch_sharding)
        return jax.device_put(dict(batch), batch_sharding)

    def place_local_batch(rows, size):
        _check_split({"(every entry)": np.empty(size)}, n, "mesh")
        return distributed.local_batch(rows, batch_sharding, size)

    step = jax.jit(train_step, donate_argnums=0, out_shardings=(replicated, replicated))
    several = jax.process_count() > 1
    return Runner(
        "mesh", n, step,
        lambda state: jax.device_put(state, replicated),
        lambda frozen: jax.device_put(frozen, fsdp_shardings(frozen, mesh)),
        place_batch, _identity, _identity,
        lambda state, frozen: (state.trainable, frozen),
        (lambda size: distributed.local_rows(batch_sharding, size)) if several else None,
        place_local_batch if several else None,
    )
