"""``Task``: the hooks through which ``train`` gets a model, its base weights, data and a loss.

A config names a task factory by import path (``config.task = "package.module:function"``);
the factory receives the whole config and returns a ``Task``. Models and datasets plug in
this way without ``lowrank.train`` knowing about them.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax

from lowrank.intercept import apply
from lowrank.train.losses import LossFn

Batch = Mapping[str, Any]


def default_forward(
    model: nn.Module, frozen: Any, trainable: Any, batch: Batch, rng: jax.Array | None
) -> Any:
    """``lowrank.apply(model, frozen, trainable, batch["inputs"])``; adapter dropout is on
    when ``rng`` is given (training) and off when it is None (evaluation).

    >>> import jax.numpy as jnp
    >>> model = nn.Dense(2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> default_forward(model, params, {}, {"inputs": jnp.ones((4, 3))}, None).shape
    (4, 2)
    """
    return apply(model, frozen, trainable, batch["inputs"], lora_rng=rng)


@dataclasses.dataclass(frozen=True)
class Task:
    """What to train on.

    Attributes:
      model: an unmodified linen module.
      params: its base weights: the frozen tree (plain or quantized arrays).
      train_batch: ``(seed, step) -> batch``, a dict of arrays whose leading axis is
        ``config.batch_size``. It must be a function of its arguments alone, so that a resumed
        run sees exactly the batches an uninterrupted one would.
      loss: "classification" (``batch["labels"]``), "lm" (``batch["targets"]``, optional
        ``batch["mask"]``) or ``fn(outputs, batch) -> (mean loss, metrics)``.
      eval_batches: ``() -> iterable of batches`` for evaluation (the validation split when
        ``config.eval.select`` picks a best point on it), or None.
      forward: ``fn(model, frozen, trainable, batch, rng) -> outputs`` (see
        :func:`default_forward`); override it for models with their own dropout or several
        inputs.
      layouts: passed to ``lowrank.init_adapters`` for kernels with more than two axes.
      source: where the base weights came from, recorded in checkpoints next to their hash.
      test_batches: ``() -> iterable of batches`` of the test split, scored at the best
        validation point when ``config.eval.select`` is set; None: never.
      quant: a ``QuantSpec`` to quantize the (float) ``params`` with at the start of a run,
        through ``lowrank.init``: what a LoftQ init (``config.lora.init="loftq"``) fits its
        adapters to. None: ``params`` are the frozen tree as they are (PiSSA still makes its
        residual from them).
      train_rows: ``(seed, step, rows) -> train_batch(seed, step)`` sliced to ``rows`` (a
        ``slice``), built without the other rows: in a multi-process run each process asks
        for its own share only (``lowrank.data.sampler`` makes both functions from arrays).
        None: every process builds the whole batch and keeps its rows.
      seeded_params: ``seed -> params`` a run of that seed starts from, where the task draws
        some of them from the seed (a new classifier head) and every run trains those
        leaves; ``params`` is the tree of the seed the task was built for (``train`` uses
        it as it is). A stack of runs (``lowrank.stack``) initialises each member from its
        own seed's tree, so it can hold several seeds; the returned tree must reuse
        ``params``' leaf objects except the drawn ones (they are found by identity).
        None: ``params`` for every seed.

    >>> import jax.numpy as jnp
    >>> model = nn.Dense(2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> task = Task(model, params, lambda seed, step: {"inputs": jnp.ones((4, 3)),
    ...                                                 "labels": jnp.zeros(4, int)})
    """

    model: nn.Module
    params: Any
    train_batch: Callable[[int, int], Batch]
    loss: str | LossFn = "classification"
    eval_batches: Callable[[], Iterable[Batch]] | None = None
    forward: Callable[..., Any] = default_forward
    layouts: Mapping | None = None
    source: str = "unspecified"
    quant: Any = None
    test_batches: Callable[[], Iterable[Batch]] | None = None
    train_rows: Callable[[int, int, slice], Batch] | None = None
    seeded_params: Callable[[int], Any] | None = None


def load_task(config: Any) -> Task:
    """Calls the factory named by ``config.task`` ("package.module:function") with the config.

    >>> import ml_collections
    >>> task = load_task(ml_collections.ConfigDict({"task": "lowrank.train.toy:classifier",
    ...                                             "batch_size": 4}))
    >>> task.loss
    'classification'
    """
    name = config.task
    module_name, sep, attr = str(name).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"config.task {name!r} is not an import path: expected 'package.module:function', "
            "e.g. 'lowrank.train.toy:classifier'"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"config.task {name!r} cannot be imported: {e}") from e
    task = factory(config)
    if not isinstance(task, Task):
        raise TypeError(f"config.task {name!r} returned {type(task).__name__}, expected a Task")
    return task
