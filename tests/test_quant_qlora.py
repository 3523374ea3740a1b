"""QLoRA: LoRA adapters trained through a quantized frozen base (lr.apply dequantizes)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank as lr
from lowrank import quant


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(96, name="fc1")(x))
        return nn.Dense(48, name="fc2")(x)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(x.shape[-1], name="dense")(jnp.tanh(x)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        body = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)
        return body(name="layers")(x, None)[0]


def _nonzero_b(adapters, key):
    # Fresh adapters have B = 0, which hides half of the gradient; give B real values.
    def fill(leaf):
        if isinstance(leaf, lr.LoraPair):
            return leaf.replace(b=0.1 * jax.random.normal(key, leaf.b.shape, leaf.b.dtype))
        return leaf

    return jax.tree.map(fill, adapters, is_leaf=lambda x: isinstance(x, lr.LoraPair))


def _adapter_grads(model, frozen, adapters, x, y):
    def loss(a):
        return jnp.mean((lr.apply(model, frozen, a, x) - y) ** 2)

    return jax.jit(jax.value_and_grad(loss))(adapters)


def _assert_trees_close(a, b, tol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol)


@pytest.mark.parametrize("fmt, double_quant", [("nf4", True), ("int8", False)])
def test_mlp_adapter_gradients_through_the_quantized_base(fmt, double_quant):
    model, x = MLP(), jax.random.normal(jax.random.key(0), (16, 64))
    y = jax.random.normal(jax.random.key(1), (16, 48))
    params = model.init(jax.random.key(2), x)["params"]
    frozen = quant.quantize_tree(params, quant.QuantSpec(fmt, double_quant=double_quant))
    assert all(quant.is_quantized(frozen[name]["kernel"]) for name in ("fc1", "fc2"))
    adapters = lr.init_adapters(jax.random.key(3), params, lr.LoraSpec(rank=4))
    adapters = _nonzero_b(adapters, jax.random.key(4))

    loss_q, grads_q = _adapter_grads(model, frozen, adapters, x, y)
    loss_f, grads_f = _adapter_grads(model, quant.dequantize_tree(frozen, jnp.float32),
                                     adapters, x, y)
    assert float(loss_q) == pytest.approx(float(loss_f), rel=1e-6)
    _assert_trees_close(grads_q, grads_f, 1e-5)
    # The base really is the quantized one: the float base gives different gradients.
    _, grads_exact = _adapter_grads(model, params, adapters, x, y)
    diff = max(float(jnp.abs(u - v).max())
               for u, v in zip(jax.tree.leaves(grads_q), jax.tree.leaves(grads_exact), strict=True))
    assert diff > 1e-5


@pytest.mark.parametrize("how", ["discovered", "regex"])
def test_scanned_stack_adapter_gradients_through_the_quantized_base(how):
    model, x = Scanned(), jax.random.normal(jax.random.key(0), (8, 64))
    y = jax.random.normal(jax.random.key(1), (8, 64))
    params = model.init(jax.random.key(2), x)["params"]
    layouts = lr.discover_layouts(model, params, x)
    if how == "discovered":
        frozen = quant.quantize_tree(params, quant.QuantSpec("nf4", double_quant=True),
                                     layouts=layouts)
    else:
        frozen = quant.quantize_tree(params, quant.QuantSpec("nf4", double_quant=True,
                                                             stacked=r"layers/.*"))
    q = frozen["layers"]["dense"]["kernel"]
    assert q.lead_shape == (3,) and q.shape == (64, 64) and q.absmax_offset.shape == (3,)
    adapters = lr.init_adapters(jax.random.key(3), params, lr.LoraSpec(rank=4), layouts=layouts)
    adapters = _nonzero_b(adapters, jax.random.key(4))

    out_q = lr.apply(model, frozen, adapters, x)
    out_f = lr.apply(model, quant.dequantize_tree(frozen, jnp.float32), adapters, x)
    np.testing.assert_allclose(out_q, out_f, rtol=1e-6, atol=1e-6)
    _, grads_q = _adapter_grads(model, frozen, adapters, x, y)
    _, grads_f = _adapter_grads(model, quant.dequantize_tree(frozen, jnp.float32), adapters, x, y)
    _assert_trees_close(grads_q, grads_f, 1e-5)
    assert bool((jnp.abs(grads_q["layers"]["dense"]["kernel"].a).sum(axis=(1, 2)) > 0).all())


def test_init_adapters_reads_shapes_and_dtypes_off_a_quantized_base():
    model = nn.Dense(64)
    params = model.init(jax.random.key(0), jnp.ones((1, 128)))["params"]
    frozen = lr.quantize_tree(params, lr.QuantSpec("nf4"))
    assert lr.is_quantized(frozen["kernel"])
    adapters = lr.init_adapters(jax.random.key(1), frozen, lr.LoraSpec(rank=4))
    assert adapters["kernel"].a.shape == (128, 4) and adapters["kernel"].a.dtype == jnp.float32
    with pytest.raises(ValueError, match="'kernel' is quantized"):
        lr.init_adapters(jax.random.key(1), frozen,
                              lr.LoraSpec(targets=None, trainable="kernel"))


def test_backward_recomputes_the_dequantized_kernels_instead_of_keeping_them():
    # Four 512 x 512 nf4 kernels under nn.scan: kept as float32 residuals they would take
    # 4 MiB of the gradient's temporaries; recomputed, about one layer's 1 MiB at a time.
    class Wide(nn.Module):
        @nn.compact
        def __call__(self, x):
            body = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=4)
            return body(name="layers")(x, None)[0]

    model, x = Wide(), jnp.ones((4, 512))
    params = model.init(jax.random.key(0), x)["params"]
    layouts = lr.discover_layouts(model, params, x)
    frozen = quant.quantize_tree(params, quant.QuantSpec("nf4", double_quant=True),
                                 layouts=layouts)
    adapters = lr.init_adapters(jax.random.key(1), params, lr.LoraSpec(rank=4), layouts=layouts)

    def grad_temp_bytes(base):
        loss = lambda a: jnp.sum(lr.apply(model, base, a, x) ** 2)  # noqa: E731
        compiled = jax.jit(jax.grad(loss)).lower(adapters).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    stacked_float_bytes = 4 * 512 * 512 * 4
    assert grad_temp_bytes(frozen) < stacked_float_bytes / 2
    # The float base's gradient needs no kernel copies either: the bound above is not loose.
    assert grad_temp_bytes(quant.dequantize_tree(frozen, jnp.float32)) < stacked_float_bytes / 2


class _Tied(nn.Module):
    """Looks tokens up in an embedding and reads logits off the same table (tied head)."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(128, 64, name="embed")
        return embed.attend(nn.Dense(64, name="mix")(embed(ids)))


def test_a_quantized_embedding_table_runs_in_lookup_and_attend():
    model, ids = _Tied(), jnp.arange(12).reshape(2, 6)
    params = model.init(jax.random.key(0), ids)["params"]
    frozen = quant.quantize_tree(params, quant.QuantSpec("nf4", extra=r"embed/embedding"))
    assert quant.is_quantized(frozen["embed"]["embedding"])
    plain = quant.dequantize_tree(frozen, jnp.float32)
    spec = lr.LoraSpec(rank=4, targets=r".*(embedding|kernel)")
    adapters = _nonzero_b(lr.init_adapters(jax.random.key(1), params, spec), jax.random.key(2))
    for trained in ({}, adapters):
        np.testing.assert_allclose(lr.apply(model, frozen, trained, ids),
                                   lr.apply(model, plain, trained, ids), rtol=1e-5, atol=1e-5)
    y = jax.random.normal(jax.random.key(3), (2, 6, 128))
    _, grads_q = _adapter_grads(model, frozen, adapters, ids, y)
    _, grads_f = _adapter_grads(model, plain, adapters, ids, y)
    _assert_trees_close(grads_q, grads_f, 1e-5)
