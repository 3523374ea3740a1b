"""NNX models: the linen core tests again (B = 0, merging, factored gradients, stacks, QLoRA,
errors), and the same trees giving the same outputs on an NNX model and its linen twin."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank as lr
from tests.test_lora_core import _count_kernel_shaped_dots, _randomize


class Mixed(nnx.Module):
    """Every supported layer type, LinearGeneral with several input and output axes."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(50, 8, rngs=rngs)
        self.dense = nnx.Linear(8, 12, rngs=rngs)
        self.to_heads = nnx.LinearGeneral(12, (3, 4), rngs=rngs)
        self.per_head = nnx.Einsum("bthd,hdk->bthk", (3, 4, 5), rngs=rngs)  # h: a batch label
        self.from_heads = nnx.LinearGeneral((3, 5), 8, axis=(-2, -1), rngs=rngs)

    def __call__(self, ids):
        x = self.dense(self.embed(ids))
        x = self.from_heads(self.per_head(self.to_heads(x)))
        return self.embed.attend(x)


class LinenMixed(nn.Module):
    """The same model in linen, with the same parameter paths."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(50, 8, name="embed")
        x = nn.Dense(12, name="dense")(embed(ids))
        x = nn.DenseGeneral((3, 4), name="to_heads")(x)
        x = nn.Einsum((3, 4, 5), "bthd,hdk->bthk", use_bias=False, name="per_head")(x)
        x = nn.DenseGeneral(8, axis=(-2, -1), name="from_heads")(x)
        return embed.attend(x)


class Conv(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 6, (3, 3), strides=(2, 1), padding="SAME", rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class LinenConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(6, (3, 3), strides=(2, 1), padding="SAME", name="conv")(x)


IDS = jnp.array([[1, 2, 3, 4], [5, 6, 7, 49]])
IMAGES = jax.random.normal(jax.random.key(3), (2, 5, 5, 4))
CASES = {"mixed": (Mixed, LinenMixed, IDS), "conv": (Conv, LinenConv, IMAGES)}


@functools.cache  # built once for all the tests (nothing here mutates them)
def _setup(name):
    make, _, x = CASES[name]
    model = make(nnx.Rngs(0))
    params = lr.nnx.params(model)
    layouts = lr.discover_layouts(model, params, x)
    spec = lr.LoraSpec(rank=2, alpha=4.0, targets=r".*(kernel|embedding)")
    adapters = lr.init_adapters(jax.random.key(1), params, spec, layouts=layouts)
    return model, x, params, adapters


@pytest.mark.parametrize("name", sorted(CASES))
def test_zero_b_is_exactly_the_base_model_and_nonzero_b_is_not(name):
    model, x, params, adapters = _setup(name)
    base = model(x)
    np.testing.assert_array_equal(lr.apply(model, params, adapters, x), base)
    changed = lr.apply(model, params, _randomize(adapters, jax.random.key(2)), x)
    assert float(jnp.abs(changed - base).max()) > 1e-3


@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_forward_equals_factored_and_unmerge_restores_the_base(name):
    model, x, params, adapters = _setup(name)
    adapters = _randomize(adapters, jax.random.key(2))
    factored = lr.apply(model, params, adapters, x)
    merged = lr.merge(params, adapters)
    np.testing.assert_allclose(lr.nnx.with_params(model, merged)(x), factored, atol=1e-5,
                               rtol=1e-5)
    restored = lr.unmerge(merged, adapters)
    for p, w in lr.paths.flatten(params).items():
        np.testing.assert_allclose(lr.paths.flatten(restored)[p], w, atol=1e-6, err_msg=p)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_same_trees_give_the_same_output_on_the_linen_twin(name):
    """Each layer type's NNX rule computes what the linen rule computes (an independent
    model: linen's own layers, intercepted)."""
    model, x, params, adapters = _setup(name)
    linen = CASES[name][1]()
    assert jax.tree.map(jnp.shape, linen.init(jax.random.key(0), x)["params"]) == \
        jax.tree.map(jnp.shape, params)
    assert lr.discover_layouts(linen, params, x) == lr.discover_layouts(model, params, x)
    base = model(x)
    flat = lr.paths.flatten(adapters)
    randomized = lr.paths.flatten(_randomize(adapters, jax.random.key(2)))
    # every adapter on its own, then all of them: each changes the output, as in linen
    for weights in [[w] for w in sorted(flat)] + [sorted(flat)]:
        some = lr.paths.unflatten({**flat, **{w: randomized[w] for w in weights}})
        out = lr.apply(model, params, some, x)
        np.testing.assert_allclose(out, lr.apply(linen, params, some, x), atol=1e-6, rtol=1e-6,
                                   err_msg=str(weights))
        assert float(jnp.abs(out - base).max()) > 1e-4, weights


def test_params_and_with_params_leave_the_model_alone_and_name_misfits():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    kernel = np.asarray(model.kernel[...])
    params = lr.nnx.params(model)
    clone = lr.nnx.with_params(model, {"kernel": params["kernel"] + 1.0, "bias": params["bias"]})
    np.testing.assert_array_equal(model.kernel[...], kernel)
    np.testing.assert_allclose(clone.kernel[...], kernel + 1.0)
    with pytest.raises(ValueError, match="parameter 'bias' is missing"):
        lr.nnx.with_params(model, {"kernel": params["kernel"]})
    with pytest.raises(ValueError, match="'other' is not a parameter"):
        lr.nnx.with_params(model, {**params, "other": params["bias"]})
    with pytest.raises(ValueError, match="'other/kernel' is not a parameter"):
        lr.apply(model, params, {"other": {"kernel": params["kernel"]}}, jnp.ones((1, 4)))


class Block(nnx.Module):
    def __init__(self, d, rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.query, self.key, self.value, self.out = (nnx.Linear(d, d, rngs=rngs)
                                                      for _ in range(4))
        self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        h = self.ln1(x)
        q, k, v = self.query(h), self.key(h), self.value(h)
        att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1]), axis=-1)
        x = x + self.out(att @ v)
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


def test_lora_gradient_never_forms_a_full_weight_gradient():
    model, x = Block(32, nnx.Rngs(1)), jax.random.normal(jax.random.key(0), (3, 5, 32))
    params = lr.nnx.params(model)
    adapters = lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(rank=4, targets=".*kernel"))
    kernel_shapes = {tuple(w.shape) for p, w in lr.paths.flatten(params).items() if "kernel" in p}

    full = jax.make_jaxpr(jax.grad(lambda p: lr.nnx.with_params(model, p)(x).sum()))(params)
    lora = jax.make_jaxpr(jax.grad(lambda a: lr.apply(model, params, a, x).sum()))(adapters)
    assert _count_kernel_shaped_dots(full.jaxpr, kernel_shapes) >= 6  # one dW per kernel
    assert _count_kernel_shaped_dots(lora.jaxpr, kernel_shapes) == 0


class _Layer(nnx.Module):
    def __init__(self, d, rngs):
        self.dense = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        return x + self.dense(jnp.tanh(x))


class Scanned(nnx.Module):
    """Layers built with nnx.vmap (params with a leading layer axis) and run with nnx.scan."""

    def __init__(self, d, n, rngs):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(rngs):
            return _Layer(d, rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return layer(x)

        return body(x, self.layers)


class Unrolled(nnx.Module):
    def __init__(self, d, n, rngs):
        self.layers = nnx.List([_Layer(d, rngs) for _ in range(n)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _slices(tree, n):
    return {i: jax.tree.map(lambda v, i=i: v[i], tree) for i in range(n)}


def test_scanned_layers_get_one_adapter_slice_each_and_equal_the_unrolled_model():
    x = jax.random.normal(jax.random.key(0), (4, 8))
    scanned = Scanned(8, 3, nnx.Rngs(1))
    params = lr.nnx.params(scanned)
    assert params["layers"]["dense"]["kernel"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="discover_layouts"):
        lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(rank=2))
    layouts = lr.discover_layouts(scanned, params, x)
    assert layouts["layers/dense/kernel"] == lr.Factorization((), (0,), (1,))
    adapters = lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(rank=2), layouts=layouts)
    adapters = _randomize(adapters, jax.random.key(3))
    assert adapters["layers"]["dense"]["kernel"].a.shape == (3, 8, 2)

    unrolled = Unrolled(8, 3, nnx.Rngs(5))
    u_params = {"layers": _slices(params["layers"], 3)}
    u_adapters = {"layers": _slices(adapters["layers"], 3)}
    np.testing.assert_allclose(
        lr.apply(scanned, params, adapters, x), lr.apply(unrolled, u_params, u_adapters, x),
        rtol=1e-5, atol=1e-5,
    )
    grads = jax.jit(jax.grad(lambda a: lr.apply(scanned, params, a, x).sum()))(adapters)
    assert bool((jnp.abs(grads["layers"]["dense"]["kernel"].a).sum(axis=(1, 2)) > 0).all())
    # Adapter dropout draws its own mask in every layer of the stack. With one token and
    # A = B = 1, layer l's gradient of A is zero exactly at the input features its mask drops.
    ones = jax.tree.map(jnp.ones_like, lr.init_adapters(
        jax.random.key(2), params, lr.LoraSpec(rank=2, dropout=0.5), layouts=layouts))
    grad_a = jax.grad(lambda a: lr.apply(scanned, params, a, x[:1], lora_rng=jax.random.key(9))
                      .sum())(ones)["layers"]["dense"]["kernel"].a[:, :, 0]
    dropped = [tuple(np.flatnonzero(np.asarray(grad_a[i]) == 0)) for i in range(3)]
    assert all(0 < len(d) < 8 for d in dropped) and len(set(dropped)) == 3, dropped


class Twice(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.dense(x))

    def first(self, x):
        return self.dense(x)


def test_a_module_called_twice_another_method_and_jit_all_use_the_adapter():
    model, x = Twice(nnx.Rngs(1)), jax.random.normal(jax.random.key(0), (3, 4))
    params = lr.nnx.params(model)
    adapters = _randomize(lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(rank=2)),
                          jax.random.key(3))
    merged = lr.nnx.with_params(model, lr.merge(params, adapters))
    np.testing.assert_allclose(lr.apply(model, params, adapters, x), merged(x), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(lr.apply(model, params, adapters, x, method="first"),
                               merged.first(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lr.apply(model, params, adapters, x, method=Twice.first),
                               merged.first(x), rtol=1e-5, atol=1e-5)
    jitted = jax.jit(lambda p, a, x: lr.apply(model, p, a, x))
    np.testing.assert_allclose(jitted(params, adapters, x), merged(x), rtol=1e-5, atol=1e-5)


def test_dropout_only_when_training():
    model, x = nnx.Linear(16, 16, rngs=nnx.Rngs(1)), jax.random.normal(jax.random.key(0), (8, 16))
    params = lr.nnx.params(model)
    spec = lr.LoraSpec(rank=4, dropout=0.5)
    adapters = _randomize(lr.init_adapters(jax.random.key(2), params, spec), jax.random.key(3))
    evaluation = lr.apply(model, params, adapters, x)
    np.testing.assert_allclose(evaluation, lr.nnx.with_params(model, lr.merge(params, adapters))(x),
                               rtol=1e-5, atol=1e-5)
    t1 = lr.apply(model, params, adapters, x, lora_rng=jax.random.key(7))
    t2 = lr.apply(model, params, adapters, x, lora_rng=jax.random.key(8))
    assert float(jnp.abs(t1 - evaluation).max()) > 1e-3
    assert float(jnp.abs(t1 - t2).max()) > 1e-3
    # the inverted-dropout average over many masks (vmapped keys) approaches the evaluation
    many = jax.jit(jax.vmap(lambda k: lr.apply(model, params, adapters, x, lora_rng=k)))
    mean = jnp.mean(many(jax.random.split(jax.random.key(0), 400)), axis=0)
    assert float(jnp.abs(mean - evaluation).mean()) < 0.1 * float(jnp.abs(evaluation).mean())
    from_stream = lr.apply(model, params, adapters, x, lora_rng=True,
                           rngs={"dropout": jax.random.key(7)})
    assert float(jnp.abs(from_stream - evaluation).max()) > 1e-3


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1, self.fc2 = nnx.Linear(64, 96, rngs=rngs), nnx.Linear(96, 48, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x)))


def test_dora_and_vera_run_through_the_same_method_objects_on_nnx():
    model, x = MLP(nnx.Rngs(1)), jax.random.normal(jax.random.key(0), (5, 64))
    params = lr.nnx.params(model)
    spec = lr.LoraSpec(targets=".*kernel", rules=[(r"fc1/.*", lr.DoRA(rank=4, alpha=8)),
                                                  (r"fc2/.*", lr.LoRA(rank=2, alpha=4))])
    adapters = lr.init_adapters(jax.random.key(2), params, spec)
    assert isinstance(adapters["fc1"]["kernel"], lr.DoraPair)
    np.testing.assert_allclose(lr.apply(model, params, adapters, x), model(x), atol=1e-5)
    adapters = _randomize(adapters, jax.random.key(3))
    merged = lr.nnx.with_params(model, lr.merge(params, adapters))
    np.testing.assert_allclose(lr.apply(model, params, adapters, x), merged(x), rtol=1e-5,
                               atol=1e-5)
    vera = lr.init_adapters(jax.random.key(2), params,
                            lr.LoraSpec(targets=".*kernel", method="vera", rank=16))
    vera = _randomize(vera, jax.random.key(3))
    merged = lr.nnx.with_params(model, lr.merge(params, vera))
    np.testing.assert_allclose(lr.apply(model, params, vera, x), merged(x), rtol=1e-5,
                               atol=1e-5)


def test_a_pissa_init_of_an_nnx_model_starts_at_the_base_model():
    model, x = MLP(nnx.Rngs(1)), jax.random.normal(jax.random.key(0), (5, 64))
    params = lr.nnx.params(model)
    frozen, adapters = lr.init(jax.random.key(2), params, lr.LoraSpec(rank=4, init="pissa"))
    assert float(jnp.abs(frozen["fc1"]["kernel"] - params["fc1"]["kernel"]).max()) > 1e-3
    np.testing.assert_allclose(lr.apply(model, frozen, adapters, x), model(x), atol=1e-5)


class Custom(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((4, 3)))

    def __call__(self, x):
        return x @ self.w[...]


def test_a_target_on_an_unsupported_layer_is_named_as_in_linen():
    model = Custom()
    params = lr.nnx.params(model)
    adapters = lr.init_adapters(jax.random.key(0), params, lr.LoraSpec(rank=2, targets="w"))
    with pytest.raises(lr.UnsupportedLayer,
                       match=r"'w' is a weight of Custom, which lowrank cannot adapt.*nnx\.Linear"):
        lr.apply(model, params, adapters, jnp.ones((1, 4)))
    frozen = lr.quantize_tree(params, lr.QuantSpec("int8", extra="w"))
    with pytest.raises(lr.UnsupportedLayer, match=r"'w' is a weight of Custom"):
        lr.apply(model, frozen, {}, jnp.ones((1, 4)))
    # a layer type without a rule (nnx.ConvTranspose), and a rule's unsupported option
    for layer, message in ((nnx.ConvTranspose(4, 6, (3, 3), rngs=nnx.Rngs(0)),
                            r"'kernel' is a weight of ConvTranspose.*nnx\.Conv"),
                           (nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0)),
                            "feature_group_count != 1 is not supported")):
        p = lr.nnx.params(layer)
        layouts = {"kernel": lr.Factorization((), (0, 1, 2), (3,))}
        a = lr.init_adapters(jax.random.key(0), p, lr.LoraSpec(rank=2), layouts=layouts)
        with pytest.raises(lr.UnsupportedLayer, match=message):
            lr.apply(layer, p, a, jnp.ones((1, 5, 5, 4)))
    # the bias of a supported layer is not an adaptable weight either
    lin = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    p = lr.nnx.params(lin)
    bad = {"bias": lr.LoraPair(jnp.ones((3, 1)), jnp.ones((1, 1)))}
    with pytest.raises(ValueError, match="'bias'"):
        lr.apply(lin, p, bad, jnp.ones((1, 4)))


class WithDropout(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(8, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.lin(x))


def test_the_model_dropout_stream_is_reseeded_by_the_key_and_the_model_is_not_changed():
    model, x = WithDropout(nnx.Rngs(0, dropout=1)), jnp.ones((2, 8))
    params = lr.nnx.params(model)
    stream = jax.tree.leaves(nnx.state(model, nnx.RngState))
    run = lambda **kw: lr.apply(model, params, {}, x, **kw)  # noqa: E731
    np.testing.assert_array_equal(run(lora_rng=jax.random.key(1)),
                                  run(lora_rng=jax.random.key(1)))
    assert float(jnp.abs(run(lora_rng=jax.random.key(1)) - run(lora_rng=jax.random.key(2))).max())
    np.testing.assert_array_equal(run(rngs={"dropout": jax.random.key(1)}),
                                  run(lora_rng=jax.random.key(1)))
    model.eval()  # deterministic: the key changes nothing
    np.testing.assert_allclose(run(lora_rng=jax.random.key(1)), model.lin(x), rtol=1e-6)
    raw = lambda v: (jax.random.key_data(v)  # noqa: E731
                     if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v)
    for u, v in zip(jax.tree.leaves(nnx.state(model, nnx.RngState)), stream, strict=True):
        np.testing.assert_array_equal(raw(u), raw(v))  # the model's own stream is untouched
    with pytest.raises(ValueError, match="both given"):
        run(lora_rng=jax.random.key(1), rngs={"dropout": jax.random.key(2)})
    with pytest.raises(ValueError, match="which is missing"):
        run(lora_rng=True)
