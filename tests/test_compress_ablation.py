"""configs/compress_ablation.py and experiments/compression_report.py: the sweep's grid, the
compressed (and quantized) base a task gets, and the report's Pareto front and verdicts."""

import importlib.util
import json
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


def test_the_sweep_covers_every_budget_format_and_recovery_at_every_rate_of_its_grid():
    module, config = common.load("configs/compress_ablation.py")
    runs = module.get_sweep(config)
    assert len(runs) == 9 * (3 + 4)  # bases x (LoRA's 3 rates + the head's 4)
    hashes = {results.config_hash(results.apply_overrides(config, r)) for r in runs}
    assert len(hashes) == len(runs)
    assert {r["optimizer.learning_rate"] for r in runs if r["method"] == "lora"} == {
        3e-4, 1e-3, 3e-3}
    assert {r["optimizer.learning_rate"] for r in runs if r["method"] == "head"} == {
        3e-3, 1e-2, 3e-2, 1e-1}
    refs = {(r["quant.fmt"], r["method"]) for r in runs if r["compress.budget"] == 0.0}
    assert refs == {(f, m) for f in ("none", "int8", "nf4") for m in ("head", "lora")}
    assert config.eval.select == "accuracy" and config.model.head_init == "seed"
    lm_module, lm = common.load("configs/compress_ablation.py:lm")  # no head
    lm_runs = lm_module.get_sweep(lm)
    assert lm.task == "configs.tasks:lm_domain" and lm.eval.select == "perplexity"
    untrained = [r for r in lm_runs if r["method"] == "none"]
    assert len(untrained) == 9 and all("optimizer.learning_rate" not in r for r in untrained)
    assert len(lm_runs) == 9 + 9 * 3


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


def _row(budget, fmt, lr, seed, correct, val, bits=np.nan):
    return {"experiment": "compress_ablation", "seed": seed, "config_hash": f"{budget}{fmt}{lr}",
            "config.compress.budget": budget, "config.quant.fmt": fmt, "config.method": "lora",
            "config.optimizer.learning_rate": lr, "config.eval.select": "accuracy",
            "config.model.num_layers": 6, "config.model.hidden_size": 384, "config.steps": 9,
            "metric.quant_bits_per_param": bits, "metric.weight_rmse": 0.01,
            "metric.accuracy": float(np.mean(correct)), "metric.val_accuracy": val,
            "predictions": json.dumps({"correct": list(correct)})}


def test_report_tunes_each_base_then_compares_equal_sizes_paired():
    report = _report_module()
    assert report.pareto([(32, 0.9), (8, 0.92), (4, 0.5), (16, 0.8)]) == [(4, 0.5), (8, 0.92)]
    n = 200
    good, bad = [1] * n, [1] * (n // 2) + [0] * (n // 2)
    frame = pd.DataFrame([
        _row(0.0, "none", 1e-3, 0, good, 0.9),
        _row(0.0, "int8", 1e-3, 0, good, 0.9, bits=8.5),
        _row(0.25, "none", 1e-3, 0, good, 0.5, bits=8.0),  # worse on validation: not chosen
        _row(0.25, "none", 3e-3, 0, bad, 0.6, bits=8.0)])
    table = report.table(frame, "compress_ablation")
    by_base = {r[0]: r for r in table.rows}
    assert by_base["rank 25% + float32"][4] == "0.003"  # the rate chosen on validation
    assert by_base["rank 25% + float32"][5] == "50.0"
    assert by_base["rank 25% + float32"][6].startswith("-50.0 [") and "†" in \
        by_base["rank 25% + float32"][6]
    assert by_base["dense float32"][1] == "32.00"  # a dense float base counts 32 bits
    (line,) = report.comparisons(frame, "compress_ablation")
    assert "rank 25% + float32 (8.00 bits) against dense int8 (8.50 bits): 50.0% vs 100.0%" \
        in line and line.endswith("the quantized base better, beyond noise.")


def _lm_row(budget, fmt, lr, seed, losses, val, bits=np.nan):
    losses = np.asarray(losses, float)
    return {"experiment": "compress_ablation:lm", "seed": seed,
            "config_hash": f"{budget}{fmt}{lr}{seed}", "config.compress.budget": budget,
            "config.quant.fmt": fmt, "config.method": "lora",
            "config.optimizer.learning_rate": lr, "config.eval.select": "perplexity",
            "config.model.num_layers": 4, "config.model.hidden_size": 128, "config.steps": 9,
            "metric.quant_bits_per_param": bits, "metric.weight_rmse": 0.01,
            "metric.accuracy": np.nan, "metric.perplexity": float(np.exp(losses.mean())),
            "metric.val_perplexity": val, "metric.val_loss": np.log(val),
            "predictions": json.dumps({"nll": list(2 * losses), "tokens": [2] * len(losses)})}


def test_lm_report_reads_lower_perplexity_as_better():
    report = _report_module()
    rng = np.random.default_rng(0)
    base = rng.uniform(1.5, 2.5, 100)
    frame = pd.DataFrame([
        _lm_row(0.0, "nf4", 1e-2, 0, base + 0.1, 8.0, bits=4.5),
        _lm_row(0.5, "int8", 1e-2, 0, base, 7.5, bits=4.25),  # low rank: lower loss
        _lm_row(0.5, "int8", 3e-2, 0, base + 1.0, 9.0, bits=4.25),  # worse on validation
        _lm_row(0.0, "none", 1e-2, 0, base - 0.2, 7.0)])
    rows = {r[0]: r for r in report.table(frame, "compress_ablation:lm").rows}
    assert rows["rank 50% + int8"][4] == "0.01"  # chosen on validation perplexity (lower)
    assert rows["rank 50% + int8"][6].startswith("+0.2000 [") and "†" in rows[
        "rank 50% + int8"][6]  # worse than the dense float base by 0.2 nats, beyond noise
    (line,) = report.comparisons(frame, "compress_ablation:lm")
    assert "rank 50% + int8 (4.25 bits) against dense nf4 (4.50 bits)" in line
    assert "-0.1000 nats/token" in line and line.endswith("the low-rank base better, beyond noise.")
    assert report.pareto([(32, 7.0), (4.5, 8.0), (4.25, 7.5)], higher_is_better=False) == [
        (4.25, 7.5), (32, 7.0)]


def test_committed_compression_block_is_generated_from_the_committed_rows():
    report = _report_module()
    import report_summary

    frame = report.load_runs(ROOT / "experiments" / "results" / "compression_runs.csv")
    experiments = [e for e in report.EXPERIMENTS if e in set(frame["experiment"])]
    assert experiments
    generated = report_summary.block(report.summary(frame, experiments))
    assert report_summary.readme_block(ROOT / "experiments" / "results" / "compression.md") \
        == generated, ("compression.md's block differs from what compression_runs.csv gives: "
                       "run python experiments/compression_report.py "
                       "--db=experiments/results/compression_runs.csv "
                       "--readme=experiments/results/compression.md")
