"""configs/: what the baselines train, that the committed results stay recognised as finished,
and what the :tiny BBC configs train and evaluate on."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

from lowrank import data, paths, results
from lowrank.train import train
from lowrank.train.loop import init_state

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import common, tasks  # noqa: E402

COMMITTED = ROOT / "experiments" / "results" / "runs.csv"


def _baseline(method: str):
    _, config = common.load("configs/rank_ablation.py:tiny")
    rates = {"full": 1e-4, "head": 1e-2}
    return results.apply_overrides(config, {"method": method,
                                            "optimizer.learning_rate": rates[method]})


def _trainable_names(resolved) -> tuple[list[str], int, int]:
    task, info = tasks.build(resolved)
    abstract = jax.eval_shape(lambda: init_state(resolved, task))
    names = sorted(paths.flatten(abstract.trainable))
    return names, tasks.count_trainable(abstract.trainable), info.base_params


# ---- baselines: no adapters, the same leaves trained as with the old placeholder ---------

def test_baselines_resolve_to_no_targets_in_the_locked_config():
    for method, trainable in (("head", r"classifier/.*"), ("full", ".*")):
        resolved = tasks.training_config(_baseline(method))
        assert resolved.is_locked  # ml_collections takes None for a str field when locked
        assert resolved.lora.targets is None and resolved.lora.trainable == trainable
    with pytest.raises(ValueError, match="'head' needs a classifier head"):
        config = common.load("configs/lm_domain.py:tiny")[1]
        tasks.training_config(results.apply_overrides(config, {"method": "head"}))


def test_head_baseline_trains_the_classifier_only():
    names, count, _ = _trainable_names(tasks.training_config(_baseline("head")))
    # Before LoraSpec(targets=None) these two plus a 1x1 placeholder adapter (not counted).
    assert names == ["classifier/bias", "classifier/kernel"]
    assert count == 32 * 5 + 5  # the tiny BERT's width 32, five topics


def test_full_baseline_trains_every_base_weight():
    resolved = tasks.training_config(_baseline("full"))
    names, count, base_params = _trainable_names(resolved)
    task, _ = tasks.build(resolved)
    assert names == sorted(paths.flatten(task.params))
    assert len(names) == 39 and count == base_params == 1_010_469


def test_tiny_head_baseline_loss_decreases(tmp_path):
    """The head-only baseline trains its head: the loss on one batch, seen at every step,
    falls once the warmup step (learning rate 0) is past. (Over the changing batches of the
    stratified tiny subset a few steps of a random tiny BERT's head stay near chance.)"""
    resolved = tasks.training_config(_baseline("head"))
    resolved.workdir, resolved.steps = str(tmp_path), 5
    task, _ = tasks.build(resolved)
    one_batch = dataclasses.replace(task, train_batch=lambda seed, step: task.train_batch(seed, 0))
    result = train(resolved, one_batch)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 5 and losses[0] == losses[1]  # warmup: step 0 has learning rate 0
    assert all(b < a for a, b in zip(losses[1:-1], losses[2:], strict=True)), losses
    assert losses[-1] < losses[0] - 0.05, losses
    assert tasks.count_trainable(result.trainable) == 165


# ---- committed results --------------------------------------------------------------------

@pytest.mark.skipif(not COMMITTED.is_file(), reason="no committed results")
def test_reproduce_sh_pins_the_commits_the_committed_rows_record(tmp_path):
    """reproduce.sh reruns each experiment at the commit its rows record, and refuses to run
    when its pins and runs.csv disagree."""
    script = ROOT / "experiments" / "results" / "reproduce.sh"
    env = {**os.environ, "PY": sys.executable}
    done = subprocess.run(["bash", str(script), "--check"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    frame = pd.read_csv(COMMITTED)
    text = script.read_text()
    for commit in set(frame[frame.status == "ok"].git_commit):
        assert commit in text
    # a pin that no longer matches the rows is refused before anything runs
    stale = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(stale)], check=True)
    (stale / "experiments" / "results").mkdir(parents=True)
    (stale / "experiments" / "results" / "reproduce.sh").write_text(
        text.replace("eb38e647586c73058a04b3735f312894aefa63f7", "0" * 40))
    (stale / "experiments" / "results" / "runs.csv").write_text(COMMITTED.read_text())
    done = subprocess.run(["bash", str(stale / "experiments/results/reproduce.sh")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert "differ from those experiments/results/runs.csv records" in done.stderr


# ---- the :tiny BBC subsets ------------------------------------------------------------------

def _rows(batches):
    """The real rows of ``batches`` as a set of token tuples with their label."""
    rows = []
    for batch in batches:
        for ids, label, valid in zip(batch["input_ids"], batch["labels"], batch["valid"],
                                     strict=True):
            if valid:
                rows.append((tuple(ids.tolist()), int(label)))
    return rows


def test_tiny_bbc_eval_and_train_subsets_cover_several_topics():
    config = common.load("configs/finetune_bbc.py:tiny")[1]
    task, _ = tasks.build(tasks.training_config(config))
    split = tasks.bbc_arrays(config.data.max_length)["test"]
    assert set(split["labels"][:config.data.eval_examples].tolist()) == {0}  # sorted by id
    rows = _rows(task.eval_batches())
    assert len(rows) == config.data.eval_examples == 24
    labels = [label for _, label in rows]
    assert len(set(labels)) >= 3 and max(labels.count(y) for y in set(labels)) <= 5
    whole = set(_rows(data.eval_batches(split, 64)))
    assert set(rows) <= whole  # articles of the test split, each once
    assert rows == _rows(tasks.build(tasks.training_config(config))[0].eval_batches())
    train_labels = {int(y) for step in range(8) for y in task.train_batch(0, step)["labels"]}
    assert train_labels == {0, 1, 2, 3, 4}


def test_stratified_subset_takes_labels_in_turn_and_keeps_full_sets_whole():
    labels = np.array([0] * 6 + [1] * 3 + [2])
    arrays = {"labels": labels, "x": np.arange(10)}
    picked = tasks.stratified_subset(arrays, 5)
    assert sorted(picked["labels"].tolist()) == [0, 0, 1, 1, 2]
    assert np.array_equal(picked["labels"], labels[picked["x"]])  # rows stay whole, in order
    assert list(picked["x"]) == sorted(picked["x"])
    assert tasks.stratified_subset(arrays, 0) is arrays
    assert tasks.stratified_subset(arrays, 10) is arrays
    other_seed = tasks.stratified_subset(arrays, 5, seed=1)
    assert sorted(other_seed["labels"].tolist()) == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="a subset of -1 examples"):
        tasks.stratified_subset(arrays, -1)
    # The full-size and :quick configs (the committed results) use every article.
    for variant in ("default", "quick"):
        config = common.load(f"configs/finetune_bbc.py:{variant}")[1]
        assert (config.data.eval_examples, config.data.train_examples) == (0, 0)


def test_model_dropout_is_on_in_training_steps_only_when_the_config_asks():
    _, config = common.load("configs/finetune_bbc.py:tiny")
    on = tasks.training_config(results.apply_overrides(config, {"model.dropout": True}))
    assert results.config_hash(config) == results.config_hash(
        results.apply_overrides(config, {"model.dropout": False}))  # old rows keep their hash
    task = tasks.build(on)[0]
    plain = tasks.build(tasks.training_config(config))[0]
    batch = task.train_batch(0, 0)

    def out(t, rng):
        return np.asarray(t.forward(t.model, t.params, {}, batch, rng))

    key = jax.random.key(3)
    np.testing.assert_array_equal(out(task, None), out(plain, None))  # evaluation: no dropout
    np.testing.assert_array_equal(out(plain, key), out(plain, None))  # the default: none
    a, b = out(task, key), out(task, jax.random.key(4))
    assert not np.allclose(a, out(task, None)) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, out(task, key))  # the key decides the masks
