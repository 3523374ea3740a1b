"""DoRA and QDoRA: the output and gradients against the written-out formula, merging,
layer types, nn.scan, a quantized base, exports."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank as lr
from lowrank.train import export


def _randomize(adapters, key, scale=0.3):
    """Non-zero A, B and magnitude perturbations everywhere (magnitudes stay positive)."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([
        x * (1 + 0.2 * jax.random.uniform(k, x.shape, x.dtype)) if x.ndim == 1
        else scale * jax.random.normal(k, x.shape, x.dtype)
        for k, x in zip(keys, leaves, strict=True)
    ])


def _dora_dense(x, w, bias, a, b, m, s):
    """PEFT's DoRA Linear written out: the merged weight m * V / ||V||_col, V = W + s A B,
    the norm a constant for the gradient."""
    v = w + s * a @ b
    norm = jax.lax.stop_gradient(jnp.linalg.norm(v, axis=0))
    return x @ (m / norm * v) + bias


def _dense_case(dtype=jnp.float32):
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(0), (7, 6), dtype)
    params = model.init(jax.random.key(1), x)["params"]
    spec = lr.LoraSpec(rank=3, alpha=6.0, method="dora")
    adapters = _randomize(lr.init_adapters(jax.random.key(2), params, spec), jax.random.key(3))
    return model, x, params, adapters


def test_magnitude_starts_at_the_column_norm_of_the_weight_so_the_model_is_unchanged():
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(0), (7, 6))
    params = model.init(jax.random.key(1), x)["params"]
    adapters = lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(rank=3, method="dora"))
    leaf = adapters["kernel"]
    assert isinstance(leaf, lr.DoraPair) and leaf.magnitude.shape == (5,)
    np.testing.assert_allclose(leaf.magnitude, np.linalg.norm(params["kernel"], axis=0),
                               rtol=1e-6)
    np.testing.assert_allclose(lr.apply(model, params, adapters, x),
                               model.apply({"params": params}, x), rtol=1e-5, atol=1e-6)


def test_output_and_gradients_equal_the_written_out_formula():
    model, x, params, adapters = _dense_case()
    leaf = adapters["kernel"]
    w, bias, s = params["kernel"], params["bias"], leaf.scale
    ours = lambda t: lr.apply(model, params, t, x)  # noqa: E731
    ref = lambda a, b, m: _dora_dense(x, w, bias, a, b, m, s)  # noqa: E731
    np.testing.assert_allclose(ours(adapters), ref(leaf.a, leaf.b, leaf.magnitude),
                               rtol=1e-5, atol=1e-5)

    grads = jax.grad(lambda t: (ours(t) ** 2).sum())(adapters)["kernel"]
    ga, gb, gm = jax.grad(lambda a, b, m: (ref(a, b, m) ** 2).sum(), argnums=(0, 1, 2))(
        leaf.a, leaf.b, leaf.magnitude)
    for got, want in ((grads.a, ga), (grads.b, gb), (grads.magnitude, gm)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # and a central finite difference of the magnitude alone (its gradient is exact: the
    # norm does not depend on it)
    direction = jax.random.normal(jax.random.key(9), leaf.magnitude.shape)
    f = lambda t: float((np.asarray(ours({"kernel": leaf.replace(  # noqa: E731
        magnitude=leaf.magnitude + t * direction)}), np.float64) ** 2).sum())
    fd = (f(1e-2) - f(-1e-2)) / 2e-2
    assert abs(fd - float((gm * direction).sum())) <= 2e-3 * max(1.0, abs(fd))


def test_merged_forward_equals_factored():
    model, x, params, adapters = _dense_case()
    merged = lr.merge(params, adapters)
    np.testing.assert_allclose(model.apply({"params": merged}, x),
                               lr.apply(model, params, adapters, x), rtol=1e-5, atol=1e-5)
    # the merged weight's column norms are the magnitudes
    np.testing.assert_allclose(np.linalg.norm(merged["kernel"], axis=0),
                               adapters["kernel"].magnitude, rtol=1e-5)
    with pytest.raises(ValueError, match="DoRA update cannot be taken back out"):
        lr.unmerge(merged, adapters)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(64, name="up")(x)
        return x + nn.Dense(x.shape[-1], name="down")(nn.gelu(h))


def test_gradient_never_forms_a_full_weight_gradient():
    # The only kernel-shaped products are the detached A B of the norm (contracting over the
    # rank); none contracts over the tokens, as a weight gradient would.
    model, x = Block(), jax.random.normal(jax.random.key(0), (3, 5, 32))  # 15 tokens
    params = model.init(jax.random.key(1), x)["params"]
    adapters = lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(rank=4, method="dora"))
    kernel_shapes = {tuple(w.shape) for p, w in lr.paths.flatten(params).items() if "kernel" in p}

    def token_contractions(jaxpr):
        count = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and tuple(
                    eqn.outvars[0].aval.shape) in kernel_shapes:
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                sizes = [eqn.invars[0].aval.shape[d] for d in lhs_contract]
                count += sizes != [4]
            for value in eqn.params.values():
                sub = getattr(value, "jaxpr", value)
                if hasattr(sub, "eqns"):
                    count += token_contractions(sub)
        return count

    full = jax.make_jaxpr(jax.grad(lambda p: model.apply({"params": p}, x).sum()))(params)
    dora = jax.make_jaxpr(jax.grad(lambda a: lr.apply(model, params, a, x).sum()))(adapters)
    assert token_contractions(full.jaxpr) >= 2
    assert token_contractions(dora.jaxpr) == 0


class Mixed(nn.Module):
    """DenseGeneral with several input and output axes, and an Einsum with a head axis
    shared by input and output, both with biases."""

    @nn.compact
    def __call__(self, x):
        x = nn.DenseGeneral((3, 4), name="to_heads")(x)  # [b, t, 3, 4]
        x = nn.Einsum((3, 4, 5), "bthd,hdk->bhtk", name="per_head")(x)  # output reordered
        return nn.DenseGeneral(8, axis=(-3, -1), name="from_heads")(x)  # [b, t, 8]


class Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(6, (3, 3), padding="SAME", name="conv")(x)


@pytest.mark.parametrize("model, x", [
    (Mixed(), jax.random.normal(jax.random.key(5), (2, 4, 8))),
    (Conv(), jax.random.normal(jax.random.key(6), (2, 5, 5, 4))),
], ids=["dense_general_einsum", "conv"])
def test_every_kernel_layer_type_merges_to_the_factored_output(model, x):
    params = model.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda v: v + 0.1, params)  # non-zero biases
    layouts = lr.discover_layouts(model, params, x)
    spec = lr.LoraSpec(rank=2, alpha=4.0, method="dora")
    adapters = _randomize(lr.init_adapters(jax.random.key(1), params, spec, layouts=layouts),
                          jax.random.key(2))
    np.testing.assert_allclose(lr.apply(model, params, adapters, x),
                               model.apply({"params": lr.merge(params, adapters)}, x),
                               rtol=1e-4, atol=1e-5)


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(x.shape[-1], name="dense")(jnp.tanh(x)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        body = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)
        return body(name="layers")(x, None)[0]


def test_scanned_layers_get_a_magnitude_slice_each():
    x = jax.random.normal(jax.random.key(0), (4, 8))
    model = Scanned()
    params = model.init(jax.random.key(1), x)["params"]
    layouts = lr.discover_layouts(model, params, x)
    adapters = lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(rank=2, method="dora"),
                                layouts=layouts)
    leaf = adapters["layers"]["dense"]["kernel"]
    assert leaf.magnitude.shape == (3, 8)
    np.testing.assert_allclose(leaf.magnitude,
                               np.linalg.norm(params["layers"]["dense"]["kernel"], axis=1),
                               rtol=1e-6)
    adapters = _randomize(adapters, jax.random.key(3))
    np.testing.assert_allclose(lr.apply(model, params, adapters, x),
                               model.apply({"params": lr.merge(params, adapters)}, x),
                               rtol=1e-5, atol=1e-5)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(48, name="fc2")(nn.gelu(nn.Dense(96, name="fc1")(x)))


@pytest.mark.parametrize("fmt, double_quant", [("nf4", True), ("int8", False)])
def test_qdora_gradients_equal_dora_over_the_dequantized_base(fmt, double_quant):
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (16, 64))
    y = jax.random.normal(jax.random.key(1), (16, 48))
    params = model.init(jax.random.key(2), x)["params"]
    frozen = lr.quantize_tree(params, lr.QuantSpec(fmt, double_quant=double_quant))
    dequantized = lr.dequantize_tree(frozen)
    spec = lr.LoraSpec(rank=4, method="dora")
    adapters = lr.init_adapters(jax.random.key(3), frozen, spec)
    # the magnitude starts at the norm of the weight the layer really runs with
    np.testing.assert_allclose(adapters["fc1"]["kernel"].magnitude,
                               np.linalg.norm(dequantized["fc1"]["kernel"], axis=0), rtol=1e-5)
    adapters = _randomize(adapters, jax.random.key(4), scale=0.05)

    def grads(base):
        loss = lambda a: jnp.mean((lr.apply(model, base, a, x) - y) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(adapters)

    (lq, gq), (lf, gf) = grads(frozen), grads(dequantized)
    np.testing.assert_allclose(lq, lf, rtol=1e-5, atol=1e-5)
    for u, v in zip(jax.tree.leaves(gq), jax.tree.leaves(gf), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)


def test_dropout_follows_peft_and_is_off_at_evaluation():
    model = nn.Dense(9)  # more outputs than inputs, so the dropped input can be solved for
    x = jax.random.normal(jax.random.key(0), (7, 4))
    params = model.init(jax.random.key(1), x)["params"]
    spec = lr.LoraSpec(rank=3, alpha=6.0, method="dora", dropout=0.5)
    adapters = _randomize(lr.init_adapters(jax.random.key(2), params, spec), jax.random.key(3))
    leaf, w, bias = adapters["kernel"], params["kernel"], params["bias"]
    np.testing.assert_allclose(lr.apply(model, params, adapters, x),
                               _dora_dense(x, w, bias, leaf.a, leaf.b, leaf.magnitude,
                                           leaf.scale), rtol=1e-5, atol=1e-5)
    train = lr.apply(model, params, adapters, x, lora_rng=jax.random.key(7))
    # PEFT: x W + b + (g - 1) xd W + g s (xd A) B with one dropped input xd for both terms,
    # so train - (x W + b) = xd @ M: solve for xd and check it is x with entries dropped.
    v = w + leaf.scale * leaf.a @ leaf.b
    g = leaf.magnitude / jnp.linalg.norm(v, axis=0)
    m = np.asarray((g - 1) * w + g * (leaf.scale * leaf.a @ leaf.b), np.float64)
    extra = np.asarray(train - (x @ w + bias), np.float64)
    xd = np.linalg.lstsq(m.T, extra.T, rcond=None)[0].T
    ratio = xd / np.asarray(x, np.float64)  # inverted dropout at 0.5: each entry 0 or 2
    dropped, kept = np.isclose(ratio, 0.0, atol=1e-3), np.isclose(ratio, 2.0, atol=1e-3)
    assert np.all(dropped | kept) and 0 < dropped.mean() < 1


def test_rules_choose_the_method_per_weight_first_match_wins():
    model = Block()
    x = jnp.ones((2, 32))
    params = model.init(jax.random.key(0), x)["params"]
    spec = lr.LoraSpec(rank=4, rules=[(r"up/.*", lr.DoRA(rank=2, alpha=2.0)),
                                      (r".*", lr.LoRA(rank=3))])
    adapters = lr.init_adapters(jax.random.key(1), params, spec)
    assert isinstance(adapters["up"]["kernel"], lr.DoraPair)
    assert adapters["up"]["kernel"].rank == 2
    assert type(adapters["down"]["kernel"]) is lr.LoraPair and adapters["down"]["kernel"].rank == 3
    with pytest.raises(ValueError, match="pattern 'mlp/.*' matches no target"):
        lr.init_adapters(jax.random.key(1), params,
                         lr.LoraSpec(rules=[(r"mlp/.*", lr.DoRA(rank=2))]))
    with pytest.raises(ValueError, match="not a method object"):
        lr.LoraSpec(rules=[(r".*", 4)])
    with pytest.raises(ValueError, match="LoraSpec.method 'vera2'"):
        lr.LoraSpec(method="vera2")


def test_export_and_checkpoint_summary_ask_the_leaf(tmp_path):
    from lowrank.train import checkpoint

    model, x, params, adapters = _dense_case()
    back = export.load_adapters(export.export_adapters(tmp_path, adapters))
    assert isinstance(back["kernel"], lr.DoraPair)
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(u, v)
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    summary = checkpoint.adapter_summary(adapters)["kernel"]
    assert summary == {"rank": 3, "a": [6, 3], "b": [3, 5], "magnitude": [5], "scale": 2.0,
                       "kind": "dora"}


def _wide(layers):
    class Wide(nn.Module):
        @nn.compact
        def __call__(self, x):
            body = nn.scan(_ScanBlock, variable_axes={"params": 0},
                           split_rngs={"params": True}, length=layers)
            return body(name="layers")(x, None)[0]

    return Wide()


def test_qdora_backward_keeps_no_dequantized_kernels():
    # As QLoRA: 512 x 512 nf4 kernels under nn.scan, kept as float32 residuals, would add
    # 1 MiB of the gradient's temporaries per layer. DoRA's norm dequantizes once more in the
    # forward pass, detached, so its extra kernel-sized temporaries are one layer's at a time
    # (measured: 3.2 MiB at 4 and 8 layers, QLoRA 1.1-1.2 MiB), never one per layer.
    def temp_bytes(layers):
        model, x = _wide(layers), jnp.ones((4, 512))
        params = model.init(jax.random.key(0), x)["params"]
        layouts = lr.discover_layouts(model, params, x)
        frozen = lr.quantize_tree(params, lr.QuantSpec("nf4", double_quant=True),
                                  layouts=layouts)
        adapters = lr.init_adapters(jax.random.key(1), frozen,
                                    lr.LoraSpec(rank=4, method="dora"), layouts=layouts)
        loss = lambda a: jnp.sum(lr.apply(model, frozen, a, x) ** 2)  # noqa: E731
        compiled = jax.jit(jax.grad(loss)).lower(adapters).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    kernel = 512 * 512 * 4
    small, large = temp_bytes(4), temp_bytes(8)
    assert large - small < kernel / 2  # nothing kernel-sized per layer
    assert large < 8 * kernel / 2


def test_stacked_dora_members_equal_their_own_runs():
    # Ranks and scales differ (the stack pads B and A and multiplies B by each member's
    # scale); the magnitudes are stacked as they are.
    from lowrank import stack
    from lowrank.train import default_config, load_task, train

    def config(seed, rank, alpha):
        c = default_config()
        c.steps, c.batch_size, c.quiet, c.seed = 3, 8, True, seed
        c.lora.targets, c.lora.method, c.lora.rank, c.lora.alpha = r"hidden_\d+/kernel", \
            "dora", rank, alpha
        return c

    configs = [config(0, 2, 4.0), config(1, 4, 4.0)]
    task = load_task(configs[0])
    stacked = stack.train_stacked(configs, task)
    for s, c in zip(stacked, configs, strict=True):
        alone = train(c, task)
        assert isinstance(s.trainable["hidden_0"]["kernel"], lr.DoraPair)
        assert jax.tree.structure(s.trainable) == jax.tree.structure(alone.trainable)
        for u, v in zip(jax.tree.leaves(s.trainable), jax.tree.leaves(alone.trainable),
                        strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)
        magnitude = s.trainable["hidden_0"]["kernel"].magnitude
        start = np.linalg.norm(task.params["hidden_0"]["kernel"], axis=0)
        assert np.abs(np.asarray(magnitude) - start).max() > 1e-4  # it trained


def test_dora_on_an_embedding_is_refused_by_name():
    class Embedder(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Embed(20, 8, name="embed")(ids)

    model, ids = Embedder(), jnp.array([[1, 2, 3]])
    params = model.init(jax.random.key(0), ids)["params"]
    adapters = lr.init_adapters(jax.random.key(1), params,
                                lr.LoraSpec(rank=2, targets=r".*embedding", method="dora"))
    with pytest.raises(lr.UnsupportedLayer, match="'embed/embedding': Embed.__call__ has no "
                                                  "per-output-unit form"):
        lr.apply(model, params, adapters, ids)
