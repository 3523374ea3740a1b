"""report.py's method-comparison table (``experiments/report_variants.py``): each method at the
learning rate chosen on validation, named from its config, with paired differences from LoRA
that equal an independent bootstrap, for accuracy (BBC) and perplexity (the LM task)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lowrank import results, stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import report  # noqa: E402
import report_variants  # noqa: E402

N = 120


def _write(db, lora, *, seed, lr, val, correct=None, nll=None, method="lora", experiment):
    config = {"method": method, "adapt": "qv", "seed": seed, "steps": 30,
              "eval": {"select": "accuracy" if nll is None else "perplexity"},
              "lora": {"rank": 8, "alpha": 16.0, "rslora": False, "method": "lora",
                       "init": "kaiming", **lora},
              "model": {"num_layers": 4, "hidden_size": 128},
              "optimizer": {"learning_rate": lr}, "quant": {"fmt": "none"}}
    if nll is None:
        correct = np.asarray(correct, int)
        metrics = {"accuracy": correct.mean(), "val_accuracy": val, "val_loss": 1 - val}
        scores = {"correct": correct.tolist()}
    else:
        tokens = np.full(len(nll), 10.0)
        loss = float(np.sum(nll) / np.sum(tokens))
        metrics = {"loss": loss, "perplexity": float(np.exp(loss)), "val_loss": val,
                   "val_perplexity": float(np.exp(val))}
        scores = {"nll": list(map(float, nll)), "tokens": tokens.tolist()}
    db.write(config, metrics, experiment=experiment, trainable_params=1000, step_seconds=0.5,
             peak_memory_mb=1.0, predictions=json.dumps(scores))


def test_accuracy_table_names_methods_keeps_tuned_rates_and_pairs_with_lora():
    db, name = results.ResultsDB(":memory:"), "method_ablation"
    rng = np.random.default_rng(0)
    lora_correct = {s: (rng.random(N) < 0.9).astype(int) for s in range(3)}
    dora_correct = {s: (rng.random(N) < 0.8).astype(int) for s in range(3)}
    for seed in range(3):
        _write(db, {}, seed=seed, lr=1e-3, val=0.9, correct=lora_correct[seed],
               experiment=name)
        _write(db, {"method": "dora"}, seed=seed, lr=3e-4, val=0.85,
               correct=dora_correct[seed], experiment=name)
    # DoRA's other rate: worse on validation (never reported) though perfect on test
    _write(db, {"method": "dora"}, seed=0, lr=3e-3, val=0.5, correct=np.ones(N), experiment=name)
    _write(db, {"method": "adalora", "rank": 12, "adalora": {"target_rank": 8}}, seed=0,
           lr=1e-3, val=0.8, correct=lora_correct[0], experiment=name)
    table = dict(report.report(db.frame("ok")))["tab:variants"]
    rows = {r[0]: r for r in table.rows}
    assert list(rows) == ["LoRA r=8", "DoRA r=8", "AdaLoRA r=12→8"]
    assert rows["DoRA r=8"][2] == "0.0003"  # the rate chosen on validation
    expected = np.mean([dora_correct[s] for s in range(3)], 1)
    assert rows["DoRA r=8"][3] == report.mean_std(expected.tolist())
    independent = stats.paired_bootstrap(np.mean([dora_correct[s] for s in range(3)], 0),
                                         np.mean([lora_correct[s] for s in range(3)], 0))
    diff = 100 * independent.difference
    assert rows["DoRA r=8"][5].startswith(f"{diff:+.1f} [{100 * independent.low:+.1f}, ")
    assert rows["LoRA r=8"][5] == ""  # the reference itself
    # AdaLoRA ran seed 0 only: paired on the seeds both have, and equal to LoRA there
    assert rows["AdaLoRA r=12→8"][5].startswith("+0.0 [+0.0, +0.0]")


def test_perplexity_table_for_the_lm_variant():
    db, name = results.ResultsDB(":memory:"), "method_ablation:lm"
    rng = np.random.default_rng(1)
    lora_nll = {s: rng.uniform(10, 20, N) for s in range(2)}
    for seed in range(2):
        _write(db, {}, seed=seed, lr=1e-3, val=2.0, nll=lora_nll[seed], experiment=name)
        _write(db, {}, seed=seed, lr=3e-5, val=2.1, nll=lora_nll[seed] + 1.0, method="full",
               experiment=name)
    _write(db, {}, seed=0, lr=1e-3, val=2.5, nll=lora_nll[0] + 5.0, method="none",
           experiment=name)
    table = dict(report.report(db.frame("ok")))["tab:variants-lm"]
    assert table.header[3] == "test perplexity"
    rows = {r[0]: r for r in table.rows}
    assert list(rows) == ["pretrained base, not adapted", "LoRA r=8", "full fine-tuning"]
    assert rows["pretrained base, not adapted"][2] == "–"
    # 1.0 more nats per window of 10 tokens: +0.1 nats per token, the same in every window
    assert rows["full fine-tuning"][5] == "+0.1000 [+0.1000, +0.1000]†"
    full_ppl = [np.exp(np.sum(lora_nll[s] + 1.0) / (10 * N)) for s in range(2)]
    assert rows["full fine-tuning"][3] == report.mean_std(full_ppl, scale=1.0, digits=3)


@pytest.mark.parametrize("lora,name", [
    ({}, "LoRA r=8"), ({"rslora": True}, "rsLoRA r=8"), ({"method": "vera", "rank": 256},
                                                         "VeRA r=256"),
    ({"init": "pissa"}, "PiSSA r=8"), ({"init": "loftq"}, "LoftQ r=8 (nf4 base)")])
def test_variant_names(lora, name):
    row = {"config.method": "lora", "config.lora.rank": 8, "config.quant.fmt": "nf4"}
    row.update({f"config.lora.{k}": v for k, v in lora.items()})
    import pandas as pd

    assert report_variants.variant_name(pd.Series(row)) == name


def test_summary_lines_say_within_or_beyond_noise_from_the_paired_interval():
    import report_summary

    db, name = results.ResultsDB(":memory:"), "method_ablation:lm"
    rng = np.random.default_rng(2)
    lora_nll = rng.uniform(10, 20, N)
    noisy = lora_nll + rng.normal(0, 0.5, N)  # zero-mean noise
    _write(db, {}, seed=0, lr=1e-3, val=2.0, nll=lora_nll, experiment=name)
    _write(db, {"method": "dora"}, seed=0, lr=1e-3, val=2.0, nll=lora_nll + 2.0,
           experiment=name)  # +0.2 nats per token in every window: beyond noise
    _write(db, {"rslora": True}, seed=0, lr=1e-3, val=2.0, nll=noisy, experiment=name)
    text = "\n".join(report_summary.summary_lines(db.frame("ok")))
    assert "DoRA r=8 " in text and "+0.2000 nats/token [+0.2000, +0.2000]: beyond noise" in text
    d = stats.paired_bootstrap(noisy / 10, lora_nll / 10)  # the same test, independently
    verdict = "beyond noise" if d.excludes_zero else "within noise"
    assert (f"rsLoRA r=8 {np.exp(np.sum(noisy) / (10 * N)):.3f}, {d.difference:+.4f} "
            f"nats/token [{d.low:+.4f}, {d.high:+.4f}]: {verdict}") in text
    assert "last evaluation" not in text  # these rows stored no best step


def test_a_rate_chosen_at_the_edge_of_its_grid_is_marked():
    db, name = results.ResultsDB(":memory:"), "method_ablation"
    correct = np.ones(N, int)
    for lr, val in ((3e-4, 0.7), (1e-3, 0.8), (3e-3, 0.9)):  # the highest rate wins
        _write(db, {}, seed=0, lr=lr, val=val, correct=correct, experiment=name)
    for lr, val in ((3e-4, 0.7), (1e-3, 0.9), (3e-3, 0.8)):  # inside the grid
        _write(db, {"method": "dora"}, seed=0, lr=lr, val=val, correct=correct, experiment=name)
    table = dict(report.report(db.frame("ok")))["tab:variants"]
    rows = {r[0]: r for r in table.rows}
    assert rows["LoRA r=8"][2] == "0.003 ↑" and rows["DoRA r=8"][2] == "0.001"
    assert "↑ / ↓: the highest / lowest rate" in table.caption


@pytest.mark.parametrize("module", ["report_cells", "report_tables", "report_variants",
                                    "report_figures", "report_summary"])
def test_the_report_modules_docstring_examples_hold(module):
    # experiments/ is not a package, so --doctest-modules does not collect it: run them here
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_identical_predictions_are_said_to_be_identical_not_an_interval():
    import report_summary

    same = np.array([1.0, 0.0, 1.0, 1.0])
    d = stats.paired_bootstrap(same, same)
    assert (d.low, d.high) == (0.0, 0.0)
    assert report_summary._verdict(d, 0.75, 0.75) == (
        "+0.0 points: the same seed-averaged correctness on every test example")
    other = stats.paired_bootstrap(same, np.array([0.0, 0.0, 1.0, 1.0]))
    assert report_summary._verdict(other, 0.75, 0.5).startswith("+25.0 points [")
