"""Low-rank compression of the base: exactness at full rank, the rank rules against numpy,
activation-aware truncation, LoRA on top, quantized factors, merge and export."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank as lr
from lowrank.compression import (
    CompressSpec,
    LowRankKernel,
    activation_stats,
    compress,
    compression_summary,
)


def _randomize(adapters, key):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)])


class Mixed(nn.Module):
    """Every supported layer type, biases included, and a scanned stack of Dense layers."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(50, 8, name="embed")
        x = embed(ids)  # [b, t, 8]
        x = nn.Dense(12, name="dense")(x)
        x = nn.DenseGeneral((3, 4), name="to_heads")(x)  # [b, t, 3, 4]
        x = nn.Einsum((3, 4, 5), "bthd,hdk->bthk", name="per_head")(x)  # h is a batch label
        x = nn.DenseGeneral(8, axis=(-2, -1), name="from_heads")(x)  # [b, t, 8]
        x = nn.Conv(8, (3,), padding="SAME", name="conv")(x)  # 1-D conv over t
        body = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=2)
        x, _ = body(name="stack")(x, None)
        return embed.attend(x)  # [b, t, 50]


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(x.shape[-1], name="dense")(jnp.tanh(x)), None


IDS = jnp.array([[1, 2, 3, 4], [5, 6, 7, 49]])
TARGETS = r".*(kernel|embedding)"


@pytest.fixture(scope="module")
def mixed():
    model = Mixed()
    params = model.init(jax.random.key(0), IDS)["params"]
    layouts = lr.discover_layouts(model, params, IDS)
    spec = lr.LoraSpec(rank=2, alpha=4.0, targets=TARGETS)
    adapters = _randomize(lr.init_adapters(jax.random.key(1), params, spec, layouts=layouts),
                          jax.random.key(2))
    return model, params, layouts, adapters


def test_full_rank_compression_equals_the_dense_model_on_every_layer_type(mixed):
    model, params, layouts, _ = mixed
    spec = CompressSpec(targets=TARGETS, energy=1.0, only_saving=False)
    frozen = compress(params, spec, layouts=layouts)
    summary = compression_summary(frozen)
    assert len(summary) == 7  # every kernel and the embedding
    for path, row in summary.items():  # full rank: min(fan_in, fan_out) per slice
        assert row["rank"] == {"embed/embedding": 8, "dense/kernel": 8, "to_heads/kernel": 12,
                               "per_head/kernel": 4, "from_heads/kernel": 8,
                               "conv/kernel": 8, "stack/dense/kernel": 8}[path]
    base = model.apply({"params": params}, IDS)
    assert 0.5 < float(jnp.abs(base).max()) < 20
    np.testing.assert_allclose(lr.apply(model, frozen, {}, IDS), base, atol=1e-5, rtol=0)


def test_the_forward_never_forms_the_dense_kernel():
    # A [48, 40] kernel at rank 4: no value of its shape (or its transpose) may appear.
    model = nn.Dense(40)
    x = jnp.ones((3, 48))
    params = model.init(jax.random.key(0), x)["params"]
    frozen = compress(params, CompressSpec(rank=4))
    adapters = lr.init_adapters(jax.random.key(1), params, lr.LoraSpec(rank=2))

    def shapes(f, *args):
        jaxpr = jax.make_jaxpr(f)(*args)
        out = set()

        def walk(jp):
            for eqn in jp.eqns:
                out.update(tuple(v.aval.shape) for v in eqn.outvars)
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return out

    fwd = shapes(lambda a: lr.apply(model, frozen, a, x), adapters)
    grad = shapes(jax.grad(lambda a: lr.apply(model, frozen, a, x).sum()), adapters)
    assert not {(48, 40), (40, 48)} & (fwd | grad)
    dense = shapes(lambda a: lr.apply(model, lr.merge(frozen, {}), a, x), adapters)
    assert (48, 40) in dense or not dense  # the check can see a dense kernel when there is one


def _numpy_energy_rank(w, fraction):
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    kept = np.cumsum(s ** 2) / np.sum(s ** 2)
    return int(np.argmax(kept >= fraction)) + 1


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8, 0.9, 0.95])
def test_energy_threshold_picks_numpys_smallest_rank_and_truncation(fraction):
    # A decaying spectrum, so that the fractions need different ranks.
    u, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(64, 64)))
    v, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(48, 48)))
    s = 0.8 ** np.arange(48)
    w = (u[:, :48] * s) @ v.T
    expected = _numpy_energy_rank(w, fraction)
    frozen = compress({"fc": {"kernel": jnp.asarray(w, jnp.float32)}},
                      CompressSpec(energy=fraction))
    k = frozen["fc"]["kernel"]
    assert k.rank == expected
    uu, ss, vt = np.linalg.svd(w)
    kept = np.cumsum(ss ** 2) / np.sum(ss ** 2)
    assert kept[k.rank - 1] >= fraction and (k.rank == 1 or kept[k.rank - 2] < fraction)
    truncated = (uu[:, :expected] * ss[:expected]) @ vt[:expected]
    np.testing.assert_allclose(np.asarray(k.materialize(jnp.float32)), truncated, atol=1e-5)


def test_a_rank_that_saves_no_memory_leaves_the_kernel_dense():
    w = jax.random.normal(jax.random.key(0), (16, 16))
    # break-even at r = 16 * 16 / 32 = 8: rank 7 saves memory, rank 8 does not
    assert isinstance(compress({"k": w}, CompressSpec(targets="k", rank=7))["k"], LowRankKernel)
    assert compress({"k": w}, CompressSpec(targets="k", rank=8))["k"] is w
    assert compress({"k": w}, CompressSpec(targets="k", energy=1.0))["k"] is w
    full = compress({"k": w}, CompressSpec(targets="k", rank=16, only_saving=False))["k"]
    np.testing.assert_allclose(full.materialize(), w, atol=1e-5)


def _kernels(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=s) * rng.uniform(0.1, 3.0),
                                            jnp.float32)}
            for i, s in enumerate(shapes)}


def test_budget_spends_exactly_the_budget_when_ranks_can_fill_it():
    params = _kernels([(64, 64)] * 4)  # one rank costs 128 parameters everywhere
    for budget in (4 * 128, 11 * 128, 40 * 128):
        frozen = compress(params, CompressSpec(budget=budget))
        kept = sum(r["kept"] for r in compression_summary(frozen).values())
        assert kept == budget


def test_budget_is_never_exceeded_and_no_kernel_could_take_one_more_rank():
    shapes = [(64, 32), (32, 96), (80, 80), (16, 128)]
    params = _kernels(shapes, seed=1)
    for fraction in (0.1, 0.25, 0.4):
        frozen = compress(params, CompressSpec(budget=fraction))
        summary = compression_summary(frozen)
        budget = int(fraction * sum(a * b for a, b in shapes))
        kept = sum(r["kept"] for r in summary.values())
        assert kept <= budget
        for (a, b), path in zip(shapes, sorted(summary), strict=True):
            cap = (a * b - 1) // (a + b)
            assert summary[path]["rank"] == cap or kept + (a + b) > budget


def test_budget_goes_to_the_kernel_whose_spectrum_needs_it():
    # One kernel is nearly rank 2, the other has a flat spectrum: ranks go to the flat one.
    rng = np.random.default_rng(0)
    low = rng.normal(size=(64, 2)) @ rng.normal(size=(2, 64)) + 1e-3 * rng.normal(size=(64, 64))
    flat = rng.normal(size=(64, 64))
    params = {"low": {"kernel": jnp.asarray(low, jnp.float32)},
              "flat": {"kernel": jnp.asarray(flat, jnp.float32)}}
    summary = compression_summary(compress(params, CompressSpec(budget=20 * 128)))
    assert summary["low/kernel"]["rank"] == 2
    assert summary["flat/kernel"]["rank"] == 18


def test_activation_aware_truncation_reaches_the_optimal_output_error():
    rng = np.random.default_rng(0)
    n, d_in, d_out, rank = 512, 32, 32, 6
    scales = np.exp(rng.uniform(-3, 2, d_in))  # strongly anisotropic input features
    x = (rng.normal(size=(n, d_in)) * scales).astype(np.float32).astype(np.float64)
    model = nn.Dense(d_out, use_bias=False)
    params = model.init(jax.random.key(0), jnp.ones((1, d_in)))["params"]
    w = np.asarray(params["kernel"], np.float64)
    batches = [jnp.asarray(x[:256], jnp.float32), jnp.asarray(x[256:], jnp.float32)]
    stats = activation_stats(model, params, batches, r".*kernel")
    # x^T x is summed in float32 in the graph
    np.testing.assert_allclose(stats["kernel"], x.T @ x / n, rtol=1e-4, atol=1e-6)

    def error(frozen):
        w_hat = np.asarray(frozen["kernel"].materialize(jnp.float32), np.float64)
        return np.linalg.norm(x @ (w - w_hat))

    plain = error(compress(params, CompressSpec(rank=rank)))
    aware = error(compress(params, CompressSpec(rank=rank, damping=1e-8), stats=stats))
    optimal = np.sqrt(np.sum(np.linalg.svd(x @ w, compute_uv=False)[rank:] ** 2))
    assert aware < 0.6 * plain  # 118 vs 216 here
    assert aware == pytest.approx(optimal, rel=1e-3)


def test_activation_stats_measure_each_layers_own_input():
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(5, name="hidden")(x)))

    model = Mlp()
    x = jax.random.normal(jax.random.key(1), (7, 4))
    params = model.init(jax.random.key(0), x)["params"]
    stats = activation_stats(model, params, [x], r".*kernel")
    h = np.tanh(np.asarray(x) @ np.asarray(params["hidden"]["kernel"])
                + np.asarray(params["hidden"]["bias"]))
    np.testing.assert_allclose(stats["hidden/kernel"], np.asarray(x).T @ np.asarray(x) / 7,
                               rtol=1e-5)
    np.testing.assert_allclose(stats["out/kernel"], h.T @ h / 7, rtol=1e-5, atol=1e-7)


def test_activation_stats_reach_each_slice_of_a_scanned_stack():
    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            body = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=3)
            return body(name="stack")(x, None)[0]

    model = Stack()
    scales = jnp.exp(jnp.linspace(-2.0, 1.0, 8))  # anisotropic inputs
    x = jax.random.normal(jax.random.key(1), (6, 5, 8)) * scales
    params = model.init(jax.random.key(0), x)["params"]
    stats = activation_stats(model, params, [x[:4], x[4:]], r".*kernel")
    w = np.asarray(params["stack"]["dense"]["kernel"], np.float64)
    b = np.asarray(params["stack"]["dense"]["bias"], np.float64)
    h, inputs = np.asarray(x, np.float64).reshape(-1, 8), []
    for i in range(3):  # each slice's own input, by hand
        inputs.append(np.tanh(h))
        h = h + inputs[-1] @ w[i] + b[i]
    assert stats["stack/dense/kernel"].shape == (3, 8, 8)
    np.testing.assert_allclose(stats["stack/dense/kernel"],
                               np.stack([a.T @ a / a.shape[0] for a in inputs]),
                               rtol=1e-4, atol=1e-6)
    layouts = lr.discover_layouts(model, params, x)
    frozen = compress(params, CompressSpec(rank=2, damping=1e-8, only_saving=False),
                      stats=stats, layouts=layouts)
    w_hat = np.asarray(frozen["stack"]["dense"]["kernel"].materialize(jnp.float32), np.float64)
    for i, a in enumerate(inputs):  # every slice at its own optimal output error
        optimal = np.sqrt(np.sum(np.linalg.svd(a @ w[i], compute_uv=False)[2:] ** 2))
        assert np.linalg.norm(a @ (w[i] - w_hat[i])) == pytest.approx(optimal, rel=1e-3)
    with pytest.raises(ValueError, match=r"have shape \(8, 9\)"):
        compress(params, CompressSpec(rank=2), stats={"stack/dense/kernel": np.eye(8, 9)},
                 layouts=layouts)


def test_activation_stats_of_a_conv_are_those_of_its_patches():
    model = nn.Conv(6, (3,), padding="SAME", use_bias=False)
    scales = jnp.exp(jnp.linspace(-2.0, 1.0, 4))
    x = jax.random.normal(jax.random.key(1), (5, 7, 4)) * scales  # [batch, length, channels]
    params = model.init(jax.random.key(0), x)["params"]
    stats = activation_stats(model, params, [x], r".*kernel")
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (0, 0)))
    patches = np.stack([padded[:, t:t + 3].reshape(5, -1) for t in range(7)], 1).reshape(-1, 12)
    np.testing.assert_allclose(stats["kernel"], patches.T @ patches / 35, rtol=1e-4, atol=1e-6)
    w = np.asarray(params["kernel"], np.float64).reshape(12, 6)  # rows in the patches' order
    np.testing.assert_allclose(patches @ w, np.asarray(model.apply({"params": params}, x),
                                                       np.float64).reshape(-1, 6), atol=1e-5)
    frozen = compress(params, CompressSpec(rank=2, damping=1e-8), stats=stats,
                      layouts=lr.discover_layouts(model, params, x))
    w_hat = np.asarray(frozen["kernel"].materialize(jnp.float32), np.float64).reshape(12, 6)
    optimal = np.sqrt(np.sum(np.linalg.svd(patches @ w, compute_uv=False)[2:] ** 2))
    assert np.linalg.norm(patches @ (w - w_hat)) == pytest.approx(optimal, rel=1e-3)


def test_activation_stats_of_per_head_einsum_and_multi_axis_dense_general(mixed):
    model, params, layouts, _ = mixed
    inputs = {}

    def capture(next_fun, args, kwargs, context):  # each layer's input, eagerly
        if context.method_name == "__call__" and context.module.name in ("per_head",
                                                                          "from_heads"):
            inputs[context.module.name] = np.asarray(args[0], np.float64)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        model.apply({"params": params}, IDS)
    stats = activation_stats(model, params, [IDS], r"(per_head|from_heads)/kernel")
    heads = inputs["per_head"]  # [b, t, h=3, d=4]: one moment per head
    rows = heads.reshape(-1, 3, 4)
    np.testing.assert_allclose(stats["per_head/kernel"],
                               np.einsum("nhd,nhe->hde", rows, rows) / rows.shape[0],
                               rtol=1e-4, atol=1e-6)
    merged = inputs["from_heads"].reshape(-1, 15)  # both contracted axes, in kernel order
    np.testing.assert_allclose(stats["from_heads/kernel"], merged.T @ merged / merged.shape[0],
                               rtol=1e-4, atol=1e-6)
    frozen = compress(params, CompressSpec(targets=r"per_head/kernel", rank=1, damping=1e-8,
                                           only_saving=False), stats=stats, layouts=layouts)
    w = np.asarray(params["per_head"]["kernel"], np.float64)  # [h, d, k]
    w_hat = np.asarray(frozen["per_head"]["kernel"].materialize(jnp.float32), np.float64)
    for h in range(3):  # each head at its own optimal output error
        x = rows[:, h]
        optimal = np.sqrt(np.sum(np.linalg.svd(x @ w[h], compute_uv=False)[1:] ** 2))
        assert np.linalg.norm(x @ (w[h] - w_hat[h])) == pytest.approx(optimal, rel=1e-3)


class _TwiceBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        dense = nn.Dense(x.shape[-1], name="dense")  # one kernel, called twice per step
        return x + dense(jnp.tanh(dense(jnp.tanh(x)))), None


@pytest.mark.parametrize("reverse", [False, True])
def test_each_call_in_a_scan_is_credited_to_the_slice_it_ran_with(reverse):
    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            body = nn.scan(_TwiceBlock, variable_axes={"params": 0},
                           split_rngs={"params": True}, length=3, reverse=reverse)
            return body(name="stack")(x, None)[0]

    model = Stack()
    x = jax.random.normal(jax.random.key(1), (4, 8))
    params = model.init(jax.random.key(0), x)["params"]
    stats = activation_stats(model, params, [x], r".*kernel")
    w = np.asarray(params["stack"]["dense"]["kernel"], np.float64)
    b = np.asarray(params["stack"]["dense"]["bias"], np.float64)
    h, expected = np.asarray(x, np.float64), [None] * 3
    for i in (reversed(range(3)) if reverse else range(3)):  # slices in the order they run
        first = np.tanh(h)
        second = np.tanh(first @ w[i] + b[i])
        expected[i] = (first.T @ first + second.T @ second) / (2 * len(h))
        h = h + second @ w[i] + b[i]
    np.testing.assert_allclose(stats["stack/dense/kernel"], np.stack(expected),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fmt", [None, "nf4"])
def test_compressed_plus_lora_gradients_equal_those_of_the_merged_model(mixed, fmt):
    model, params, layouts, adapters = mixed
    quant = None if fmt is None else lr.QuantSpec(fmt, block_size=16)
    frozen = compress(params, CompressSpec(targets=r".*kernel", rank=3, only_saving=False),
                      layouts=layouts, quant=quant)
    dense = lr.merge(frozen, {})  # the compressed base multiplied out: a plain tree

    def loss(a, base):
        return jnp.sum(jnp.sin(lr.apply(model, base, a, IDS)))

    grad = jax.jit(jax.grad(loss))
    g_compressed, g_dense = grad(adapters, frozen), grad(adapters, dense)
    for got, want in zip(jax.tree.leaves(g_compressed), jax.tree.leaves(g_dense), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    assert not np.allclose(g_compressed["dense"]["kernel"].a,  # the compression did something
                           grad(adapters, params)["dense"]["kernel"].a, atol=1e-3)


def test_merge_exports_a_dense_tree_and_recompressing_it_gives_the_same_factors(mixed):
    model, params, layouts, adapters = mixed
    spec = CompressSpec(targets=r".*kernel", rank=3, only_saving=False)
    frozen = compress(params, spec, layouts=layouts)
    merged = lr.merge(frozen, adapters)
    assert not any(isinstance(v, LowRankKernel) for v in lr.paths.flatten(merged).values())
    y = lr.apply(model, frozen, adapters, IDS)  # outputs up to ~250: float32 noise ~1e-4
    np.testing.assert_allclose(model.apply({"params": merged}, IDS), y,
                               atol=2e-6 * float(jnp.abs(y).max()))
    base = lr.merge(frozen, {})
    again = compress(base, spec, layouts=layouts)
    for path, k in lr.paths.flatten(again).items():
        if isinstance(k, LowRankKernel):  # a rank-3 kernel's rank-3 SVD is itself
            np.testing.assert_allclose(k.materialize(), lr.paths.flatten(base)[path], atol=1e-5)


def test_dora_over_a_compressed_base_equals_dora_over_its_dense_product():
    model = nn.Dense(24)
    x = jax.random.normal(jax.random.key(3), (5, 32))
    params = model.init(jax.random.key(0), x)["params"]
    frozen = compress(params, CompressSpec(rank=5))
    spec = lr.LoraSpec(rank=2, method="dora")
    adapters = _randomize(lr.init_adapters(jax.random.key(1), frozen, spec), jax.random.key(2))
    np.testing.assert_allclose(lr.apply(model, frozen, adapters, x),
                               lr.apply(model, lr.merge(frozen, {}), adapters, x), atol=1e-5)


def test_quantized_factors_account_bytes_and_stay_close():
    w = jax.random.normal(jax.random.key(0), (256, 128))
    params = {"fc": {"kernel": w, "bias": jnp.zeros(128)}}
    spec = CompressSpec(targets=r".*kernel", rank=16)
    floats = compress(params, spec)
    k = floats["fc"]["kernel"]
    assert k.nbytes == 4 * 16 * (256 + 128)
    for fmt, bits in (("int8", 8), ("nf4", 4)):
        q = compress(params, spec, quant=lr.QuantSpec(fmt, block_size=64))
        qk = q["fc"]["kernel"]
        assert lr.is_quantized(qk.u) and lr.is_quantized(qk.v)
        # codes plus one float32 scale per block of 64
        assert qk.nbytes == 16 * (256 + 128) * bits // 8 + 4 * 16 * (256 + 128) // 64
        report = lr.memory_report(q)
        assert report.bytes == qk.nbytes + 128 * 4 and report.params == 256 * 128 + 128
        assert report.quantized.bytes == qk.nbytes and "compressed leaves" in str(report)
        rel = float(jnp.linalg.norm(qk.materialize() - k.materialize()) /
                    jnp.linalg.norm(k.materialize()))
        assert rel < (0.02 if fmt == "int8" else 0.15)
    # quantize_tree leaves a compressed kernel as it is and quantizes the rest
    mixed = lr.quantize_tree({"a": floats["fc"], "b": {"kernel": w}})
    assert isinstance(mixed["a"]["kernel"], LowRankKernel) and lr.is_quantized(mixed["b"]["kernel"])


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of rank, energy, budget"),
    ({"rank": 2, "energy": 0.5}, "exactly one of"),
    ({"rank": 0}, "rank must be an int >= 1"),
    ({"energy": 1.5}, r"energy must be in \(0, 1\]"),
    ({"budget": 1.5}, "budget must be an int > 0"),
    ({"budget": 0.5, "targets": "("}, "not a regex"),
])
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressSpec(**kwargs)


def test_bad_targets_and_inputs_are_named(mixed):
    w = jax.random.normal(jax.random.key(0), (16, 8))
    with pytest.raises(ValueError, match="matches no parameter"):
        compress({"fc": {"kernel": w}}, CompressSpec(targets="nope", rank=2))
    with pytest.raises(ValueError,
                       match=r"rank 9 exceeds min\(fan_in, fan_out\) = 8 of 'fc/kernel'"):
        compress({"fc": {"kernel": w}}, CompressSpec(rank=9))
    with pytest.raises(ValueError, match="'fc/kernel' is already a QuantizedArray"):
        compress(lr.quantize_tree({"fc": {"kernel": w}}), CompressSpec(rank=2))
    with pytest.raises(ValueError, match="no activation stats for target 'fc/kernel'"):
        compress({"fc": {"kernel": w}}, CompressSpec(rank=2), stats={"other/kernel": np.eye(16)})
    with pytest.raises(ValueError, match="below the 48 parameters of rank 1"):
        compress({"fc": {"kernel": w}, "g": {"kernel": w}}, CompressSpec(budget=40))
    model, params, _, _ = mixed
    with pytest.raises(lr.UnsupportedLayer, match="'embed/embedding'"):
        activation_stats(model, params, [IDS], r"embed/embedding")
