"""optax builders over the adapters tree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank import optim
from lowrank.lora import LoraPair


def _tree():
    pair = LoraPair(jnp.full((4, 2), 0.5), jnp.full((2, 3), 0.5), scale=1.0)
    return {"q": {"kernel": pair}, "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}


def _grads(tree):
    return jax.tree.map(lambda x: jnp.full_like(x, 0.1), tree)


def test_loraplus_gives_b_ratio_times_the_learning_rate():
    tree, lr_a = _tree(), 1e-3
    tx = optim.adamw(lr_a, loraplus_ratio=16.0)
    updates, _ = tx.update(_grads(tree), tx.init(tree), tree)
    # Adam's first step moves every coordinate by lr * g / |g|
    np.testing.assert_allclose(updates["q"]["kernel"].a, -lr_a, rtol=1e-4)
    np.testing.assert_allclose(updates["q"]["kernel"].b, -16 * lr_a, rtol=1e-4)
    np.testing.assert_allclose(updates["head"]["kernel"], -lr_a, rtol=1e-4)


def test_loraplus_scales_a_schedule_too():
    tree = _tree()
    schedule = optax.linear_schedule(1e-3, 0.0, 10)
    tx = optim.adamw(schedule, loraplus_ratio=4.0)
    updates, _ = tx.update(_grads(tree), tx.init(tree), tree)
    np.testing.assert_allclose(updates["q"]["kernel"].b, -4e-3, rtol=1e-4)


def test_weight_decay_skips_vectors():
    tree = _tree()
    tx = optim.adamw(1e-3, weight_decay=0.5)
    zero = jax.tree.map(jnp.zeros_like, tree)
    updates, _ = tx.update(zero, tx.init(tree), tree)
    np.testing.assert_allclose(updates["head"]["bias"], 0.0)
    np.testing.assert_allclose(updates["head"]["kernel"], -1e-3 * 0.5 * 1.0, rtol=1e-5)
    np.testing.assert_allclose(updates["q"]["kernel"].a, -1e-3 * 0.5 * 0.5, rtol=1e-5)


def _two_steps(tx, tree):
    state = tx.init(tree)
    for g in (100.0, 0.01):  # a huge gradient, then a small one
        grads = jax.tree.map(lambda x, g=g: jnp.full_like(x, g), tree)
        updates, state = tx.update(grads, state, tree)
    return updates


def test_clipping_bounds_the_global_norm_before_adam():
    tree = _tree()
    ours = _two_steps(optim.adamw(1e-3, clip_norm=1e-3), tree)
    reference = optax.chain(optax.clip_by_global_norm(1e-3), optax.adamw(1e-3, weight_decay=0.0))
    expected = _two_steps(reference, tree)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    unclipped = _two_steps(optim.adamw(1e-3), tree)
    assert float(jnp.abs(unclipped["head"]["bias"] - ours["head"]["bias"]).max()) > 1e-5


@pytest.mark.parametrize("kwargs, message", [({"loraplus_ratio": 0}, "loraplus_ratio"),
                                             ({"clip_norm": -1.0}, "clip_norm")])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.adamw(1e-3, **kwargs)


def test_lr_multipliers_scale_the_matching_leaves_learning_rate():
    tree = {"classifier": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
            "q": LoraPair(jnp.ones((2, 1)), jnp.ones((1, 2)), scale=1.0)}
    grads = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), tree)
    tx = optim.adamw(1e-3, lr_multipliers=[(r"classifier/kernel", 10.0),
                                              (r"classifier/.*", 3.0)],
                        loraplus_ratio=4.0)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    # Adam's first step moves every coordinate by -lr (m / sqrt(v) = 1): the multiplier shows
    # directly; first match wins; LoRA+ still applies to the B factor outside the groups.
    np.testing.assert_allclose(updates["classifier"]["kernel"], -1e-2, rtol=1e-4)
    np.testing.assert_allclose(updates["classifier"]["bias"], -3e-3, rtol=1e-4)
    np.testing.assert_allclose(updates["q"].a, -1e-3, rtol=1e-4)
    np.testing.assert_allclose(updates["q"].b, -4e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="multiplier of 'x' must be > 0"):
        optim.adamw(1e-3, lr_multipliers=[("x", 0.0)])
