"""A stack with a workdir checkpoints like a single run: stopped mid-way, it resumes from its
newest checkpoint and ends equal to an uninterrupted stack; checkpoints of another stack are
refused, naming the difference."""

import dataclasses

import jax
import numpy as np
import pytest

from lowrank import stack
from lowrank.train import default_config, toy


def _configs():
    configs = []
    for rank, seed, lr in ((2, 0, 1e-2), (4, 1, 3e-3)):
        config = default_config()
        config.steps, config.batch_size, config.quiet = 6, 8, True
        config.lora.rank, config.seed, config.optimizer.learning_rate = rank, seed, lr
        config.checkpoint.every = 2
        configs.append(config)
    return configs


class Preempted(Exception):
    pass


def _preempted_at(task, step):
    def train_batch(seed, i):
        if i == step:
            raise Preempted(f"stopped before step {i}")
        return task.train_batch(seed, i)

    return dataclasses.replace(task, train_batch=train_batch)


def _leaves(result):
    return [np.asarray(x) for x in jax.tree.leaves((result.state.trainable, result.state.opt_state,
                                                     result.state.step, result.state.rng))]


def test_a_stopped_stack_resumes_and_ends_equal(tmp_path):
    configs = _configs()
    task = toy.classifier(configs[0])
    whole = stack.train_stacked(configs, task)

    with pytest.raises(Preempted):
        stack.train_stacked(configs, _preempted_at(task, 3), workdir=str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]

    resumed = stack.train_stacked(configs, task, workdir=str(tmp_path))
    for a, b in zip(whole, resumed, strict=True):
        assert b.start_step == 2 and b.timed_steps == 3
        for x, y in zip(_leaves(a), _leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
        assert b.eval_metrics == a.eval_metrics
        assert b.metrics["loss"] == a.metrics["loss"]

    # Resumed from its final checkpoint, it trains nothing and returns the same results.
    again = stack.train_stacked(configs, task, workdir=str(tmp_path))
    for a, b in zip(whole, again, strict=True):
        assert b.start_step == 6
        assert b.metrics["loss"] == a.metrics["loss"]
        for x, y in zip(_leaves(a), _leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


def test_checkpoints_of_another_stack_are_refused(tmp_path):
    configs = _configs()
    task = toy.classifier(configs[0])
    stack.train_stacked(configs, task, workdir=str(tmp_path))
    configs[1].optimizer.learning_rate = 1e-3
    with pytest.raises(ValueError, match="(?s)cannot resume the stack .*run.members: checkpoint"):
        stack.train_stacked(configs, task, workdir=str(tmp_path))
