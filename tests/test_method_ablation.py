"""configs/method_ablation.py: its sweep, and its tiny variant run end to end (in process for
the methods new to it; through experiments/sweep.py, every method, under ``-m slow``)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lowrank import results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import common  # noqa: E402


def _module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sweep_has_every_method_at_every_rate_of_its_grid_with_its_own_hash():
    module, config = common.load("configs/method_ablation.py")
    runs = module.get_sweep(config)
    sizes = {name: 4 if name == "full" else 3 for name in config.sweep.methods}
    assert len(runs) == sum(sizes.values()) == 9 * 3 + 1  # full: a rate above the protocol's
    hashes = {results.config_hash(results.apply_overrides(config, r)) for r in runs}
    assert len(hashes) == len(runs)
    starts = np.cumsum([0, *sizes.values()])
    resolved = {name: [results.apply_overrides(config, r) for r in runs[start: start + n]]
                for (name, n), start in zip(sizes.items(), starts, strict=False)}
    rates = {name: [c.optimizer.learning_rate for c in group]
             for name, group in resolved.items()}
    assert rates["lora"] == rates["dora"] == [3e-4, 1e-3, 3e-3]
    assert rates["vera"] == rates["head"] == [3e-3, 1e-2, 3e-2]
    assert rates["full"] == [1e-5, 3e-5, 1e-4, 3e-4]
    lora, adalora, rslora = resolved["lora"][0], resolved["adalora"][0], resolved["rslora"][0]
    assert adalora.lora.method == "adalora"
    assert adalora.lora.adalora.target_rank == lora.lora.rank
    assert lora.lora.alpha == 2 * lora.lora.rank and adalora.lora.alpha == 2 * adalora.lora.rank
    assert rslora.lora.rslora and rslora.lora.alpha == 8.0
    assert resolved["loftq"][0].quant.fmt == "nf4" and resolved["pissa"][0].quant.fmt == "none"
    assert resolved["full"][0].method == "full"
    assert lora.eval.select == "accuracy" and lora.data.eval_split == "validation"


# VeRA through train(config) is tested in test_vera.py; its sweep run is the slow tier's.
@pytest.mark.parametrize("name", [pytest.param("vera", marks=pytest.mark.slow), "adalora",
                                  "loftq"])
def test_tiny_runs_end_to_end(name):
    run = _module("experiments_run_methods", "experiments/run.py")
    module, config = common.load("configs/method_ablation.py:tiny")
    overrides = module.get_sweep(config)[2 * list(config.sweep.methods).index(name)]
    config = results.apply_overrides(config, overrides)
    row = run.run(config, db_path=":memory:", experiment="test")
    assert np.isfinite(row["train_loss"]) and 0.0 <= row["accuracy"] <= 1.0
    assert row["trainable_params"] > 0
    if name == "loftq":  # the run quantized the base itself (LoftQ), in nf4
        assert row["bits_per_param"] < 32 and 0 < row["weight_rmse"] < 0.1


@pytest.mark.slow
def test_tiny_sweep_runs_every_method(tmp_path):
    """python -m pytest -m slow tests/test_method_ablation.py (several minutes: one process
    per run)."""
    sweep = _module("experiments_sweep_methods", "experiments/sweep.py")
    db = tmp_path / "results.sqlite"
    counts = sweep.sweep("configs/method_ablation.py:tiny", [], seeds=1, db_path=str(db),
                         experiment="method_ablation")
    assert counts == {"done": 18, "skipped": 0, "failed": 0}


@pytest.mark.parametrize("name", ["none", "lora"])
def test_lm_tiny_reports_test_perplexity_at_the_best_validation_point(name):
    """The LM variant: validation and test are disjoint held-out windows; the row's perplexity
    is the test split's, with one loss per test window stored for paired tests (the untrained
    base reports its own test split the same way)."""
    run = _module("experiments_run_methods", "experiments/run.py")
    module, config = common.load("configs/method_ablation.py:lm_tiny")
    overrides = next(r for r in module.get_sweep(config)
                     if r.get("method", "lora") == name and "lora.method" not in r
                     and "lora.init" not in r and not r.get("lora.rslora"))
    row = run.run(results.apply_overrides(config, overrides), db_path=":memory:",
                  experiment="test")
    assert row["perplexity"] != row["val_perplexity"]  # two splits
    assert row["perplexity"] == pytest.approx(np.exp(row["loss"]), rel=1e-5)
    scores = json.loads(row["predictions"])
    assert len(scores["nll"]) == config.data.eval_windows
    mean_loss = np.sum(scores["nll"]) / np.sum(scores["tokens"])
    assert mean_loss == pytest.approx(row["loss"], rel=1e-4)
