"""Stacks select on validation (``config.eval.select``) as single runs do: each member's best
point (its step, validation and test metrics, per-example test scores) equals that of the
same run trained alone, and a stack stopped after a checkpoint resumes to the same points."""

import dataclasses

import numpy as np
import pytest

from lowrank import stack
from lowrank.train import default_config, toy, train


def _configs(eval_every=3):
    configs = []
    for rank, seed, lr in ((2, 0, 3e-2), (4, 1, 1e-2), (1, 0, 3e-3)):
        config = default_config()
        config.steps, config.batch_size, config.quiet = 12, 8, True
        config.lora.rank, config.seed, config.optimizer.learning_rate = rank, seed, lr
        config.eval.every, config.eval.select = eval_every, "accuracy"
        config.checkpoint.every = 6
        configs.append(config)
    return configs


def _same_point(a, b):
    assert a.step == b.step
    for name in ("validation", "test"):
        x, y = getattr(a, name), getattr(b, name)
        assert sorted(x) == sorted(y)
        for key in x:
            assert x[key] == pytest.approx(y[key], abs=1e-5), (name, key)
    assert a.scores["correct"] == b.scores["correct"]
    assert a.scores["prediction"] == b.scores["prediction"]


def test_each_member_finds_the_best_point_its_own_run_finds():
    configs = _configs()
    task = toy.classifier(configs[0])
    stacked = stack.train_stacked(configs, task)
    steps = set()
    for config, member in zip(configs, stacked, strict=True):
        alone = train(config, task)
        assert alone.best is not None and member.best is not None
        _same_point(member.best, alone.best)
        assert len(member.best.scores["correct"]) == len(alone.best.scores["correct"]) > 0
        steps.add(member.best.step)
        for key, value in alone.eval_metrics.items():  # the last evaluation too
            assert member.eval_metrics[key] == pytest.approx(value, abs=1e-5)
    assert steps <= {3, 6, 9, 12}


class Preempted(Exception):
    pass


def test_a_stopped_stack_resumes_to_the_same_best_points(tmp_path):
    configs = _configs()
    task = toy.classifier(configs[0])
    whole = stack.train_stacked(configs, task)

    def train_batch(seed, i):
        if i == 8:
            raise Preempted(f"stopped before step {i}")
        return task.train_batch(seed, i)

    with pytest.raises(Preempted):
        stack.train_stacked(configs, dataclasses.replace(task, train_batch=train_batch),
                            workdir=str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6"]
    resumed = stack.train_stacked(configs, task, workdir=str(tmp_path))
    for a, b in zip(whole, resumed, strict=True):
        assert b.start_step == 6
        _same_point(a.best, b.best)
        np.testing.assert_array_equal(np.asarray(a.best.scores["prediction"]),
                                      np.asarray(b.best.scores["prediction"]))
