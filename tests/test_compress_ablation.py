"""configs/compress_ablation.py and experiments/compression_report.py: the sweep's grid, the
compressed (and quantized) base a task gets, and the report's Pareto front and verdicts."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lowrank as lr
from lowrank import results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import common, tasks  # noqa: E402


def _report_module():
    spec = importlib.util.spec_from_file_location(
        "compression_report", ROOT / "experiments" / "compression_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sweep_covers_every_budget_format_and_recovery_once():
    module, config = common.load("configs/compress_ablation.py")
    runs = module.get_sweep(config)
    assert len(runs) == 18
    hashes = {results.config_hash(results.apply_overrides(config, r)) for r in runs}
    assert len(hashes) == 18
    refs = [r for r in runs if r["compress.budget"] == 0.0]
    assert {(r["quant.fmt"], r["method"]) for r in refs} == {
        (f, m) for f in ("none", "int8", "nf4") for m in ("head", "lora")}
    lm_module, lm = common.load("configs/compress_ablation.py:lm")  # no head: LoRA only
    assert lm.task == "configs.tasks:lm_domain"
    assert {r["method"] for r in lm_module.get_sweep(lm)} == {"lora"}


@pytest.mark.parametrize("fmt, aware", [
    ("none", False),
    # slow (~2.5 min here): the eager calibration forward, and a quantizer compiled for each
    # of the 24 factor shapes
    pytest.param("nf4", True, marks=pytest.mark.slow)])
def test_a_tiny_task_gets_compressed_encoder_kernels_and_their_accounting(fmt, aware):
    module, config = common.load("configs/compress_ablation.py:tiny")
    config = results.apply_overrides(config, {"compress.budget": 0.5, "quant.fmt": fmt,
                                              "compress.aware": aware})
    task, info = tasks.build(tasks.training_config(config))
    flat = lr.paths.flatten(task.params)
    compressed = {p: k for p, k in flat.items() if isinstance(k, lr.LowRankKernel)}
    assert len(compressed) == 12  # 2 layers x 6 kernels; embeddings and head stay float
    assert all(p.startswith("bert/encoder/") for p in compressed)
    assert all(lr.is_quantized(k.u) == (fmt == "nf4") for k in compressed.values())
    kept = sum(k.kept for k in compressed.values())
    dense = sum(k.size for k in compressed.values())
    assert 0.45 * dense < kept <= 0.5 * dense
    nbytes = sum(k.nbytes for k in compressed.values())
    assert info.quant_bits_per_param == 8 * nbytes / dense
    assert 0 < info.weight_rmse < 1
    assert not lr.frozen.is_frozen(flat["classifier/kernel"])
    assert not lr.frozen.is_frozen(flat["bert/embeddings/word_embeddings/embedding"])


def test_report_finds_the_pareto_front_and_says_which_base_wins_at_equal_size():
    report = _report_module()
    assert report.pareto([(32, 0.9), (8, 0.92), (4, 0.5), (16, 0.8)]) == [(4, 0.5), (8, 0.92)]
    frame = pd.DataFrame({
        "experiment": ["compress_ablation"] * 3, "seed": [0, 0, 0],
        "config.compress.budget": [0.0, 0.25, 0.0], "config.quant.fmt": ["none", "none", "int8"],
        "config.method": ["lora"] * 3, "metric.quant_bits_per_param": [np.nan, 8.0, 8.5],
        "metric.weight_rmse": [0.0, 0.01, 0.001], "metric.accuracy": [0.95, 0.60, 0.94]})
    summary = report.rows(frame)
    assert summary.set_index("budget").loc[0.25].kernel_bits == 8.0
    assert 32.0 in set(summary.kernel_bits)  # a dense float base counts 32 bits
    (line,) = report.comparisons(summary, 223)
    assert "rank 25% + float32 (8.00 bits/param, 60.0%) loses to dense int8" in line
