"""``TrainState``: everything that changes during training, and nothing that does not.

The frozen base is deliberately absent: it is an argument of the step, never differentiated,
never given optimizer state, never written into a training checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lowrank import prng


@struct.dataclass
class TrainState:
    """The trainable tree, its optimizer state, the step counter and the base PRNG key.

    ``rng`` holds raw key data (``jax.random.key_data``), so the state checkpoints as plain
    arrays; each step derives its own key as ``fold_in(rng, step)``, which makes the random
    stream a function of the step alone (exact resume). ``rng_impl`` (static) names the
    generator of that key's bits (``lowrank.prng``: "threefry" or "hash").

    >>> tx = optax.sgd(0.1)
    >>> state = TrainState.create({"w": jnp.zeros(2)}, tx, jax.random.key(0))
    >>> int(state.step), state.opt_state == tx.init({"w": jnp.zeros(2)})
    (0, True)
    """

    trainable: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    rng_impl: str = struct.field(pytree_node=False, default="threefry")

    @classmethod
    def create(cls, trainable: Any, tx: optax.GradientTransformation, key: jax.Array,
               rng_impl: str = "threefry"):
        """A fresh state at step 0 (``key`` may be a typed key or raw key data; its data
        seeds the steps' keys, whose bits come from generator ``rng_impl``)."""
        prng.impl(rng_impl)  # a ValueError naming the accepted generators
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        return cls(trainable, tx.init(trainable), jnp.zeros((), jnp.int32), key, rng_impl)

    def step_key(self) -> jax.Array:
        """The typed PRNG key of the current step.

        >>> state = TrainState.create({}, optax.sgd(0.1), jax.random.key(0))
        >>> state.step_key().shape
        ()
        """
        key = jax.random.wrap_key_data(self.rng, impl=prng.impl(self.rng_impl))
        return jax.random.fold_in(key, self.step)
