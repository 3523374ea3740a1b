"""Stacked adapters: K runs trained by one program equal the same K runs trained alone; the
padding and the entries a member does not train stay exactly put; the frozen (quantized)
base is held once and dequantized once per step; incompatible runs are refused by name."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank import optim, quant, stack
from lowrank.lora import LoraPair
from lowrank.train import (
    NonFiniteLoss,
    TrainState,
    default_config,
    init_state,
    load_task,
    optimizer,
    train,
)
from lowrank.train.step import make_loss_fn

HIDDEN = r"hidden_\d+/kernel"
MODEL_METRICS = ("loss", "accuracy", "grad_norm", "learning_rate")


def _config(overrides: dict):
    """The toy classifier, 3 steps of 8 examples, LoRA on the hidden layers with dropout."""
    config = default_config()
    config.steps, config.batch_size, config.quiet = 3, 8, True
    config.lora.targets, config.lora.dropout = HIDDEN, 0.1
    config.optimizer.clip_norm = 1.0
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


# Ranks 1, 4 and 16 with different alphas (one rsLoRA), seeds (so different data orders and
# dropout masks), learning rates and schedules, weight decay, Adam constants, targets (the
# third adapts hidden_0 only) and trained leaves (the third also trains the head in full).
MEMBERS = [
    {"seed": 0, "lora.rank": 1, "lora.alpha": 16.0, "optimizer.learning_rate": 1e-2,
     "optimizer.schedule": "warmup_cosine", "optimizer.warmup_steps": 1},
    {"seed": 1, "lora.rank": 4, "lora.alpha": 4.0, "optimizer.learning_rate": 3e-3,
     "optimizer.weight_decay": 0.1, "optimizer.b2": 0.99},
    {"seed": 2, "lora.rank": 16, "lora.alpha": 16.0, "lora.rslora": True,
     "lora.targets": r"hidden_0/kernel", "lora.trainable": r"head/.*",
     "optimizer.learning_rate": 5e-3, "optimizer.eps": 1e-6},
]


QUANT = quant.QuantSpec("nf4", block_size=32, double_quant=True, targets=HIDDEN)


@pytest.fixture(scope="module")
def task():
    return load_task(_config({}))


@pytest.fixture(scope="module")
def quantized_task(task):
    """The toy task with its hidden kernels stored in NF4 (the head stays float32)."""
    return dataclasses.replace(task, params=quant.quantize_tree(task.params, QUANT))


# A member whose loss becomes NaN at step 2 (as its own run would): it gets that error, and
# the others are unaffected.
DIVERGING = {"seed": 3, "lora.rank": 2, "optimizer.learning_rate": 1e30}


@pytest.fixture(scope="module")
def runs(quantized_task):
    configs = [_config(m) for m in MEMBERS]
    stacked = stack.train_stacked([*configs, _config(DIVERGING)], quantized_task)
    return configs, stacked, [train(c, quantized_task) for c in configs]


def _max_diff(a, b) -> float:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)
                                                            - jnp.asarray(y, jnp.float32)))),
                         a, b)
    return max(jax.tree.leaves(diffs), default=0.0)


def _assert_same_run(stacked, alone):
    # Same tree structure includes each LoraPair's static scale and each adapter's rank.
    assert _max_diff(stacked.trainable, alone.trainable) <= 1e-5
    assert _max_diff(stacked.state.opt_state, alone.state.opt_state) <= 1e-5
    assert int(stacked.state.step) == int(alone.state.step)
    np.testing.assert_array_equal(stacked.state.rng, alone.state.rng)
    for name in MODEL_METRICS:
        assert stacked.metrics[name] == pytest.approx(alone.metrics[name], abs=1e-4), name
    assert set(stacked.eval_metrics) == set(alone.eval_metrics)
    for name, value in alone.eval_metrics.items():
        assert stacked.eval_metrics[name] == pytest.approx(value, abs=1e-4), name


def test_each_member_equals_its_own_run_over_a_quantized_base(runs):
    configs, (*stacked, diverged), alone = runs
    assert isinstance(diverged, NonFiniteLoss)
    assert "the training loss is nan at step 2" in str(diverged)
    assert [r.trainable["hidden_0"]["kernel"].rank for r in stacked] == [1, 4, 16]
    assert "hidden_1" not in stacked[2].trainable and "head" in stacked[2].trainable
    for s, a in zip(stacked, alone, strict=True):
        _assert_same_run(s, a)
    # The members really trained differently (so equality above is not a coincidence).
    b0 = [np.asarray(r.trainable["hidden_0"]["kernel"].b) for r in stacked]
    assert all(np.abs(b).max() > 1e-4 for b in b0)
    assert len({round(r.metrics["loss"], 6) for r in stacked}) == 3


def _toy_stack(task, members, weight_decay=0.0, per_member_batches=True):
    configs = [_config({**m, "optimizer.weight_decay": weight_decay}) for m in members]
    schedules_txs = [optimizer(c) for c in configs]
    states = [init_state(c, task) for c in configs]
    stacked = stack.stack_states(states, task.params, [tx for _, tx in schedules_txs])
    step = stack.make_stacked_train_step(
        make_loss_fn(task.model, task.forward, task.loss),
        [stack.adamw_arguments(c, s) for c, (s, _) in zip(configs, schedules_txs, strict=True)],
        per_member_batches=per_member_batches)
    return configs, states, stacked, step


def test_padding_and_untrained_entries_stay_exactly_put(task):
    # Weight decay on, so without the masks it would move the head of the member that does
    # not train it; Adam's epsilon would not stop it either. Member 1 adapts hidden_0 only.
    members = [{"seed": 0, "lora.rank": 1, "lora.alpha": 16.0},
               {"seed": 1, "lora.rank": 4, "lora.alpha": 16.0, "lora.targets": r"hidden_0/kernel",
                "lora.trainable": r"head/.*"}]
    configs, states, stacked, step = _toy_stack(task, members, weight_decay=0.5)
    # Unstacking gives back each member's own layout (ranks, targets, scales) and values.
    for got, want in zip(stack.unstack_states(stacked, states), states, strict=True):
        assert _max_diff(got, want) == 0.0
    with pytest.raises(ValueError, match="2 members but 1 templates"):
        stack.unstack_states(stacked, states[:1])
    step = jax.jit(step)
    for i in range(3):
        batch = jax.tree.map(lambda *xs: np.stack(xs),
                             *(task.train_batch(c.seed, i) for c in configs))
        stacked, _ = step(stacked, task.params, batch)
    t = stacked.train.trainable
    for k, rank in enumerate((1, 4)):
        pair = t["hidden_0"]["kernel"]
        assert not np.any(np.asarray(pair.a[k, :, rank:]))
        assert not np.any(np.asarray(pair.b[k, rank:, :]))
        assert np.all(np.asarray(pair.b[k, :rank, :]) != 0)
    assert not np.any(np.asarray(t["hidden_1"]["kernel"].a[1]))
    assert not np.any(np.asarray(t["hidden_1"]["kernel"].b[1]))
    assert np.any(np.asarray(t["hidden_1"]["kernel"].b[0]))
    np.testing.assert_array_equal(t["head"]["kernel"][0], task.params["head"]["kernel"])
    np.testing.assert_array_equal(t["head"]["bias"][0], task.params["head"]["bias"])
    assert np.abs(np.asarray(t["head"]["kernel"][1]) - task.params["head"]["kernel"]).max() > 0
    # Scales differ (16/1, 16/4): each member carries a multiplier, the stacked pair scale 1.
    assert t["hidden_0"]["kernel"].scale == 1.0 and t["hidden_1"]["kernel"].scale == 16.0
    np.testing.assert_array_equal(stacked.multipliers["hidden_0/kernel"], [16.0, 4.0])
    assert "hidden_1/kernel" not in stacked.multipliers


def test_masks_pass_only_what_a_member_trains():
    mask = {"w": jnp.array([True, False, True])}
    loss = stack.member_loss_fn(lambda t, f, b, r: (jnp.sum(t["w"] ** 2), {}), mask, {})
    grads = jax.grad(lambda t: loss(t, None, None, None)[0])({"w": jnp.ones(3)})
    np.testing.assert_array_equal(grads["w"], [2.0, 0.0, 2.0])
    # Zero gradients, but weight decay still moves a weight; the mask stops it.
    mask = {"w": jnp.array([[True, False, True]])}
    tx = stack.masked_updates(optim.adamw(1.0, weight_decay=1.0, eps=1.0), mask)
    params = {"w": jnp.full((1, 3), 5.0)}
    updates, _ = tx.update({"w": jnp.zeros((1, 3))}, tx.init(params), params)
    np.testing.assert_array_equal(updates["w"], [[-5.0, 0.0, -5.0]])


@pytest.mark.slow
def test_members_sharing_batches_and_micro_batches_equal_their_own_runs(task):
    # One seed: the members share every batch (broadcast); two micro-batches per step.
    configs = [_config({"lora.rank": r, "optimizer.learning_rate": lr, "micro_batches": 2})
               for r, lr in ((2, 1e-2), (8, 3e-3))]
    stacked = stack.train_stacked(configs, task)
    for s, c in zip(stacked, configs, strict=True):
        _assert_same_run(s, train(c, task))


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_frozen_base_is_held_once_and_dequantized_once(quantized_task):
    """The compiled program's arguments for K=8 exceed K=1's by 7 members' state alone, and
    its HLO unpacks each quantized weight once (no member axis), forward and backward."""
    task = quantized_task
    batch = task.train_batch(0, 0)
    # (A frozen leaf that every member trains would go unused and be left out.)
    config = _config({"lora.rank": 8})
    state, loss_fn = init_state(config, task), make_loss_fn(task.model, task.forward, task.loss)
    sizes = {}
    for k in (1, 8):
        schedules_txs = [optimizer(_config({"optimizer.learning_rate": 1e-3 * (i + 1)}))
                         for i in range(k)]
        stacked = stack.stack_states([state] * k, task.params, [tx for _, tx in schedules_txs])
        step = stack.make_stacked_train_step(
            loss_fn, [stack.adamw_arguments(config, s) for s, _ in schedules_txs])
        compiled = jax.jit(step).lower(stacked, task.params, batch).compile()
        sizes[k] = (compiled.memory_analysis().argument_size_in_bytes, _bytes(stacked))
        unpacks = re.findall(r"u8\[([\d,]*)\]\S* shift-right-logical\(", compiled.as_text())
        codes = sorted(str(x.codes.shape[0]) for x in jax.tree.leaves(
            task.params, is_leaf=quant.is_quantized) if quant.is_quantized(x))
        assert sorted(unpacks) == codes  # one unpack of each weight's [nbytes] codes
    frozen, batch_bytes = _bytes(task.params), _bytes(batch)
    for arguments, stacked_bytes in sizes.values():
        assert arguments == frozen + batch_bytes + stacked_bytes
    per_member = sizes[1][1]
    assert sizes[8][1] == 8 * per_member
    assert sizes[8][0] - sizes[1][0] == 7 * per_member


def test_incompatible_runs_are_refused_by_name(task):
    a, b = _config({}), _config({"batch_size": 16})
    with pytest.raises(ValueError, match=r"batch_size is 8 in run 0 and 16 in run 1"):
        stack.check_compatible([a, b])
    for key, value in (("lora.dropout", 0.0), ("optimizer.clip_norm", None), ("steps", 4)):
        with pytest.raises(ValueError, match=re.escape(key)):
            stack.train_stacked([a, _config({key: value})], task)
    with pytest.raises(ValueError, match="at least one"):
        stack.train_stacked([], task)
    with pytest.raises(ValueError, match="'pissa'"):
        stack.train_stacked([_config({"lora.init": "pissa"})], task)
    with pytest.raises(ValueError, match="'pmap' is not stackable"):
        stack.train_stacked([_config({"parallel.mode": "pmap"})], task)
    with pytest.raises(ValueError, match="config.workdir is '/tmp/runs'.*set config.workdir"):
        stack.train_stacked([_config({"workdir": "/tmp/runs"})], task)


def test_group_compatible_keeps_order_and_size():
    configs = [_config(o) for o in ({}, {"lora.rank": 2}, {"steps": 5}, {"seed": 3},
                                    {"steps": 5, "lora.alpha": 1.0}, {"workdir": "/tmp/x"})]
    assert stack.group_compatible(configs) == [[0, 1, 3, 5], [2, 4]]
    assert stack.group_compatible(configs, max_size=3) == [[0, 1, 3], [5], [2, 4]]
    # A caller's own per-member field (the experiments' "adapt") joins member_keys.
    with_adapt = [_config({}), _config({})]
    for config, adapt in zip(with_adapt, ("q", "all"), strict=True):
        with config.unlocked():
            config.adapt = adapt
    assert stack.group_compatible(with_adapt) == [[0], [1]]
    assert stack.group_compatible(with_adapt, member_keys=(*stack.MEMBER_KEYS, "adapt")) == [
        [0, 1]]
    with pytest.raises(ValueError, match="max_size must be an integer >= 1"):
        stack.group_compatible(configs, max_size=0)


@pytest.mark.parametrize("override", [{"lora.init": "pissa"}, {"lora.init": "loftq"},
                                      {"lora.method": "adalora"}, {"parallel.mode": "pmap"}])
def test_a_run_that_cannot_stack_is_grouped_alone(override):
    """lora.init is a member key (kaiming and gaussian members stack), but a run that
    train_stacked would refuse whatever its company gets a group of its own, so a sweep's
    --batch never hands it a stack (PiSSA at 1e-2 beside LoRA's runs failed so)."""
    configs = [_config({}), _config(override), _config({"seed": 1}), _config(override)]
    assert stack.unstackable(configs[1]) is not None
    assert stack.group_compatible(configs) == [[0, 2], [1], [3]]
    stack.check_compatible([configs[0], configs[2]])


def test_bad_optimizers_and_layouts_are_refused_by_name():
    loss_fn = lambda t, f, b, r: (0.0, {})  # noqa: E731
    schedule = optax.constant_schedule(1e-3)
    cases = [
        ([dict(learning_rate=schedule, clip_norm=1.0), dict(learning_rate=schedule)],
         "given for some members only"),
        ([dict(learning_rate=schedule, clip_norm=1.0), dict(learning_rate=schedule,
                                                            clip_norm=2.0)], "'clip_norm'"),
        ([dict(learning_rate=schedule, momentum=0.9)],
         r"unknown optimizer arguments \['momentum'\]"),
        ([dict(learning_rate=schedule), dict(learning_rate=1e-3)], "mix learning-rate"),
        ([dict(weight_decay=0.1)], "needs a learning_rate"),
        ([], "got none"),
    ]
    for optimizers, message in cases:
        with pytest.raises(ValueError, match=message):
            stack.make_stacked_train_step(loss_fn, optimizers)

    def state(leaf):
        return TrainState.create({"d": {"kernel": leaf}}, optax.sgd(0.1), jax.random.key(0))

    pair = LoraPair(jnp.zeros((4, 2)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="'d/kernel'.*some adapt it with a LoraPair"):
        stack.stack_states([state(pair), state(jnp.zeros((4, 3)))], {}, [optax.sgd(0.1)] * 2)
    with pytest.raises(ValueError, match="2 states but 1 optimizers"):
        stack.stack_states([state(pair)] * 2, {}, [optax.sgd(0.1)])
    other = LoraPair(jnp.zeros((5, 2)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="do not fit one weight"):
        stack.stack_states([state(pair), state(other)], {}, [optax.sgd(0.1)] * 2)
    head = {"d": {"kernel": pair}}
    with pytest.raises(ValueError, match="'e' is trained by some members only"):
        stack.stack_states(
            [state(pair), TrainState.create({**head, "e": jnp.ones(2)}, optax.sgd(0.1),
                                            jax.random.key(0))],
            {"e": quant.quantize(jnp.ones((64,)), "int8")}, [optax.sgd(0.1)] * 2)


@pytest.mark.slow
def test_tiny_bbc_rank_sweep_members_equal_their_own_runs():
    """The experiments' tiny BBC config (BERT with attention, LayerNorm, a trained head):
    a stack of ranks 1 and 4 equals the two runs made one after another."""
    from configs import tasks
    from configs.finetune_bbc import get_config
    from lowrank import results

    base = get_config("tiny")
    configs = [tasks.training_config(results.apply_overrides(base, {"lora.rank": r, "seed": s}))
               for r, s in ((1, 0), (4, 1))]
    assert stack.group_compatible(configs) == [[0, 1]]
    task, _ = tasks.build(configs[0])
    for s, c in zip(stack.train_stacked(configs, task), configs, strict=True):
        _assert_same_run(s, train(c, task))


def test_a_stack_holds_several_seeds_of_a_task_that_draws_the_head_from_the_seed():
    """The protocol's tiny BBC config draws each seed's head (``model.head_init="seed"``): a
    stack of seeds 0 and 1 equals each run trained alone on the task built for its seed;
    a member that would take a drawn leaf from the shared frozen tree is refused."""
    from configs import tasks
    from configs.finetune_bbc import get_config
    from lowrank import results

    base = get_config("tiny")
    with base.unlocked():
        base.model.head_init = "seed"
    configs = [tasks.training_config(results.apply_overrides(base, {"seed": s}))
               for s in (0, 1)]
    assert stack.group_compatible(configs) == [[0, 1]]
    task, _ = tasks.build(configs[0])
    alone = [train(c, tasks.build(c)[0]) for c in configs]
    for member, run in zip(stack.train_stacked(configs, task), alone, strict=True):
        _assert_same_run(member, run)
    heads = [run.trainable["classifier"]["kernel"] for run in alone]
    assert _max_diff(heads[0], heads[1]) > 1e-3  # the seeds' heads differ
    frozen_head = [results.apply_overrides(c, {"lora.trainable": "bert/embeddings/LayerNorm/.*"})
                   for c in configs]
    with pytest.raises(ValueError, match=r"draws \['classifier/bias', 'classifier/kernel'\]"):
        stack.train_stacked(frozen_head, task)
