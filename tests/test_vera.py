"""VeRA: outputs and gradients against the written-out formula, shared projections, merging,
nn.scan, a quantized base, train(config), exports; what it refuses."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank as lr
from lowrank.train import export
from lowrank.vera import projections


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="fc2")(nn.gelu(nn.Dense(12, name="fc1")(x)))


def _setup(rank=4, **spec):
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (7, 6))
    params = model.init(jax.random.key(1), x)["params"]
    adapters = lr.init_adapters(jax.random.key(2), params,
                                lr.LoraSpec(rank=rank, method="vera", **spec))
    # lambda_b = 0 at init hides the adapter: give both vectors real values
    adapters = jax.tree.map(
        lambda v: v + 0.5 * jax.random.normal(jax.random.key(v.size), v.shape), adapters)
    return model, x, params, adapters


def test_init_is_peft_s_and_the_projections_are_shared_and_sliced():
    model = MLP()
    x = jnp.ones((1, 6))
    params = model.init(jax.random.key(1), x)["params"]
    adapters = lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(rank=4, method="vera"))
    fc1, fc2 = adapters["fc1"]["kernel"], adapters["fc2"]["kernel"]
    np.testing.assert_array_equal(fc1.lambda_d, np.full(4, 0.1, np.float32))
    np.testing.assert_array_equal(fc2.lambda_b, np.zeros(5, np.float32))
    assert (fc1.max_in, fc1.max_out) == (fc2.max_in, fc2.max_out) == (12, 12)  # the largest
    assert sum(v.size for v in jax.tree.leaves(adapters)) == (4 + 12) + (4 + 5)
    np.testing.assert_array_equal(lr.apply(model, params, adapters, x),
                                  model.apply({"params": params}, x))


def _vera_dense(x, w, bias, lambda_d, lambda_b, a, b):
    """PEFT's VeRA Linear: lambda_b * ((lambda_d * (x A^T)) B^T), A [r, in], B [out, r]."""
    return x @ w + bias + lambda_b * ((lambda_d * (x @ a.T)) @ b.T)


def test_output_and_gradients_equal_the_written_out_formula():
    model, x, params, adapters = _setup()
    leaf = adapters["fc1"]["kernel"]
    a_ours, b_ours = projections(leaf.seed, 4, leaf.max_in, leaf.max_out)
    a, b = a_ours.T[:, :6], b_ours.T[:12]  # PEFT's layout, sliced to fc1
    w, bias = params["fc1"]["kernel"], params["fc1"]["bias"]

    class FC1(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(12, name="fc1")(x)

    fc1 = FC1()
    ours = lambda t: lr.apply(fc1, {"fc1": params["fc1"]}, {"fc1": t}, x)  # noqa: E731
    ref = lambda d, bb: _vera_dense(x, w, bias, d, bb, a, b)  # noqa: E731
    np.testing.assert_allclose(ours(adapters["fc1"]), ref(leaf.lambda_d, leaf.lambda_b),
                               rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda t: (ours(t) ** 2).sum())(adapters["fc1"])["kernel"]
    gd, gb = jax.grad(lambda d, bb: (ref(d, bb) ** 2).sum(), argnums=(0, 1))(
        leaf.lambda_d, leaf.lambda_b)
    np.testing.assert_allclose(grads.lambda_d, gd, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads.lambda_b, gb, rtol=1e-5, atol=1e-5)
    # a central finite difference along lambda_d (the output is linear in it)
    direction = jax.random.normal(jax.random.key(5), (4,))
    f = lambda t: float((np.asarray(ours({"kernel": leaf.replace(  # noqa: E731
        lambda_d=leaf.lambda_d + t * direction)}), np.float64) ** 2).sum())
    fd = (f(1e-2) - f(-1e-2)) / 2e-2
    assert abs(fd - float((gd * direction).sum())) <= 2e-3 * max(1.0, abs(fd))


def test_merged_forward_equals_factored_and_unmerge_restores_the_base():
    model, x, params, adapters = _setup()
    merged = lr.merge(params, adapters)
    np.testing.assert_allclose(model.apply({"params": merged}, x),
                               lr.apply(model, params, adapters, x), rtol=1e-5, atol=1e-5)
    back = lr.unmerge(merged, adapters)
    np.testing.assert_allclose(back["fc2"]["kernel"], params["fc2"]["kernel"], atol=1e-6)


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


def test_scanned_layers_and_a_quantized_base():
    x = jax.random.normal(jax.random.key(0), (4, 64))
    model = Scanned()
    params = model.init(jax.random.key(1), x)["params"]
    layouts = lr.discover_layouts(model, params, x)
    adapters = lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(rank=8, method="vera"),
                                layouts=layouts)
    assert adapters["layers"]["dense"]["kernel"].lambda_b.shape == (3, 64)
    adapters = jax.tree.map(lambda v: v + 0.1, adapters)
    np.testing.assert_allclose(lr.apply(model, params, adapters, x),
                               model.apply({"params": lr.merge(params, adapters)}, x),
                               rtol=1e-5, atol=1e-5)
    frozen = lr.quantize_tree(params, lr.QuantSpec("nf4"), layouts=layouts)

    def grads(base):
        return jax.grad(lambda a: (lr.apply(model, base, a, x) ** 2).mean())(adapters)

    for u, v in zip(jax.tree.leaves(grads(frozen)),
                    jax.tree.leaves(grads(lr.dequantize_tree(frozen))), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)


def test_trains_from_the_config_exports_and_is_refused_where_it_cannot_go(tmp_path):
    from lowrank import stack
    from lowrank.train import default_config, train

    config = default_config()
    config.steps, config.batch_size, config.quiet, config.lora.method = 3, 8, True, "vera"
    config.lora.rank = 16
    result = train(config)
    leaf = result.trainable["hidden_0"]["kernel"]
    assert isinstance(leaf, lr.VeraAdapter) and np.abs(np.asarray(leaf.lambda_b)).max() > 0
    back = export.load_adapters(export.export_adapters(tmp_path, result.trainable))
    assert jax.tree.structure(back) == jax.tree.structure(result.trainable)
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(result.trainable), strict=True):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match="VeRA adapts Dense-like kernels"):
        class Conv(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Conv(3, (3, 3), name="conv")(x)

        images = jnp.ones((1, 5, 5, 2))
        p = Conv().init(jax.random.key(0), images)["params"]
        lr.init_adapters(jax.random.key(1), p, lr.LoraSpec(method="vera", rank=2),
                         layouts=lr.discover_layouts(Conv(), p, images))
    with pytest.raises(ValueError, match="members' adapters at .* cannot be stacked"):
        stack.train_stacked([config, config], None)


def test_peft_files_refuse_vera_by_name(tmp_path):
    from pathlib import Path

    from lowrank import models
    from lowrank.interop import peft
    model, params = models.from_pretrained(Path(__file__).parent / "fixtures" / "hf" /
                                           "tiny_llama")
    spec = lr.LoraSpec(rank=4, targets=r".*/q_proj/kernel", method="vera")
    adapters = lr.init_adapters(jax.random.key(0), params, spec)
    with pytest.raises(ValueError, match="VeraAdapter \\(vera\\): PEFT LoRA files hold LoRA and "
                                         "DoRA adapters only"):
        peft.save(tmp_path, spec, adapters, model)
