"""experiments/sweep.py --batch: compatible runs trained as one stack, one row each, with the
same results as the runs trained one by one, selection on validation included (the best
point, its test metrics and each test example's prediction)."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from lowrank.results import ResultsDB
from lowrank.train import load_adapters

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "sweep.py"

TOY_CONFIG = '''
from configs.common import base_config

def get_config(arg=None):
    config = base_config("lowrank.train.toy:classifier")
    config.adapt = "custom"
    config.lora.targets = r"hidden_\\d+/kernel"
    config.lora.trainable = r"head/.*"
    config.steps, config.batch_size = 4, 8
    config.eval.every, config.eval.select = 2, "accuracy"
    config.lock()
    return config

def get_sweep(config):
    return [{"lora.rank": 1}, {"lora.rank": 4}]
'''


def _sweep(config, db_path, *extra):
    args = [sys.executable, str(SWEEP), f"--config={config}", f"--db={db_path}", "--seeds=2",
            *extra]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    db = ResultsDB(db_path)
    try:
        rows = db.rows("ok")
    finally:
        db.close()
    return {r["config_hash"]: r for r in rows}


def test_batched_sweep_writes_one_row_per_run_equal_to_the_unbatched_sweep(tmp_path):
    config = tmp_path / "toy_sweep.py"
    config.write_text(TOY_CONFIG)
    export = "--config.export_adapters=True"
    stacked = _sweep(config, tmp_path / "stacked.sqlite", "--batch=4",
                     f"--workdir={tmp_path / 'stacked'}", export)
    single = _sweep(config, tmp_path / "single.sqlite", f"--workdir={tmp_path / 'single'}",
                    export)
    assert len(stacked) == 4 and stacked.keys() == single.keys()
    for h in stacked:  # each stacked run exports its adapters as the run alone does
        exports = [load_adapters(tmp_path / way / "toy_sweep" / h / "adapters")
                   for way in ("stacked", "single")]
        leaves = [jax.tree.leaves(e) for e in exports]
        assert len(leaves[0]) == len(leaves[1]) > 0
        for a, b in zip(*leaves, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    for h, row in stacked.items():
        for metric in ("metric.accuracy", "metric.loss", "metric.train_loss",
                       "metric.val_accuracy", "metric.val_loss", "metric.final_val_loss"):
            np.testing.assert_allclose(row[metric], single[h][metric], atol=1e-4, err_msg=metric)
        assert row["metric.best_step"] == single[h]["metric.best_step"]
        assert row["predictions"] == single[h]["predictions"] and row["predictions"]
        assert row["trainable_params"] == single[h]["trainable_params"]
