"""Forward-mode autodiff through the models: inside ``lowrank.forward_mode()`` ``jax.jvp`` and
``jax.jacfwd`` work through BERT and Llama (grouped-query attention) with LoRA adapters, and
agree with the hand-written reverse-mode backward passes they replace; outside it forward mode
still raises JAX's custom_vjp error (the fast path is the default)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models_lora import ALL_LLAMA_LINEAR, inputs_of, randomize_b, run

import lowrank as lr
from lowrank import models, paths

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
CASES = [("tiny_bert", r".*/(query|value)/kernel"), ("tiny_llama", ALL_LLAMA_LINEAR)]


def _setup(name, targets):
    model, params = models.from_pretrained(FIXTURES / name)
    adapters = randomize_b(lr.init_adapters(jax.random.key(0), params,
                                            lr.LoraSpec(rank=2, alpha=4, targets=targets)),
                           jax.random.key(1))
    x = inputs_of(name)

    def loss(trainable):
        return jnp.mean(jnp.sin(run(model, params, trainable, *x)))

    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    direction = jax.tree.unflatten(
        treedef, [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(
            keys, leaves, strict=True)])
    return loss, adapters, direction


def _dot(a, b):
    return sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                     strict=True))


@pytest.mark.parametrize("name, targets", CASES)
def test_jvp_equals_the_custom_reverse_mode_gradient(name, targets):
    loss, adapters, direction = _setup(name, targets)
    fast_grad = jax.jit(jax.grad(loss))(adapters)  # the hand-written backward passes
    with lr.forward_mode():  # traced (jitted) inside the block
        value, tangent = jax.jit(lambda p, d: jax.jvp(loss, (p,), (d,)))(adapters, direction)
        plain_grad = jax.jit(jax.grad(loss))(adapters)  # JAX's derivative of the same forward
    np.testing.assert_allclose(float(value), float(jax.jit(loss)(adapters)), rtol=1e-6)
    np.testing.assert_allclose(float(tangent), _dot(fast_grad, direction), rtol=1e-4,
                               atol=1e-7)
    for fast, plain in zip(jax.tree.leaves(fast_grad), jax.tree.leaves(plain_grad),
                           strict=True):
        np.testing.assert_allclose(plain, fast, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name, targets", CASES)
def test_jacfwd_equals_jacrev_through_a_model(name, targets):
    loss, adapters, _ = _setup(name, targets)
    first = next(iter(paths.flatten(adapters)))

    def of_b(b):  # the output's derivative in one adapter's B, a small Jacobian
        flat = paths.flatten(adapters)
        flat[first] = flat[first].replace(b=b)
        return loss(paths.unflatten(flat))

    b = paths.flatten(adapters)[first].b
    with lr.forward_mode():
        forward = jax.jit(jax.jacfwd(of_b))(b)
    reverse = jax.jit(jax.jacrev(of_b))(b)
    np.testing.assert_allclose(forward, reverse, rtol=1e-4, atol=1e-7)


def test_forward_mode_outside_the_block_raises_and_the_block_nests():
    loss, adapters, direction = _setup(*CASES[0])
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(loss, (adapters,), (direction,))
    with lr.forward_mode():
        with lr.forward_mode(False):
            assert lr.autodiff.custom_backward()
        assert not lr.autodiff.custom_backward()
    assert lr.autodiff.custom_backward()
