"""QLoRA on NNX models: gradients over a 4-bit base equal those over its dequantized copy
(looped and nnx.scan stacks, every layer type), and the backward pass keeps no float kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank as lr
from lowrank import quant
from tests.test_lora_core import _randomize
from tests.test_nnx_core import CASES, MLP, Scanned, _setup


def _nonzero_b(adapters, key):
    return jax.tree.map(
        lambda leaf: leaf.replace(b=0.1 * jax.random.normal(key, leaf.b.shape, leaf.b.dtype)),
        adapters, is_leaf=lambda v: isinstance(v, lr.LoraPair))


def _grads(model, frozen, adapters, x, y):
    loss = lambda a: jnp.mean((lr.apply(model, frozen, a, x) - y) ** 2)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(adapters)


@pytest.mark.parametrize("stacked", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_qlora_gradients_equal_those_over_the_dequantized_base(stacked):
    x, y = jax.random.normal(jax.random.key(0), (16, 64)), None
    model = Scanned(64, 3, nnx.Rngs(2)) if stacked else MLP(nnx.Rngs(2))
    y = jax.random.normal(jax.random.key(1), model(x).shape)
    params = lr.nnx.params(model)
    layouts = lr.discover_layouts(model, params, x)
    frozen = lr.quantize_tree(params, lr.QuantSpec("nf4", double_quant=True), layouts=layouts)
    kernels = [v for p, v in lr.paths.flatten(frozen).items() if p.endswith("kernel")]
    assert kernels and all(quant.is_quantized(k) for k in kernels)
    adapters = lr.init_adapters(jax.random.key(3), frozen, lr.LoraSpec(rank=4), layouts=layouts)
    adapters = _nonzero_b(adapters, jax.random.key(4))

    loss_q, grads_q = _grads(model, frozen, adapters, x, y)
    loss_f, grads_f = _grads(model, lr.dequantize_tree(frozen, jnp.float32), adapters, x, y)
    assert float(loss_q) == pytest.approx(float(loss_f), rel=1e-6)
    for u, v in zip(jax.tree.leaves(grads_q), jax.tree.leaves(grads_f), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)
    _, grads_exact = _grads(model, params, adapters, x, y)  # the base really is quantized
    assert max(float(jnp.abs(u - v).max()) for u, v in zip(
        jax.tree.leaves(grads_q), jax.tree.leaves(grads_exact), strict=True)) > 1e-5


def test_a_quantized_base_of_every_layer_type_equals_its_dequantized_base():
    for name in sorted(CASES):
        model, x, params, adapters = _setup(name)
        layouts = lr.discover_layouts(model, params, x)
        frozen = lr.quantize_tree(params, lr.QuantSpec("nf4", extra="embed/embedding"),
                                  layouts=layouts)
        kernels = [p for p, v in lr.paths.flatten(frozen).items() if quant.is_quantized(v)]
        assert len(kernels) == (5 if name == "mixed" else 1), kernels
        adapters = _randomize(adapters, jax.random.key(2))
        run = jax.jit(lambda f, a, model=model, x=x: lr.apply(model, f, a, x))
        np.testing.assert_allclose(
            run(frozen, adapters), run(lr.dequantize_tree(frozen, jnp.float32), adapters),
            rtol=1e-5, atol=1e-5, err_msg=name)


def test_qlora_backward_recomputes_the_dequantized_kernels_instead_of_keeping_them():
    # As tests/test_quant_qlora.py for linen: four 512 x 512 nf4 kernels in an nnx.scan stack
    # would take 4 MiB as float32 residuals of the gradient.
    model, x = Scanned(512, 4, nnx.Rngs(0)), jnp.ones((4, 512))
    params = lr.nnx.params(model)
    layouts = lr.discover_layouts(model, params, x)
    frozen = lr.quantize_tree(params, lr.QuantSpec("nf4", double_quant=True), layouts=layouts)
    adapters = lr.init_adapters(jax.random.key(1), params, lr.LoraSpec(rank=4), layouts=layouts)

    def grad_temp_bytes(base):
        loss = lambda a: jnp.sum(lr.apply(model, base, a, x) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(adapters).compile().memory_analysis() \
            .temp_size_in_bytes

    assert grad_temp_bytes(frozen) < 4 * 512 * 512 * 4 / 2
