"""The LoRA core: exactness at B = 0, merging, factored gradients, transforms, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank as lr
from lowrank.lora import LoraPair


def _randomize(adapters, key):
    """Non-zero A and B everywhere, so that the adapters visibly change the output."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


class Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(6, (3, 3), padding="SAME", name="conv")(x)


class Mixed(nn.Module):
    """Every supported layer type, DenseGeneral with several input and output axes."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(50, 8, name="embed")
        x = embed(ids)  # [b, t, 8]
        x = nn.Dense(12, name="dense")(x)
        x = nn.DenseGeneral((3, 4), name="to_heads")(x)  # [b, t, 3, 4]
        x = nn.Einsum((3, 4, 5), "bthd,hdk->bthk", name="per_head")(x)  # h is a batch label
        x = nn.DenseGeneral(8, axis=(-2, -1), name="from_heads")(x)  # [b, t, 8]
        return embed.attend(x)  # [b, t, 50]


IDS = jnp.array([[1, 2, 3, 4], [5, 6, 7, 49]])
IMAGES = jax.random.normal(jax.random.key(3), (2, 5, 5, 4))
CASES = {"mixed": (Mixed(), IDS), "conv": (Conv(), IMAGES)}


def _setup(name, rank=2, **spec_kwargs):
    model, x = CASES[name]
    params = model.init(jax.random.key(0), x)["params"]
    layouts = lr.discover_layouts(model, params, x)
    spec = lr.LoraSpec(rank=rank, alpha=4.0, targets=r".*(kernel|embedding)", **spec_kwargs)
    adapters = lr.init_adapters(jax.random.key(1), params, spec, layouts=layouts)
    return model, x, params, adapters


@pytest.mark.parametrize("name", sorted(CASES))
def test_zero_b_is_exactly_the_base_model_and_nonzero_b_is_not(name):
    model, x, params, adapters = _setup(name)
    base = model.apply({"params": params}, x)
    np.testing.assert_array_equal(lr.apply(model, params, adapters, x), base)
    nonzero = _randomize(adapters, jax.random.key(2))
    changed = lr.apply(model, params, nonzero, x)
    assert float(jnp.abs(changed - base).max()) > 1e-3


def test_every_layer_type_is_adapted_on_its_own():
    model, x, params, adapters = _setup("mixed")
    base = model.apply({"params": params}, x)
    flat = lr.paths.flatten(adapters)
    randomized = lr.paths.flatten(_randomize(adapters, jax.random.key(2)))
    assert sorted(flat) == [
        "dense/kernel", "embed/embedding", "from_heads/kernel", "per_head/kernel",
        "to_heads/kernel",
    ]
    for weight in flat:
        one = lr.paths.unflatten({**flat, weight: randomized[weight]})
        diff = jnp.abs(lr.apply(model, params, one, x) - base).max()
        assert float(diff) > 1e-4, weight


@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_forward_equals_factored_and_unmerge_restores_the_base(name):
    model, x, params, adapters = _setup(name)
    adapters = _randomize(adapters, jax.random.key(2))
    factored = lr.apply(model, params, adapters, x)
    merged = lr.merge(params, adapters)
    np.testing.assert_allclose(model.apply({"params": merged}, x), factored, atol=1e-5, rtol=1e-5)
    restored = lr.unmerge(merged, adapters)
    for p, w in lr.paths.flatten(params).items():
        np.testing.assert_allclose(lr.paths.flatten(restored)[p], w, atol=1e-6, err_msg=p)


class Block(nn.Module):
    d: int = 32

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.Dense(self.d, name=n)(h) for n in ("query", "key", "value"))
        att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(self.d), axis=-1)
        x = x + nn.Dense(self.d, name="out")(att @ v)
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(self.d, name="down")(nn.gelu(nn.Dense(4 * self.d, name="up")(h)))


def _count_kernel_shaped_dots(jaxpr, kernel_shapes):
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            count += tuple(eqn.outvars[0].aval.shape) in kernel_shapes
        for value in eqn.params.values():  # sub-jaxprs of pjit, remat, scan...
            sub = getattr(value, "jaxpr", value)
            if hasattr(sub, "eqns"):
                count += _count_kernel_shaped_dots(sub, kernel_shapes)
    return count


def test_lora_gradient_never_forms_a_full_weight_gradient():
    model, x = Block(), jax.random.normal(jax.random.key(0), (3, 5, 32))  # 15 tokens
    params = model.init(jax.random.key(1), x)["params"]
    adapters = lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(rank=4, targets=".*kernel"))
    kernel_shapes = {tuple(w.shape) for p, w in lr.paths.flatten(params).items() if "kernel" in p}

    full = jax.make_jaxpr(jax.grad(lambda p: model.apply({"params": p}, x).sum()))(params)
    lora = jax.make_jaxpr(jax.grad(lambda a: lr.apply(model, params, a, x).sum()))(adapters)
    n_full = _count_kernel_shaped_dots(full.jaxpr, kernel_shapes)
    n_lora = _count_kernel_shaped_dots(lora.jaxpr, kernel_shapes)
    assert n_full >= 6  # one dW per kernel
    assert n_lora == 0


def test_adapter_gradients_match_the_hand_derived_formula():
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(0), (7, 6))
    params = model.init(jax.random.key(1), x)["params"]
    spec = lr.LoraSpec(rank=3, alpha=6.0)
    adapters = _randomize(lr.init_adapters(jax.random.key(2), params, spec), jax.random.key(3))
    pair = adapters["kernel"]
    grads = jax.grad(lambda a: (lr.apply(model, params, a, x) ** 2).sum())(adapters)["kernel"]

    w, bias, a, b, s = params["kernel"], params["bias"], pair.a, pair.b, 2.0
    g = 2 * (x @ w + bias + s * (x @ a) @ b)  # dL/dy
    np.testing.assert_allclose(grads.a, s * x.T @ (g @ b.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads.b, s * (x @ a).T @ g, rtol=1e-5, atol=1e-5)

    # and a central finite difference along a random direction, in float64 arithmetic
    direction = _randomize(adapters, jax.random.key(4))
    f = lambda t: float(  # noqa: E731
        (np.asarray(lr.apply(model, params, jax.tree.map(lambda p, d: p + t * d, adapters,
                                                          direction), x), np.float64) ** 2).sum()
    )
    eps = 1e-2
    fd = (f(eps) - f(-eps)) / (2 * eps)
    analytic = sum(float((gl * dl).sum()) for gl, dl in zip(
        jax.tree.leaves(grads), jax.tree.leaves(direction["kernel"]), strict=True))
    assert abs(fd - analytic) <= 2e-3 * max(1.0, abs(analytic))


class Scanned(nn.Module):
    layers: int = 3

    @nn.compact
    def __call__(self, x):
        body = nn.scan(
            nn.remat(_ScanBlock), variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=self.layers,
        )
        x, _ = body(name="layers")(x, None)
        return x


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(x.shape[-1], name="dense")(jnp.tanh(x)), None


class Unrolled(nn.Module):
    layers: int = 3

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = x + nn.Dense(x.shape[-1], name=f"layer_{i}")(jnp.tanh(x))
        return x


def test_scanned_layers_get_one_adapter_slice_each_and_equal_the_unrolled_model():
    x = jax.random.normal(jax.random.key(0), (4, 8))
    scanned = Scanned()
    params = scanned.init(jax.random.key(1), x)["params"]
    assert params["layers"]["dense"]["kernel"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="discover_layouts"):
        lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(rank=2))
    layouts = lr.discover_layouts(scanned, params, x)
    adapters = lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(rank=2), layouts=layouts)
    adapters = _randomize(adapters, jax.random.key(3))
    assert adapters["layers"]["dense"]["kernel"].a.shape == (3, 8, 2)

    unrolled = Unrolled()
    slice_ = lambda t, i: jax.tree.map(lambda v: v[i], t)  # noqa: E731
    u_params = {f"layer_{i}": slice_(params["layers"]["dense"], i) for i in range(3)}
    u_adapters = {f"layer_{i}": slice_(adapters["layers"]["dense"], i) for i in range(3)}
    np.testing.assert_allclose(
        lr.apply(scanned, params, adapters, x), lr.apply(unrolled, u_params, u_adapters, x),
        rtol=1e-5, atol=1e-5,
    )
    # gradients flow into every slice
    grads = jax.grad(lambda a: lr.apply(scanned, params, a, x).sum())(adapters)
    assert bool((jnp.abs(grads["layers"]["dense"]["kernel"].a).sum(axis=(1, 2)) > 0).all())


class Twice(nn.Module):
    def setup(self):
        self.dense = nn.Dense(4)

    def __call__(self, x):
        return self.dense(self.dense(x))

    def first(self, x):
        return self.dense(x)


def test_a_module_called_twice_and_another_method_both_use_the_adapter():
    model, x = Twice(), jax.random.normal(jax.random.key(0), (3, 4))
    params = model.init(jax.random.key(1), x)["params"]
    adapters = _randomize(lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(rank=2)),
                          jax.random.key(3))
    merged = {"params": lr.merge(params, adapters)}
    np.testing.assert_allclose(lr.apply(model, params, adapters, x), model.apply(merged, x),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        lr.apply(model, params, adapters, x, method=Twice.first),
        model.apply(merged, x, method=Twice.first), rtol=1e-5, atol=1e-5,
    )


def test_dropout_only_when_training():
    model, x = nn.Dense(16), jax.random.normal(jax.random.key(0), (8, 16))
    params = model.init(jax.random.key(1), x)["params"]
    spec = lr.LoraSpec(rank=4, dropout=0.5)
    adapters = _randomize(lr.init_adapters(jax.random.key(2), params, spec), jax.random.key(3))
    evaluation = lr.apply(model, params, adapters, x)
    merged = model.apply({"params": lr.merge(params, adapters)}, x)
    np.testing.assert_allclose(evaluation, merged, rtol=1e-5, atol=1e-5)
    t1 = lr.apply(model, params, adapters, x, lora_rng=jax.random.key(7))
    t2 = lr.apply(model, params, adapters, x, lora_rng=jax.random.key(8))
    assert float(jnp.abs(t1 - evaluation).max()) > 1e-3
    assert float(jnp.abs(t1 - t2).max()) > 1e-3
    # the inverted-dropout average over many masks approaches the evaluation output
    mean = jnp.mean(jnp.stack([
        lr.apply(model, params, adapters, x, lora_rng=jax.random.key(i)) for i in range(200)
    ]), axis=0)
    assert float(jnp.abs(mean - evaluation).mean()) < 0.1 * float(jnp.abs(evaluation).mean())


def test_full_rank_trainable_leaves_replace_the_frozen_ones():
    model, x = Block(), jax.random.normal(jax.random.key(0), (2, 4, 32))
    params = model.init(jax.random.key(1), x)["params"]
    spec = lr.LoraSpec(rank=2, targets=r"(query|value)/kernel", trainable=r"(ln\d|down)/.*")
    adapters = lr.init_adapters(jax.random.key(2), params, spec)
    assert sorted(lr.paths.flatten(adapters)) == [
        "down/bias", "down/kernel", "ln1/bias", "ln1/scale", "ln2/bias", "ln2/scale",
        "query/kernel", "value/kernel",
    ]
    adapters["down"]["bias"] = adapters["down"]["bias"] + 1.0
    shifted = lr.apply(model, params, adapters, x)
    np.testing.assert_allclose(shifted, model.apply({"params": params}, x) + 1.0, atol=1e-5)
    grads = jax.grad(lambda a: lr.apply(model, params, a, x).sum())(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)


# ---------------------------------------------------------------------------- errors


def _dense_params():
    return nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 6)))["params"]


def test_target_matching_nothing_lists_candidates():
    with pytest.raises(ValueError, match=r"matches no parameter.*bias, kernel"):
        lr.init_adapters(jax.random.key(0), _dense_params(), lr.LoraSpec(targets=".*query.*"))


@pytest.mark.parametrize("rank", [0, -1, 1.5])
def test_rank_below_one_is_refused(rank):
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        lr.LoraSpec(rank=rank)


def test_rank_above_the_smaller_dimension_is_refused():
    with pytest.raises(ValueError, match=r"rank 5 for 'kernel' exceeds min\(fan_in=6, fan_out=4\)"):
        lr.init_adapters(jax.random.key(0), _dense_params(), lr.LoraSpec(rank=5))


def test_adapters_that_do_not_fit_name_the_path():
    params = _dense_params()
    adapters = lr.init_adapters(jax.random.key(0), params, lr.LoraSpec(rank=2))
    with pytest.raises(ValueError, match="'other/kernel' is not a parameter"):
        lr.apply(nn.Dense(4), params, {"other": adapters}, jnp.ones((1, 6)))
    wrong = {"kernel": LoraPair(jnp.ones((5, 2)), jnp.ones((2, 4)))}
    with pytest.raises(ValueError, match=r"at 'kernel'.*\(5, 4\).*\(6, 4\)"):
        lr.apply(nn.Dense(4), params, wrong, jnp.ones((1, 6)))


class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x @ self.param("w", nn.initializers.ones, (x.shape[-1], 3))


def test_a_target_on_an_unsupported_layer_is_named():
    params = Custom().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    adapters = lr.init_adapters(jax.random.key(0), params, lr.LoraSpec(rank=2, targets="w"))
    with pytest.raises(lr.UnsupportedLayer, match=r"'w' is a weight of Custom.*nn\.Dense"):
        lr.apply(Custom(), params, adapters, jnp.ones((1, 4)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dropout": 1.0}, "dropout must be in"),
        ({"init": "xavier"}, "'xavier' is not one of"),
        ({"alpha": 0}, "alpha must be a number > 0"),
        ({"targets": "("}, "not a valid regex"),
    ],
)
def test_bad_spec_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lr.LoraSpec(**kwargs)


def test_dropout_works_in_scanned_layers_through_the_model_dropout_stream():
    x = jax.random.normal(jax.random.key(0), (4, 8))
    scanned = Scanned()
    params = scanned.init(jax.random.key(1), x)["params"]
    spec = lr.LoraSpec(rank=2, dropout=0.5)
    layouts = lr.discover_layouts(scanned, params, x)
    adapters = _randomize(lr.init_adapters(jax.random.key(2), params, spec, layouts=layouts),
                          jax.random.key(3))
    key = jax.random.key(9)
    trained = lr.apply(scanned, params, adapters, x, lora_rng=key)
    same = lr.apply(scanned, params, adapters, x, rngs={"dropout": key}, lora_rng=True)
    np.testing.assert_array_equal(trained, same)
    assert float(jnp.abs(trained - lr.apply(scanned, params, adapters, x)).max()) > 1e-3
    with pytest.raises(ValueError, match="both given"):
        lr.apply(scanned, params, adapters, x, rngs={"dropout": key}, lora_rng=key)
    with pytest.raises(ValueError, match="missing"):
        lr.apply(scanned, params, adapters, x, lora_rng=True)


def test_a_spec_without_targets_trains_full_rank_leaves_only():
    params = _dense_params()
    adapters = lr.init_adapters(jax.random.key(0), params, lr.LoraSpec(targets=None,
                                                                        trainable=".*"))
    assert sorted(adapters) == ["bias", "kernel"]
    assert not any(isinstance(v, LoraPair) for v in adapters.values())
    with pytest.raises(ValueError, match="nothing to train"):
        lr.LoraSpec(targets=None)
