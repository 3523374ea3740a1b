"""The README's plain-JAX recipe as a timed step: what a user writes instead of ``lowrank.train``.

``lr.init_adapters`` (LoRA) or ``lr.init`` with a ``QuantSpec`` (QLoRA) or the plain params
(full fine-tuning), a loss over ``lr.apply`` (``model.apply`` for full fine-tuning) with
``lora_rng`` for dropout, ``jax.value_and_grad``, ``lowrank.optim.adamw`` and
``optax.apply_updates``, jitted with the trainable tree and the optimizer state donated; a
new dropout key is split off inside the step, as a user threads one through a loop. It
returns a ``lowrank_steps.Step``, so the peers' workers time it like ``lowrank.train``'s.

    >>> step = make_recipe_step(model, params, batch, mode="lora", spec=spec,
    ...                         dropout=True, prng_name="hash")  # doctest: +SKIP
    >>> step.run(); step.losses  # doctest: +SKIP
    [1.61]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lowrank as lr
from benchmarks.peers import lowrank_steps
from lowrank import prng
from lowrank.train.precision import cast_floating


def make_recipe_step(
    model: Any,
    params: Mapping,
    batch: Mapping[str, Any],
    *,
    mode: str,
    spec: lr.LoraSpec | None = None,
    quant: lr.QuantSpec = lowrank_steps.NF4_DOUBLE,
    dropout: bool = False,
    prng_name: str = "threefry",
    compute_dtype: Any = jnp.float32,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.01,
    seed: int = 0,
) -> lowrank_steps.Step:
    """One compiled recipe step of a BERT classifier on ``batch`` (``input_ids``,
    ``attention_mask``, ``token_type_ids``, ``labels``), with its state.

    ``mode``, ``spec``, ``quant``, ``compute_dtype`` and ``seed`` as in
    ``lowrank_steps.make_step`` (the same seed gives the same adapters, so the first losses
    agree with dropout off); ``dropout`` runs the model's own dropout from keys of generator
    ``prng_name`` (``lowrank.prng``).
    """
    if mode not in lowrank_steps.MODES:
        raise ValueError(f"mode {mode!r} is not one of {lowrank_steps.MODES}")
    key = jax.random.key(seed)
    if mode == "full":
        # A copy: it is donated, and the caller's params must stay usable.
        trainable, frozen = jax.tree.map(jnp.copy, dict(params)), {}
    elif spec is None:
        raise ValueError(f"mode {mode!r} needs a LoraSpec (spec=...)")
    elif mode == "qlora":
        frozen, trainable = lr.init(key, params, spec, quant=quant)
    else:
        frozen, trainable = params, lr.init_adapters(key, params, spec)

    def loss_fn(trainable, frozen, batch, rng):
        # The README's compute dtype: cast the weights and the float inputs; quantized leaves
        # dequantize to it.
        trainable, frozen = cast_floating((trainable, frozen), compute_dtype)
        inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        if mode == "full":
            logits = model.apply({"params": trainable}, *inputs, deterministic=not dropout,
                                 rngs={"dropout": rng})
        else:
            logits = lr.apply(model, frozen, trainable, *inputs, deterministic=not dropout,
                              lora_rng=rng)
        labels = batch["labels"]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels).mean()

    tx = lr.optim.adamw(learning_rate, weight_decay=weight_decay)

    def train_step(trainable, opt_state, rng, frozen, batch):
        rng, step_rng = jax.random.split(rng)
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, step_rng)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, rng, loss

    opt_state = tx.init(trainable)
    rng = prng.key(seed + 1, prng_name)
    batch = jax.device_put(dict(batch))
    jitted = jax.jit(train_step, donate_argnums=(0, 1))
    compiled = jitted.lower(trainable, opt_state, rng, frozen, batch).compile()
    losses: list[float] = []
    holder = {"state": (trainable, opt_state, rng)}
    record = lowrank_steps.describe(lambda: None, mode, trainable, frozen, opt_state, compiled,
                                    losses)

    def run() -> None:
        *state, loss = compiled(*holder["state"], frozen, batch)
        holder["state"] = tuple(state)
        jax.block_until_ready(holder["state"])
        losses.append(float(loss))

    record.run = run
    return record
