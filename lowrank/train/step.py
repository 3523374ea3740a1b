"""The pure train and eval steps: gradients of the trainable tree only, accumulated over
micro-batches, then one optimizer update.

``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)`` is the contract between the two;
:func:`make_loss_fn` builds it from a task's forward and loss. Micro-batches and devices are
weighted equally (the mean of their mean losses), which is the mean over the whole batch
whenever they hold equally many examples (or target tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowrank.train.losses import LossFn, get_loss
from lowrank.train.precision import cast_floating
from lowrank.train.state import TrainState

StepFn = Callable[[TrainState, Any, Mapping[str, Any]], tuple[TrainState, dict]]


def make_loss_fn(
    model: Any,
    forward: Callable[..., Any],
    loss: str | LossFn,
    *,
    compute_dtype: Any = jnp.float32,
    remat: bool = False,
) -> Callable:
    """``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)`` computing in
    ``compute_dtype`` (trainable, frozen and floating batch entries are cast to it; quantized
    weights dequantize inside the model) with the loss itself in float32.

    ``remat`` recomputes the forward pass in the backward pass instead of keeping its
    activations (``jax.checkpoint``): less memory, one more forward.

    >>> import flax.linen as nn
    >>> from lowrank.train.task import default_forward
    >>> model = nn.Dense(2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> loss_fn = make_loss_fn(model, default_forward, "classification")
    >>> batch = {"inputs": jnp.ones((4, 3)), "labels": jnp.zeros(4, jnp.int32)}
    >>> loss, metrics = loss_fn({}, params, batch, None)
    >>> sorted(metrics)
    ['accuracy', 'weight']
    """
    loss_of_outputs = get_loss(loss)

    def loss_fn(trainable, frozen, batch, rng):
        trainable, frozen, batch = cast_floating((trainable, frozen, batch), compute_dtype)
        return loss_of_outputs(forward(model, frozen, trainable, batch, rng), batch)

    return jax.checkpoint(loss_fn) if remat else loss_fn


def split_micro_batches(batch: Mapping[str, Any], micro_batches: int) -> dict:
    """``[B, ...]`` -> ``[micro_batches, B / micro_batches, ...]``, micro-batch ``i`` taking
    examples ``i, i + m, i + 2m, ...`` so that a batch sharded over devices in contiguous
    blocks stays where it is.

    >>> split_micro_batches({"x": jnp.arange(6)}, 2)["x"].tolist()
    [[0, 2, 4], [1, 3, 5]]
    """

    def split(x):
        if x.shape[0] % micro_batches:
            raise ValueError(
                f"a batch of {x.shape[0]} examples does not split into {micro_batches} "
                "micro-batches: the batch size must be a multiple of micro_batches"
            )
        return x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, dict(batch))


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    micro_batches: int = 1,
    schedule: optax.Schedule | None = None,
    axis_name: str | None = None,
) -> StepFn:
    """A pure ``train_step(state, frozen, batch) -> (state, metrics)``.

    Gradients are taken of ``state.trainable`` only, averaged over ``micro_batches`` (a
    ``lax.scan``, so memory is that of one micro-batch) and, under ``pmap``, over the devices
    of ``axis_name`` (``lax.pmean``). Clipping belongs to ``tx`` (``lowrank.optim.adamw``'s
    ``clip_norm``); ``metrics["grad_norm"]`` is the norm before clipping.
    ``metrics["learning_rate"]`` is ``schedule(step)`` when a schedule is given.

    >>> from lowrank.train.task import default_forward
    >>> import flax.linen as nn
    >>> model = nn.Dense(2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> trainable = {"bias": params["bias"]}
    >>> loss_fn = make_loss_fn(model, default_forward, "classification")
    >>> tx = optax.sgd(0.1)
    >>> step = jax.jit(make_train_step(loss_fn, tx, micro_batches=2))
    >>> state = TrainState.create(trainable, tx, jax.random.key(1))
    >>> batch = {"inputs": jnp.ones((4, 3)), "labels": jnp.zeros(4, jnp.int32)}
    >>> state, metrics = step(state, params, batch)
    >>> int(state.step), sorted(metrics)
    (1, ['accuracy', 'grad_norm', 'loss', 'weight'])
    """
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def grads_and_metrics(trainable, frozen, batch, key):
        if micro_batches == 1:
            (loss, metrics), grads = grad_fn(trainable, frozen, batch, key)
            return grads, {"loss": loss, **metrics}

        def one(grad_sum, indexed):
            i, micro = indexed
            (loss, metrics), grads = grad_fn(trainable, frozen, micro, jax.random.fold_in(key, i))
            grad_sum = jax.tree.map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads)
            return grad_sum, {"loss": loss, **metrics}

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        micro = split_micro_batches(batch, micro_batches)
        grad_sum, per_micro = jax.lax.scan(one, zeros, (jnp.arange(micro_batches), micro))
        grads = jax.tree.map(lambda g: g / micro_batches, grad_sum)
        metrics = jax.tree.map(lambda m: m.mean(0), per_micro)
        if "weight" in metrics:  # a count: the whole batch holds the sum
            metrics["weight"] = per_micro["weight"].sum()
        return grads, metrics

    def train_step(state: TrainState, frozen: Any, batch: Mapping[str, Any]):
        key = state.step_key()
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        grads, metrics = grads_and_metrics(state.trainable, frozen, batch, key)
        if axis_name is not None:
            weight = metrics.pop("weight", None)
            grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
            if weight is not None:
                metrics["weight"] = jax.lax.psum(weight, axis_name)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new_state = state.replace(trainable=trainable, opt_state=opt_state, step=state.step + 1)
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn: Callable) -> Callable:
    """A pure ``eval_step(trainable, frozen, batch) -> metrics`` (no dropout: ``rng=None``).

    >>> from lowrank.train.task import default_forward
    >>> import flax.linen as nn
    >>> model = nn.Dense(2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> eval_step = make_eval_step(make_loss_fn(model, default_forward, "classification"))
    >>> batch = {"inputs": jnp.ones((4, 3)), "labels": jnp.zeros(4, jnp.int32)}
    >>> sorted(eval_step({}, params, batch))
    ['accuracy', 'loss', 'weight']
    """

    def eval_step(trainable, frozen, batch):
        loss, metrics = loss_fn(trainable, frozen, batch, None)
        return {"loss": loss, **metrics}

    return eval_step
