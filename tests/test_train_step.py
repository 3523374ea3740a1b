"""The pure train step: gradients of the trainable tree only, accumulation, dtypes, remat,
schedules, losses and the eval loop, against hand-computed or independently computed values."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import lowrank as lr
from lowrank import quant
from lowrank.train import (
    TrainState,
    cast_floating,
    classification_loss,
    evaluate,
    lm_loss,
    make_eval_step,
    make_loss_fn,
    make_schedule,
    make_train_step,
    toy,
)
from lowrank.train.step import split_micro_batches

TASK = toy.classifier(ml_collections.ConfigDict({"batch_size": 16}))
SPEC = lr.LoraSpec(rank=2, alpha=4.0, targets=r"hidden_\d+/kernel", trainable=r"head/bias")


def _trainable():
    """Adapters with non-zero B, so that every factor gets a gradient on the first step."""
    adapters = lr.init_adapters(jax.random.key(1), TASK.params, SPEC)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return treedef.unflatten([0.3 * jax.random.normal(k, x.shape) for k, x in
                              zip(keys, leaves, strict=True)])


def _run(micro_batches, batch, steps=2, tx=None, **loss_kwargs):
    tx = tx or optax.sgd(0.5)
    loss_fn = make_loss_fn(TASK.model, TASK.forward, TASK.loss, **loss_kwargs)
    step = jax.jit(make_train_step(loss_fn, tx, micro_batches=micro_batches))
    state = TrainState.create(_trainable(), tx, jax.random.key(3))
    for _ in range(steps):
        state, metrics = step(state, TASK.params, batch)
    return state, metrics


def _max_diff(a, b):
    return max(float(jnp.abs(x - y).max()) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@jax.default_matmul_precision("highest")  # GPUs would otherwise multiply float32 in TF32
def test_accumulating_4_micro_batches_equals_one_batch_4x_as_large():
    batch = TASK.train_batch(0, 0)  # 16 examples: 4 micro-batches of 4
    whole, whole_metrics = _run(1, batch)
    accumulated, acc_metrics = _run(4, batch)
    assert _max_diff(whole.trainable, accumulated.trainable) < 1e-5
    np.testing.assert_allclose(acc_metrics["loss"], whole_metrics["loss"], atol=1e-5)
    np.testing.assert_allclose(acc_metrics["grad_norm"], whole_metrics["grad_norm"], atol=1e-5)
    assert float(acc_metrics["weight"]) == 16
    # ...and it is not what one micro-batch alone gives
    first_quarter = {k: v[0::4] for k, v in batch.items()}
    alone, _ = _run(1, first_quarter)
    assert _max_diff(alone.trainable, accumulated.trainable) > 1e-3


def test_micro_batch_i_takes_every_m_th_example():
    parts = split_micro_batches({"x": jnp.arange(8).reshape(8, 1)}, 4)["x"]
    assert parts.shape == (4, 2, 1) and parts[1, :, 0].tolist() == [1, 5]
    with pytest.raises(ValueError, match="6 examples does not split into 4 micro-batches"):
        split_micro_batches({"x": jnp.arange(6)}, 4)


def test_only_the_trainable_tree_gets_gradients_and_optimizer_state():
    batch = TASK.train_batch(0, 0)
    tx = optax.adam(1e-2)
    state, _ = _run(1, batch, steps=1, tx=tx)
    n_trainable = len(jax.tree.leaves(state.trainable))
    assert n_trainable == 5  # A and B of two adapters, and the head bias
    mu = state.opt_state[0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(state.trainable)
    # the step changed every trainable leaf; the frozen tree is an input, never an output
    start = _trainable()
    for before, after in zip(jax.tree.leaves(start), jax.tree.leaves(state.trainable),
                             strict=True):
        assert float(jnp.abs(before - after).max()) > 0


@jax.default_matmul_precision("highest")
def test_metrics_report_the_norm_before_clipping_and_the_scheduled_rate():
    batch = TASK.train_batch(0, 0)
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    tx = lr.optim.adamw(schedule, clip_norm=1e-3)
    loss_fn = make_loss_fn(TASK.model, TASK.forward, TASK.loss)
    step = jax.jit(make_train_step(loss_fn, tx, schedule=schedule))
    state = TrainState.create(_trainable(), tx, jax.random.key(3))
    grads = jax.jit(jax.grad(lambda t: loss_fn(t, TASK.params, batch, None)[0]))(
        state.trainable)
    state, m1 = step(state, TASK.params, batch)
    _, m2 = step(state, TASK.params, batch)
    np.testing.assert_allclose(m1["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    assert float(m1["grad_norm"]) > 1e-2  # far above the clip: the metric is pre-clip
    assert float(m1["learning_rate"]) == 1.0 and float(m2["learning_rate"]) == pytest.approx(0.9)


def test_remat_gives_the_same_step():
    batch = TASK.train_batch(0, 0)
    plain, _ = _run(2, batch)
    remat, _ = _run(2, batch, remat=True)
    assert _max_diff(plain.trainable, remat.trainable) < 1e-6


def test_bfloat16_compute_keeps_float32_parameters():
    batch = TASK.train_batch(0, 0)
    f32, m32 = _run(1, batch, steps=1)
    bf16, m16 = _run(1, batch, steps=1, compute_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf16.trainable)} == {jnp.dtype(jnp.float32)}
    diff = abs(float(m16["loss"]) - float(m32["loss"]))
    assert 0 < diff < 0.05  # bfloat16 rounding shows, but it is the same computation


def test_cast_floating_tells_quantized_weights_their_compute_dtype():
    q = quant.quantize(jnp.ones((64, 64)), "nf4")
    tree = {"q": q, "w": jnp.ones(3), "ids": jnp.arange(3)}
    cast = cast_floating(tree, jnp.bfloat16)
    assert cast["w"].dtype == jnp.bfloat16 and cast["ids"].dtype == tree["ids"].dtype
    assert cast["q"].compute_dtype == "bfloat16" and cast["q"].codes is q.codes
    assert quant.dequantize(cast["q"]).dtype == jnp.bfloat16


@jax.default_matmul_precision("highest")
def test_a_quantized_frozen_base_trains():
    frozen = dict(TASK.params)
    frozen["hidden_0"] = {**frozen["hidden_0"],
                          "kernel": quant.quantize(frozen["hidden_0"]["kernel"], "nf4", 64)}
    tx = optax.sgd(0.5)
    loss_fn = make_loss_fn(TASK.model, TASK.forward, TASK.loss)
    step = jax.jit(make_train_step(loss_fn, tx))
    state = TrainState.create(_trainable(), tx, jax.random.key(3))
    batch = TASK.train_batch(0, 0)
    _, m_q = step(state, frozen, batch)
    dequantized = {**frozen, "hidden_0": {**frozen["hidden_0"],
                                          "kernel": quant.dequantize(frozen["hidden_0"]["kernel"])}}
    state = TrainState.create(_trainable(), tx, jax.random.key(3))
    _, m_f = step(state, dequantized, batch)
    np.testing.assert_allclose(m_q["loss"], m_f["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_q["grad_norm"], m_f["grad_norm"], rtol=1e-5)


def test_schedules_take_their_documented_values():
    cosine = make_schedule("warmup_cosine", 1.0, steps=10, warmup_steps=2, end_learning_rate=0.1)
    assert [round(float(cosine(s)), 4) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.55, 0.1]
    constant = make_schedule("constant", 0.3, steps=10, warmup_steps=3)
    assert [round(float(constant(s)), 4) for s in (0, 3, 9)] == [0.0, 0.3, 0.3]
    linear = make_schedule("linear", 1.0, steps=4)
    assert [float(linear(s)) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="'cosine'.*accepted: .*'warmup_cosine'"):
        make_schedule("cosine", 1.0, steps=10)
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        make_schedule("linear", 1.0, steps=10, warmup_steps=11)


def test_losses_ignore_padding_and_masked_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1], [0.1, 0.9]]))
    labels = jnp.array([0, 0, 0])
    loss, m = jax.jit(classification_loss)(logits, {"labels": labels,
                                                    "valid": jnp.array([1, 1, 0])})
    np.testing.assert_allclose(loss, -(np.log(0.5) + np.log(0.9)) / 2, rtol=1e-6)
    # the padded row would be wrong; the tie of row 0 goes to class 0 (argmax)
    assert float(m["accuracy"]) == 1.0 and float(m["weight"]) == 2
    lm_logits = jnp.log(jnp.array([[[0.25, 0.75], [0.5, 0.5]]]))
    batch = {"targets": jnp.array([[1, 0]]), "mask": jnp.array([[1, 0]])}
    loss, m = jax.jit(lm_loss)(lm_logits, batch)
    np.testing.assert_allclose(loss, -np.log(0.75), rtol=1e-6)
    np.testing.assert_allclose(m["perplexity"], 1 / 0.75, rtol=1e-6)
    with pytest.raises(ValueError, match=r"logits \(3, 2\) do not fit labels \(2,\)"):
        classification_loss(logits, {"labels": jnp.array([0, 1])})


@jax.default_matmul_precision("highest")
def test_evaluate_over_padded_batches_equals_one_pass_over_the_examples():
    loss_fn = make_loss_fn(TASK.model, TASK.forward, TASK.loss)
    eval_step = jax.jit(make_eval_step(loss_fn))
    trainable = _trainable()
    batches = list(TASK.eval_batches())  # 64 examples in 4 batches of 16
    together = {k: np.concatenate([b[k] for b in batches]) for k in ("inputs", "labels")}
    reference = eval_step(trainable, TASK.params, together)
    got = evaluate(eval_step, trainable, TASK.params, batches)
    np.testing.assert_allclose(got["loss"], reference["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], reference["accuracy"], rtol=1e-6)
    # a last batch padded by lowrank.data.eval_batches counts its real rows only
    padded = list(lr.data.eval_batches({k: v[:20] for k, v in together.items()}, 16))
    assert [int(b["valid"].sum()) for b in padded] == [16, 4]
    direct = eval_step(trainable, TASK.params, {k: v[:20] for k, v in together.items()})
    got = evaluate(eval_step, trainable, TASK.params, padded)
    np.testing.assert_allclose(got["loss"], direct["loss"], rtol=1e-5)
    assert got["weight"] == 20
