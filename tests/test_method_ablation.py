"""configs/method_ablation.py: its sweep, and its tiny variant run end to end (in process for
the methods new to it; through experiments/sweep.py, every method, under ``-m slow``)."""

import importlib.util
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


def test_sweep_has_every_method_once_with_its_own_hash():
    module, config = common.load("configs/method_ablation.py")
    runs = module.get_sweep(config)
    assert len(runs) == 9
    hashes = {results.config_hash(results.apply_overrides(config, r)) for r in runs}
    assert len(hashes) == 9
    resolved = {name: results.apply_overrides(config, r) for name, r in zip(
        config.sweep.methods, runs, strict=True)}
    assert resolved["adalora"].lora.method == "adalora"
    assert resolved["adalora"].lora.adalora.target_rank == resolved["lora"].lora.rank
    assert resolved["loftq"].quant.fmt == "nf4" and resolved["pissa"].quant.fmt == "none"
    assert resolved["full"].method == "full" and resolved["rslora"].lora.rslora


# VeRA through train(config) is tested in test_vera.py; its sweep run is the slow tier's.
@pytest.mark.parametrize("name", [pytest.param("vera", marks=pytest.mark.slow), "adalora",
                                  "loftq"])
def test_tiny_runs_end_to_end(name):
    run = _module("experiments_run_methods", "experiments/run.py")
    module, config = common.load("configs/method_ablation.py:tiny")
    overrides = module.get_sweep(config)[list(config.sweep.methods).index(name)]
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
    assert counts == {"done": 9, "skipped": 0, "failed": 0}
