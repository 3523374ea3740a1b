"""config.eval.select: the best validation point, and the test split scored at it."""

import json

import jax
import numpy as np
import pytest

from lowrank.train import Checkpointer, default_config, evaluate, make_eval_step, toy, train
from lowrank.train.loop import init_state
from lowrank.train.selection import BEST_FILE
from lowrank.train.step import make_loss_fn
from lowrank.train.task import default_forward


def _config(tmp_path, steps=12, select="accuracy"):
    config = default_config()
    config.steps, config.batch_size, config.quiet = steps, 16, True
    config.lora.rank, config.lora.targets = 2, r"hidden_\d/kernel"
    config.lora.trainable = "head/.*"
    config.optimizer.learning_rate = 0.05
    config.eval.every, config.eval.select = 2, select
    config.checkpoint.every, config.checkpoint.keep = 2, 100
    config.log.tensorboard = False
    config.workdir = str(tmp_path)
    with config.unlocked():
        config.toy = dict(examples=256, eval_examples=48, test_examples=40)
    return config


def test_best_point_is_the_best_validation_evaluation_and_its_test_scores(tmp_path):
    config = _config(tmp_path)
    task = toy.classifier(config)
    result = train(config, task)
    best = result.best

    # the best is the first evaluation with the highest validation accuracy in the log
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/accuracy"]) for r in logged if "eval/accuracy" in r]
    assert [s for s, _ in evals] == list(range(2, 13, 2))
    top = max(a for _, a in evals)
    assert best.step == next(s for s, a in evals if a == top)
    assert best.validation["accuracy"] == pytest.approx(top)

    # the test metrics equal an independent evaluation of the checkpoint of that step
    abstract = jax.eval_shape(lambda: init_state(config, task))
    state, _, _ = Checkpointer(tmp_path / "checkpoints").restore(abstract, best.step)
    eval_step = jax.jit(make_eval_step(make_loss_fn(task.model, default_forward,
                                                    "classification")))
    expected = evaluate(eval_step, state.trainable, task.params, task.test_batches())
    assert best.test["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-7)
    assert best.test["loss"] == pytest.approx(expected["loss"], rel=1e-6)

    # per-example scores: one per test example, in order, consistent with the metric
    labels = np.concatenate([np.asarray(b["labels"])[np.asarray(b["valid"], bool)]
                             for b in task.test_batches()])
    assert len(best.scores["prediction"]) == len(labels) == 40
    correct = np.asarray(best.scores["prediction"]) == labels
    assert correct.tolist() == [bool(c) for c in best.scores["correct"]]
    assert correct.mean() == pytest.approx(best.test["accuracy"])
    assert json.loads((tmp_path / BEST_FILE).read_text())["step"] == best.step


def test_a_resumed_run_keeps_its_best_point(tmp_path):
    whole = train(_config(tmp_path / "whole", select="loss"), None).best
    config = _config(tmp_path / "cut", steps=6, select="loss")
    config.optimizer.schedule = "constant"
    train(config)
    resumed = train(_config(tmp_path / "cut", select="loss")).best
    assert resumed.step == whole.step
    assert resumed.validation == pytest.approx(whole.validation)
    assert resumed.test == pytest.approx(whole.test)
    assert resumed.scores == whole.scores


def test_lm_scores_are_per_sequence_losses(tmp_path):
    config = _config(tmp_path, select="perplexity")
    config.task = "lowrank.train.toy:lm"
    config.lora.targets, config.lora.trainable = r"hidden_\d/kernel", None
    result = train(config)
    scores = result.best.scores
    assert len(scores["nll"]) == 40
    mean_loss = np.sum(scores["nll"]) / np.sum(scores["tokens"])
    assert mean_loss == pytest.approx(result.best.test["loss"], rel=1e-5)


def test_bad_select_is_named(tmp_path):
    config = _config(tmp_path, select="f1")
    with pytest.raises(ValueError, match="config.eval.select 'f1' is not one of"):
        train(config)
    config = _config(tmp_path, select="perplexity")  # a classification task has no perplexity
    with pytest.raises(ValueError, match="'perplexity' is not among the evaluation metrics"):
        train(config)


def test_stored_best_point_survives_a_resume_and_later_points_are_dropped(tmp_path):
    from lowrank.train.selection import BestPoint, Selector

    stored = BestPoint(4, {"accuracy": 0.9}, {"accuracy": 0.8}, {"correct": [1, 0]})
    (tmp_path / BEST_FILE).write_text(json.dumps(stored.to_json()))
    never = lambda *a: pytest.fail("the test split is scored only at a new best")  # noqa: E731

    resumed = Selector("accuracy", never, None, tmp_path, start=6)
    assert resumed.best == stored
    assert not resumed.observe(8, {"accuracy": 0.85}, never, {}, {})
    assert resumed.best == stored

    # resuming from before the stored point: it is found again when its step comes
    earlier = Selector("accuracy", None, None, tmp_path, start=2)
    assert earlier.best is None
    assert earlier.observe(4, {"accuracy": 0.5}, never, {}, {})
    assert earlier.best.step == 4 and earlier.best.test is None
