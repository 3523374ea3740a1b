"""AdaLoRA: outputs and gradients against the written-out formula, the orthogonality penalty,
the budget transform against a NumPy transcription of PEFT's RankAllocator, exact target
ranks, train(config) with the ranks exported; what it refuses."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank as lr
from lowrank.adalora import AdaLoraTriplet, orthogonality_penalty
from lowrank.adalora_budget import (
    adalora_budget,
    budget_schedule,
    plot_rank_allocation,
    rank_table,
    ranks,
)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="fc2")(nn.gelu(nn.Dense(12, name="fc1")(x)))


def _setup(rank=4, alpha=8.0):
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (7, 6))
    params = model.init(jax.random.key(1), x)["params"]
    adapters = lr.init_adapters(jax.random.key(2), params,
                                lr.LoraSpec(rank=rank, alpha=alpha, method="adalora"))
    # lambda = 0 at init hides the adapter: give it values
    adapters = jax.tree.map(
        lambda v: v + 0.5 * jax.random.normal(jax.random.key(v.size), v.shape), adapters)
    return model, x, params, adapters


def _peft_svd_linear(x, w, bias, lora_a, lora_e, lora_b, alpha, init_r):
    """PEFT's SVDLinear.forward in torch's layout: A [r, in], E [r, 1], B [out, r]."""
    return x @ w + bias + (x @ (lora_a * lora_e).T @ lora_b.T) * alpha / (init_r + 1e-5)


def test_init_is_peft_s():
    model = MLP()
    params = model.init(jax.random.key(1), jnp.ones((1, 6)))["params"]
    adapters = lr.init_adapters(jax.random.key(2), params,
                                lr.LoraSpec(rank=4, alpha=8, method="adalora"))
    leaf = adapters["fc1"]["kernel"]
    assert isinstance(leaf, AdaLoraTriplet) and leaf.init_rank == 4
    assert (leaf.a.shape, leaf.e.shape, leaf.b.shape) == ((6, 4), (4,), (4, 12))
    np.testing.assert_array_equal(leaf.e, 0.0)
    both = np.concatenate([np.ravel(leaf.a), np.ravel(leaf.b)])
    assert 0.015 < both.std() < 0.025  # N(0, 0.02^2)
    x = jnp.ones((2, 6))
    np.testing.assert_array_equal(lr.apply(model, params, adapters, x),
                                  model.apply({"params": params}, x))


def test_output_and_gradients_equal_the_written_out_formula():
    model, x, params, adapters = _setup()
    leaf = adapters["fc1"]["kernel"]
    w, bias = params["fc1"]["kernel"], params["fc1"]["bias"]

    class FC1(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(12, name="fc1")(x)

    ours = lambda t: lr.apply(FC1(), {"fc1": params["fc1"]}, {"fc1": t}, x)  # noqa: E731
    ref = lambda a, e, b: _peft_svd_linear(x, w, bias, a, e, b, 8.0, 4)  # noqa: E731
    args = (leaf.a.T, leaf.e[:, None], leaf.b.T)
    np.testing.assert_allclose(ours(adapters["fc1"]), ref(*args), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda t: (ours(t) ** 2).sum())(adapters["fc1"])["kernel"]
    ga, ge, gb = jax.grad(lambda *v: (ref(*v) ** 2).sum(), argnums=(0, 1, 2))(*args)
    np.testing.assert_allclose(grads.a, ga.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads.e, ge[:, 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads.b, gb.T, rtol=1e-4, atol=1e-5)
    # a central finite difference along lambda (the output is linear in it)
    direction = jax.random.normal(jax.random.key(5), (4,))
    f = lambda t: float((np.asarray(ours({"kernel": leaf.replace(  # noqa: E731
        e=leaf.e + t * direction)}), np.float64) ** 2).sum())
    fd = (f(1e-2) - f(-1e-2)) / 2e-2
    assert abs(fd - float((grads.e * direction).sum())) <= 2e-3 * max(1.0, abs(fd))


def test_merge_equals_the_factored_output_and_unmerges():
    model, x, params, adapters = _setup()
    merged = lr.merge(params, adapters)
    np.testing.assert_allclose(model.apply({"params": merged}, x),
                               lr.apply(model, params, adapters, x), rtol=1e-5, atol=1e-5)
    back = lr.unmerge(merged, adapters)
    np.testing.assert_allclose(back["fc1"]["kernel"], params["fc1"]["kernel"], atol=1e-6)


def test_over_a_quantized_base_equals_the_dequantized_merge():
    model, x, params, adapters = _setup()
    frozen = lr.quantize_tree(params, lr.QuantSpec("nf4", block_size=32))
    assert adapters["fc1"]["kernel"].a.dtype == jnp.float32
    dense = lr.merge(frozen, adapters)  # dequantized base plus s P diag(lambda) Q
    np.testing.assert_allclose(lr.apply(model, frozen, adapters, x),
                               model.apply({"params": dense}, x), rtol=1e-5, atol=1e-5)


def test_scanned_layers_equal_their_own_dense_merge():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.tanh(nn.Dense(6, name="d")(x)), None

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=3)(name="s")(x, None)[0]

    model, x = Scanned(), jax.random.normal(jax.random.key(0), (2, 6))
    params = model.init(jax.random.key(1), x)["params"]
    layouts = lr.discover_layouts(model, params, x)
    adapters = lr.init_adapters(jax.random.key(2), params, lr.LoraSpec(
        rank=3, method="adalora"), layouts=layouts)
    adapters = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(1), v.shape),
                            adapters)
    assert adapters["s"]["d"]["kernel"].e.shape == (3, 3)
    np.testing.assert_allclose(lr.apply(model, params, adapters, x),
                               model.apply({"params": lr.merge(params, adapters)}, x),
                               rtol=1e-5, atol=1e-5)


def test_orthogonality_penalty_is_peft_s():
    _, _, _, adapters = _setup()
    expected = []
    for leaf in (adapters["fc1"]["kernel"], adapters["fc2"]["kernel"]):
        lora_a, lora_b = np.asarray(leaf.a.T, np.float64), np.asarray(leaf.b.T, np.float64)
        for cov in (lora_a @ lora_a.T, lora_b.T @ lora_b):  # PEFT's p @ p.T, p.T @ p
            expected.append(np.linalg.norm(cov - np.eye(4), "fro"))
    np.testing.assert_allclose(orthogonality_penalty(adapters), np.mean(expected), rtol=1e-5)
    grad = jax.grad(orthogonality_penalty)(adapters)["fc1"]["kernel"]
    assert float(jnp.abs(grad.a).max()) > 0 and float(jnp.abs(grad.e).max()) == 0


# ----------------------------------------------------------------------------- the budget


def _peft_rank_allocator(params_seq, grads_seq, *, target_r, total, tinit, tfinal, delta_t,
                         beta1=0.85, beta2=0.85):
    """NumPy transcription of PEFT's RankAllocator + AdaLoraModel.update_and_allocate: given
    the params after each optimizer step (before masking) and that step's grads, the lambda
    masks it applies. Returns the list of {name: keep mask or None} per step."""
    names = list(params_seq[0])
    init_bgt = sum(params_seq[0][n]["e"].size for n in names)
    target_bgt = target_r * len(names)
    s = {n: {k: np.zeros_like(v) for k, v in params_seq[0][n].items()} for n in names}
    u = {n: {k: np.zeros_like(v) for k, v in params_seq[0][n].items()} for n in names}
    pattern, out = None, []
    for step, (p, g) in enumerate(zip(params_seq, grads_seq, strict=True)):
        mask = None
        if step <= total - tfinal:
            if step < total - tfinal:
                for n in names:
                    for k in p[n]:
                        ipt = np.abs(p[n][k] * g[n][k])
                        s[n][k] = beta1 * s[n][k] + (1 - beta1) * ipt
                        u[n][k] = beta2 * u[n][k] + (1 - beta2) * np.abs(ipt - s[n][k])
            budget, now = budget_schedule(step, init_budget=init_bgt, target_budget=target_bgt,
                                          total_steps=total, tinit=tinit, tfinal=tfinal,
                                          delta_t=delta_t)
            if now or step == total - tfinal:
                score = {n: (s[n]["e"] * u[n]["e"]) + (s[n]["a"] * u[n]["a"]).mean(0)
                         + (s[n]["b"] * u[n]["b"]).mean(1) for n in names}
                allscores = np.concatenate([score[n] for n in names])
                k = init_bgt - budget
                threshold = np.sort(allscores)[k - 1] if k > 0 else -np.inf
                pattern = {n: score[n] > threshold for n in names}
                mask = pattern
        else:
            mask = pattern
        out.append(mask)
    return out


def _random_run(tx, params, steps, seed=0):
    """SGD-like steps on random grads; returns the params and grads the allocator saw."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    seen_params, seen_grads, keeps = [], [], []
    for i in range(steps):
        grads = jax.tree.map(lambda v, i=i: jax.random.normal(
            jax.random.key(seed * 1000 + i + v.size), v.shape), params)
        seen_params.append(jax.tree.map(lambda p, g: p - 0.05 * g, params, grads))
        seen_grads.append(grads)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        keeps.append(state.keep)
    return params, state, seen_params, seen_grads, keeps


tx_inner_sgd = optax.sgd(0.05)


def _triplets(rank=6):
    key = jax.random.split(jax.random.key(0), 6)
    shapes = {"q": (8, 10), "v": (8, 10), "fc": (10, 7)}
    return {name: AdaLoraTriplet(jax.random.normal(key[2 * i], (fi, rank)),
                                 jax.random.normal(key[2 * i + 1], (rank, fo)),
                                 e=jnp.linspace(0.5, 1.5, rank), init_rank=rank)
            for i, (name, (fi, fo)) in enumerate(shapes.items())}


def test_budget_masks_as_peft_s_rank_allocator_and_ends_at_exactly_the_target():
    total, tinit, tfinal, delta_t, target = 14, 2, 3, 2, 2
    params = _triplets()
    tx = adalora_budget(tx_inner_sgd, target_rank=target, total_steps=total, tinit=tinit,
                        tfinal=tfinal, delta_t=delta_t)
    final, state, seen_params, seen_grads, keeps = _random_run(tx, params, total)
    as_np = lambda tree: {n: {k: np.asarray(getattr(v, k)) for k in "aeb"}  # noqa: E731
                          for n, v in tree.items()}
    expected = _peft_rank_allocator([as_np(p) for p in seen_params],
                                    [as_np(g) for g in seen_grads], target_r=target,
                                    total=total, tinit=tinit, tfinal=tfinal, delta_t=delta_t)
    masked_steps = 0
    for step, (mask, keep) in enumerate(zip(expected, keeps, strict=True)):
        if mask is None:
            continue
        masked_steps += 1
        for n in params:
            np.testing.assert_array_equal(np.asarray(keep[n]), mask[n], err_msg=f"step {step}")
    assert masked_steps == 4 + 1 + 2  # steps 4, 6, 8, 10; the final 11; 12, 13 reapply it
    # exactly the target: 2 ranks per matrix on average, 6 in all, and lambda zero elsewhere
    assert sum(ranks(state).values()) == target * len(params)
    for n, leaf in final.items():
        keep = np.asarray(state.keep[n])
        np.testing.assert_array_equal(np.asarray(leaf.e)[~keep], 0.0)
        assert np.all(np.asarray(leaf.e)[keep] != 0)
        assert int(leaf.active_ranks()) == keep.sum()


def test_budget_at_each_masking_is_the_schedule_s_and_shapes_stay_static():
    total, target = 10, 1
    params = _triplets(rank=4)
    tx = adalora_budget(tx_inner_sgd, target_rank=target, total_steps=total, tfinal=2)
    traces = []
    state = tx.init(params)

    @jax.jit
    def update(grads, state, params):
        traces.append(1)
        return tx.update(grads, state, params)

    for step in range(total):
        grads = jax.tree.map(lambda v, t=step: jnp.sin(v + t), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        budget, now = budget_schedule(step, init_budget=12, target_budget=3, total_steps=total,
                                      tfinal=2)
        if now or step >= total - 2:
            assert sum(ranks(state).values()) == budget, step
    assert len(traces) == 1


def test_a_stack_counts_each_layer_as_a_matrix():
    stacked = AdaLoraTriplet(jax.random.normal(jax.random.key(0), (3, 5, 4)),
                             jax.random.normal(jax.random.key(1), (3, 4, 6)),
                             e=jnp.ones((3, 4)), init_rank=4)
    tx = adalora_budget(tx_inner_sgd, target_rank=2, total_steps=4, tfinal=1)
    params, state = {"s": stacked}, tx.init({"s": stacked})
    for step in range(4):
        grads = jax.tree.map(lambda v, t=step: jnp.cos(v * (t + 1)), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    per_layer = ranks(state)["s"]
    assert len(per_layer) == 3 and sum(per_layer) == 2 * 3
    assert np.asarray(params["s"].active_ranks()).tolist() == per_layer
    rows = rank_table(ranks(state))
    assert [r["layer"] for r in rows] == [0, 1, 2]


def test_rank_figure_has_a_cell_per_layer_and_matrix():
    ax = plot_rank_allocation({"layers_0/attn/q/kernel": 3, "layers_1/attn/q/kernel": 1,
                               "layers_0/mlp/up/kernel": 2, "layers_1/mlp/up/kernel": 4})
    assert [t.get_text() for t in ax.texts] == ["3", "1", "2", "4"]  # row by row
    assert [t.get_text() for t in ax.get_yticklabels()] == ["attn/q", "mlp/up"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_rank=0, total_steps=5), "target_rank must be an integer >= 1"),
    (dict(target_rank=1, total_steps=5, tinit=3, tfinal=2), "no budgeting phase"),
    (dict(target_rank=1, total_steps=5, beta1=1.0), "beta1 must be in"),
])
def test_budget_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adalora_budget(tx_inner_sgd, **kwargs)


def test_budget_refuses_params_it_cannot_budget():
    tx = adalora_budget(tx_inner_sgd, target_rank=8, total_steps=5)
    with pytest.raises(ValueError, match="no AdaLoRA leaf"):
        tx.init({"w": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match=r"exceeds the rank of \[\('fc', 6\)"):
        tx.init({"fc": _triplets()["fc"]})
    state = adalora_budget(tx_inner_sgd, target_rank=1, total_steps=5).init(_triplets())
    with pytest.raises(ValueError, match="needs params"):
        adalora_budget(tx_inner_sgd, target_rank=1, total_steps=5).update(_triplets(), state)


def test_adalora_refuses_other_layouts_and_rslora():
    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(3, (3, 3), name="conv")(x)

    images = jnp.ones((1, 5, 5, 2))
    params = Conv().init(jax.random.key(0), images)["params"]
    with pytest.raises(ValueError, match="AdaLoRA adapts Dense-like kernels"):
        lr.init_adapters(jax.random.key(1), params, lr.LoraSpec(method="adalora", rank=2),
                         layouts=lr.discover_layouts(Conv(), params, images))
    with pytest.raises(ValueError, match="rslora=True does not apply"):
        lr.LoraSpec(method="adalora", rslora=True).method_for("d/kernel")


# ----------------------------------------------------------------------------- train(config)


def test_trains_from_the_config_and_exports_its_final_ranks(tmp_path):
    from lowrank.train import default_config, load_adapters, train

    config = default_config()
    config.steps, config.batch_size, config.quiet = 8, 8, True
    config.log.tensorboard = False
    config.workdir = str(tmp_path)
    config.lora.method, config.lora.rank = "adalora", 4
    config.lora.adalora.update(target_rank=2, tinit=1, tfinal=2, delta_t=1)
    result = train(config)
    final = ranks(result.state.opt_state)
    assert sum(v for v in final.values()) == 2 * len(final)
    index = json.loads((tmp_path / "adapters" / "adapters.json").read_text())
    assert index["ranks"] == final
    loaded = load_adapters(tmp_path / "adapters")
    for p, r in final.items():
        leaf = lr.paths.flatten(loaded)[p]
        assert isinstance(leaf, AdaLoraTriplet) and int(leaf.active_ranks()) == r
    assert np.isfinite(result.metrics["loss"])
    resumed = train(config)  # the budget's state comes back from the checkpoint
    assert int(resumed.start_step) == 8 and ranks(resumed.state.opt_state) == final
    from lowrank import stack
    config.workdir = None
    with pytest.raises(ValueError, match="'adalora' is not stackable"):
        stack.train_stacked([config, config])


def test_the_results_hash_leaves_out_the_budget_s_defaults():
    from lowrank.results import HASHED_UNLESS_DEFAULT, config_hash
    from lowrank.train import default_config

    config = default_config()
    ours = {k: v for k, v in HASHED_UNLESS_DEFAULT.items() if k.startswith("lora.adalora.")}
    assert ours == {f"lora.adalora.{k}": v for k, v in config.lora.adalora.items()}
    before = config_hash(config)
    config.lora.adalora.target_rank = 2
    assert config_hash(config) != before
