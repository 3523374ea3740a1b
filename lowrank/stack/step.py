"""The stacked train and eval steps: K members trained by one program over one frozen base.

Each member runs the single-run step (``lowrank.train.make_train_step``) under ``jax.vmap``:
its state, mask, scale multipliers and optimizer values are mapped over, the frozen tree (and
the batch, when the members share their data) is not (``in_axes=None``). Operations whose
inputs are all unmapped are traced once, outside the member axis, so a quantized base is
dequantized once per step for all K members, not K times.

Three things keep each member's arithmetic that of its own run:

* gradients flow only into the entries the member trains (``jnp.where(mask, x,
  stop_gradient(x))``), so the padding and other members' targets get exactly zero gradient
  and do not count in gradient clipping or ``grad_norm``;
* after AdamW the updates are masked again, so weight decay or Adam's epsilon cannot move
  an entry the member does not train;
* where members' adapter scales differ, the stacked pair has scale 1 and the member's scale
  multiplies ``B`` inside the forward pass. The trained value is still the member's own
  ``B``: its gradient is the single run's (scale times the same product), and Adam's update
  of it is too. (Training ``scale * B`` instead would give the same Adam steps on a
  differently scaled parameter, a different trajectory.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import optim, paths
from lowrank.stack.layout import StackedState
from lowrank.train.step import make_eval_step, make_train_step

# Arguments of lowrank.optim.adamw that decide its structure (Python branches): one value per
# stack. The others may differ between members and are then mapped over as arrays.
SHARED_OPTIMIZER_ARGS = ("clip_norm", "loraplus_ratio", "lr_multipliers", "mask")
MAPPED_OPTIMIZER_ARGS = ("weight_decay", "b1", "b2", "eps")


def with_multipliers(trainable: Mapping, multipliers: Mapping[str, jax.Array]) -> dict:
    """``trainable`` with each pair's ``B`` at a path of ``multipliers`` multiplied by it.

    >>> from lowrank.lora import LoraPair
    >>> t = {"d": {"kernel": LoraPair(jnp.ones((2, 1)), jnp.ones((1, 2)))}}
    >>> with_multipliers(t, {"d/kernel": jnp.float32(3.0)})["d"]["kernel"].b.tolist()
    [[3.0, 3.0]]
    """
    flat = dict(paths.flatten(trainable))
    for p, m in multipliers.items():
        pair = flat[p]
        flat[p] = pair.replace(b=pair.b * m.astype(pair.b.dtype))
    return paths.unflatten(flat)


def member_loss_fn(loss_fn: Callable, mask: Any, multipliers: Mapping[str, jax.Array]):
    """One member's ``loss_fn(trainable, frozen, batch, rng)`` inside a stack: gradients only
    into the entries where ``mask`` is True, adapter scales from ``multipliers``.

    >>> loss_fn = lambda t, f, b, r: (jnp.sum(t["w"] ** 2), {})
    >>> member = member_loss_fn(loss_fn, {"w": jnp.array([True, False])}, {})
    >>> jax.grad(lambda t: member(t, None, None, None)[0])({"w": jnp.ones(2)})["w"].tolist()
    [2.0, 0.0]
    """

    def loss(trainable, frozen, batch, rng):
        trainable = jax.tree.map(lambda x, m: jnp.where(m, x, jax.lax.stop_gradient(x)),
                                 trainable, mask)
        return loss_fn(with_multipliers(trainable, multipliers), frozen, batch, rng)

    return loss


def masked_updates(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """``tx`` whose updates are zero where ``mask`` is False (its state is ``tx``'s own).

    >>> tx = masked_updates(optax.sgd(1.0), {"w": jnp.array([True, False])})
    >>> tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))[0]["w"].tolist()
    [-1.0, 0.0]
    """

    def update(updates, state, params=None):
        updates, state = tx.update(updates, state, params)
        return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, mask), state

    return optax.GradientTransformation(tx.init, update)


def _split_optimizers(optimizers: Sequence[Mapping[str, Any]]) -> tuple[dict, dict]:
    """(arguments shared by all members, as Python values; {name: [K] array} of the mapped
    arguments that differ)."""
    names = set().union(*optimizers)
    unknown = names - {"learning_rate", *SHARED_OPTIMIZER_ARGS, *MAPPED_OPTIMIZER_ARGS}
    if unknown:
        accepted = ("learning_rate", *SHARED_OPTIMIZER_ARGS, *MAPPED_OPTIMIZER_ARGS)
        raise ValueError(f"unknown optimizer arguments {sorted(unknown)}; accepted: "
                         f"{', '.join(accepted)} (those of lowrank.optim.adamw)")
    if "learning_rate" not in names or any("learning_rate" not in o for o in optimizers):
        raise ValueError("every member's optimizer needs a learning_rate")
    shared, mapped = {}, {}
    for name in sorted(names - {"learning_rate"}):
        missing = object()
        values = [o.get(name, missing) for o in optimizers]
        if any(v is missing for v in values) and any(v is not missing for v in values):
            raise ValueError(f"optimizer argument {name!r} is given for some members only")
        if all(_same(v, values[0]) for v in values):  # static: the single run's program
            shared[name] = values[0]
        elif name in SHARED_OPTIMIZER_ARGS:
            raise ValueError(f"members differ in optimizer argument {name!r} ({values}), which "
                             "decides the optimizer's structure: stack them separately")
        else:
            mapped[name] = np.asarray(values, np.float32)
    return shared, mapped


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and not callable(a) and a == b)


def _learning_rate(optimizers: Sequence[Mapping[str, Any]]):
    """``(index, step) -> member index's learning rate at step``, and whether they are
    schedules (as opposed to constants)."""
    rates = [o["learning_rate"] for o in optimizers]
    if all(callable(r) for r in rates):
        if len(rates) == 1:
            return (lambda index, step: rates[0](step)), True
        return (lambda index, step: jax.lax.switch(index, rates, step)), True
    if any(callable(r) for r in rates):
        raise ValueError("members mix learning-rate schedules and constants: give all of "
                         "them schedules (optax.constant_schedule for a constant)")
    values = np.asarray(rates, np.float32)
    return (lambda index, step: jnp.asarray(values)[index]), False


def make_stacked_train_step(
    loss_fn: Callable,
    optimizers: Sequence[Mapping[str, Any]],
    *,
    micro_batches: int = 1,
    per_member_batches: bool = False,
) -> Callable:
    """``train_step(stacked, frozen, batch) -> (stacked, metrics)`` for the K members of a
    :class:`~lowrank.stack.StackedState`; every metric has a leading member axis.

    Args:
      loss_fn: the single-run ``loss_fn(trainable, frozen, batch, rng)``
        (``lowrank.train.make_loss_fn``).
      optimizers: per member, the arguments of ``lowrank.optim.adamw`` (``learning_rate`` a
        schedule or a float). ``clip_norm``, ``loraplus_ratio`` and ``mask`` must agree;
        ``weight_decay``, ``b1``, ``b2``, ``eps`` and the learning rate may differ.
      micro_batches: gradient accumulation, as in ``make_train_step``.
      per_member_batches: the batch has a leading member axis (members with different data
        seeds); otherwise all members train on the same batch.

    >>> import flax.linen as nn, lowrank
    >>> from lowrank.stack.layout import stack_states
    >>> from lowrank.train import TrainState, default_forward, make_loss_fn
    >>> model = nn.Dense(2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> specs = [lowrank.LoraSpec(rank=1, alpha=1), lowrank.LoraSpec(rank=2, alpha=1)]
    >>> optimizers = [dict(learning_rate=optax.constant_schedule(lr)) for lr in (0.1, 0.01)]
    >>> txs = [optim.adamw(**o) for o in optimizers]
    >>> states = [TrainState.create(lowrank.init_adapters(jax.random.key(i), params, s), tx,
    ...                             jax.random.key(i)) for i, (s, tx) in enumerate(zip(specs, txs))]
    >>> stacked = stack_states(states, params, txs)
    >>> step = jax.jit(make_stacked_train_step(
    ...     make_loss_fn(model, default_forward, "classification"), optimizers))
    >>> batch = {"inputs": jnp.ones((4, 3)), "labels": jnp.zeros(4, jnp.int32)}
    >>> stacked, metrics = step(stacked, params, batch)
    >>> metrics["loss"].shape, metrics["learning_rate"].tolist()
    ((2,), [0.10000000149011612, 0.009999999776482582])
    """
    if not optimizers:
        raise ValueError("make_stacked_train_step needs one optimizer per member, got none")
    size = len(optimizers)
    shared, mapped = _split_optimizers(optimizers)
    learning_rate, scheduled = _learning_rate(optimizers)

    def member_step(train, mask, multipliers, index, values, frozen, batch):
        lr = (lambda count: learning_rate(index, count)) if scheduled else learning_rate(index, 0)
        tx = masked_updates(optim.adamw(lr, **shared, **values), mask)
        step = make_train_step(member_loss_fn(loss_fn, mask, multipliers), tx,
                               micro_batches=micro_batches,
                               schedule=lr if scheduled else None)
        return step(train, frozen, batch)

    def train_step(stacked: StackedState, frozen: Any, batch: Mapping[str, Any]):
        if stacked.size != size:
            raise ValueError(f"the stack has {stacked.size} members but the step was built "
                             f"for {size} optimizers")
        values = {name: jnp.asarray(v) for name, v in mapped.items()}
        train, metrics = jax.vmap(
            member_step, in_axes=(0, 0, 0, 0, 0, None, 0 if per_member_batches else None)
        )(stacked.train, stacked.mask, stacked.multipliers, jnp.arange(size), values, frozen,
          batch)
        return stacked.replace(train=train), metrics

    return train_step


def make_stacked_eval_step(loss_fn: Callable) -> Callable:
    """``eval_step(stacked, frozen, batch) -> metrics``, each with a leading member axis; all
    members see the same batch (no dropout).

    >>> import flax.linen as nn
    >>> from lowrank.train import default_forward, make_loss_fn
    >>> eval_step = make_stacked_eval_step(make_loss_fn(nn.Dense(2), default_forward,
    ...                                                 "classification"))
    """

    def member_eval(trainable, mask, multipliers, frozen, batch):
        return make_eval_step(member_loss_fn(loss_fn, mask, multipliers))(trainable, frozen,
                                                                          batch)

    def eval_step(stacked: StackedState, frozen: Any, batch: Mapping[str, Any]):
        return jax.vmap(member_eval, in_axes=(0, 0, 0, None, None))(
            stacked.train.trainable, stacked.mask, stacked.multipliers, frozen, batch)

    return eval_step
