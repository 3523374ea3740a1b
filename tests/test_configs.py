"""configs/: what the baselines train, that the committed results stay recognised as finished,
and what the :tiny BBC configs train and evaluate on."""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import pandas as pd
import pytest

from lowrank import paths, results
from lowrank.train import train
from lowrank.train.loop import init_state

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import common, tasks  # noqa: E402

COMMITTED = ROOT / "experiments" / "results" / "runs.csv"


def _sweep_module():
    spec = importlib.util.spec_from_file_location("experiments_sweep_configs",
                                                  ROOT / "experiments" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    resolved = tasks.training_config(_baseline("head"))
    resolved.workdir = str(tmp_path)
    task, _ = tasks.build(resolved)
    result = train(resolved, task)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == resolved.steps
    assert losses[-1] < losses[0] - 0.05, losses
    assert tasks.count_trainable(result.trainable) == 165


# ---- committed results --------------------------------------------------------------------

@pytest.mark.skipif(not COMMITTED.is_file(), reason="no committed results")
def test_committed_results_are_recognised_as_finished():
    """Every committed row's hash is one the sweep computes from today's configs, so
    ``sweep.py`` skips those runs (baselines included) and ``report.py`` finds them."""
    sweep = _sweep_module()
    frame = pd.read_csv(COMMITTED)
    for experiment in ("rank_ablation", "quant_ablation"):
        module, config = common.load(f"configs/{experiment}.py")
        expected = {results.config_hash(results.apply_overrides(config, overrides))
                    for overrides in sweep.expand(module, config, seeds=2)}
        rows = frame[(frame.experiment == experiment) & (frame.status == "ok")]
        assert set(rows.config_hash) == expected, experiment
    methods = set(frame["config.method"])
    assert methods == {"lora", "full", "head"}
