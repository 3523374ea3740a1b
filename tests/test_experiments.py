"""The experiments layer: configs (each ``:tiny`` variant end to end), the results database,
sweep expansion, override errors, and report tables against hand-computed values."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pandas as pd
import pytest

from lowrank import results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import common, tasks  # noqa: E402


def _module(name, path):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


report = _module("experiments_report", "experiments/report.py")
sweep = _module("experiments_sweep", "experiments/sweep.py")
run = _module("experiments_run", "experiments/run.py")


# ---- results database -------------------------------------------------------------------

def test_db_round_trip_flattens_config_and_metrics():
    db = results.ResultsDB(":memory:")
    config = ml_collections.ConfigDict({"lora": {"rank": 4, "rank_pattern": (("q", 2),)},
                                        "seed": 3, "workdir": "/somewhere"})
    db.write(config, {"accuracy": 0.75}, experiment="e", trainable_params=10, step_seconds=0.5)
    db.write({"seed": 4}, {}, status="failed", traceback="Boom")
    (row,) = db.rows("ok")
    assert row["config.lora.rank"] == 4 and row["seed"] == 3
    assert row["config.lora.rank_pattern"] == '[["q", 2]]'
    assert row["metric.accuracy"] == 0.75 and row["trainable_params"] == 10
    assert row["config_hash"] == results.config_hash(config)
    assert db.finished_hashes() == {row["config_hash"]}
    assert db.finished_hashes("other") == set()
    assert [r["traceback"] for r in db.rows("failed")] == ["Boom"]
    with pytest.raises(ValueError, match="unknown result fields \\['bogus'\\]"):
        db.write({}, {}, bogus=1)
    with pytest.raises(ValueError, match="status 'done' is not one of"):
        db.write({}, {}, status="done")


def test_config_hash_ignores_where_and_sweep_fields_only():
    base = {"lora": {"rank": 8}, "seed": 0, "workdir": None, "sweep": {"ranks": (1, 2)}}
    same = {**base, "workdir": "/x", "quiet": True, "sweep": {"ranks": (4,)}}
    assert results.config_hash(base) == results.config_hash(same)
    assert results.config_hash(base) != results.config_hash({**base, "lora": {"rank": 4}})
    assert results.config_hash({"p": (1, 2)}) == results.config_hash({"p": [1, 2]})


def test_apply_overrides_and_unknown_key_lists_valid_keys():
    config = common.load("configs/finetune_bbc.py:tiny")[1]
    changed = results.apply_overrides(config, {"lora.rank": 2, "method": "full"})
    assert (changed.lora.rank, changed.method, config.lora.rank) == (2, "full", 8)
    with pytest.raises(KeyError) as err:
        results.apply_overrides(config, {"lora.rnak": 2})
    assert "unknown config key 'lora.rnak'" in str(err.value)
    assert "lora.rank" in str(err.value) and "optimizer.learning_rate" in str(err.value)


def test_run_script_rejects_unknown_override_listing_valid_keys():
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "run.py"),
         "--config=configs/finetune_bbc.py:tiny", "--config.lora.rnak=2", "--db=:memory:"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert "unknown config key 'lora.rnak'; valid keys: adapt, batch_size" in done.stderr
    assert "lora.rank, lora.rank_pattern" in done.stderr


# ---- configs and sweeps -----------------------------------------------------------------

def test_sweeps_expand_to_the_papers_grids():
    module, config = common.load("configs/rank_ablation.py")
    runs = sweep.expand(module, config, seeds=2)
    # 5 target sets x 6 ranks x 2 scale conventions x 4 learning rates, 2 baselines x 3 rates
    assert len(runs) == 2 * (5 * 6 * 2 * 4 + 2 * 3)
    assert runs[0] == {"method": "lora", "adapt": "q", "lora.rank": 1, "lora.alpha": 2.0,
                       "lora.rslora": False, "optimizer.learning_rate": 3e-4, "seed": 0}
    assert {r["lora.rank"] for r in runs if "lora.rank" in r} == {1, 2, 4, 8, 16, 64}
    assert {(r["lora.alpha"] / r["lora.rank"]) for r in runs
            if "lora.rank" in r and not r["lora.rslora"]} == {2.0}  # a constant scale
    assert [r["seed"] for r in runs] == [0] * 246 + [1] * 246  # every setting once, then again
    hashes = {results.config_hash(results.apply_overrides(config, r)) for r in runs}
    assert len(hashes) == len(runs)
    module, config = common.load("configs/quant_ablation.py")
    names = [tuple(sorted(o.items())) for o in module.get_sweep(config)]
    assert len(names) == 6 and (("quant.double_quant", True), ("quant.fmt", "nf4")) in names
    with pytest.raises(ValueError, match="--seeds must be >= 1, got 0"):
        sweep.expand(module, config, seeds=0)


def test_target_sets_select_the_intended_minilm_weights():
    from lowrank import paths

    names = [f"bert/encoder/layer_0/{p}/kernel" for p in (
        "attention/self/query", "attention/self/key", "attention/self/value",
        "attention/output/dense", "intermediate/dense", "output/dense")] + ["classifier/kernel"]
    chosen = {k: len(paths.select(names, v)) for k, v in common.TARGET_SETS["bert"].items()}
    assert chosen == {"q": 1, "v": 1, "qv": 2, "qkvo": 4, "all": 6}


def test_bad_experiment_fields_are_named():
    config = common.load("configs/finetune_bbc.py:tiny")[1]
    with pytest.raises(ValueError, match="config.adapt 'qk' is not one of"):
        tasks.training_config(results.apply_overrides(config, {"adapt": "qk"}))
    bad = results.apply_overrides(config, {"method": "full", "quant.fmt": "nf4"})
    with pytest.raises(ValueError, match="cannot be stored quantized"):
        tasks.training_config(bad)
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        common.load("configs/finetune_bbc.py:huge")


@pytest.mark.parametrize("spec, overrides", [
    ("configs/finetune_bbc.py:tiny", {}),
    ("configs/rank_ablation.py:tiny", {"method": "full", "optimizer.learning_rate": 1e-4}),
    ("configs/quant_ablation.py:tiny", {"quant.fmt": "nf4", "quant.double_quant": True}),
    ("configs/lm_domain.py:tiny", {"quant.fmt": "nf4"}),
])
def test_tiny_config_runs_end_to_end(spec, overrides):
    module, config = common.load(spec)
    assert overrides in module.get_sweep(config) or not overrides
    config = results.apply_overrides(config, overrides)
    row = run.run(config, db_path=":memory:", experiment="test")
    assert row["config_hash"] == results.config_hash(config)
    assert row["step_seconds"] > 0 and row["peak_memory_mb"] > 0
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["loss"])
    if config.quant.fmt == "nf4":
        assert 0 < row["weight_rmse"] < 0.1
        expected = 4 + 8 / 64 + 32 / (64 * 256) if config.quant.double_quant else 4.5
        assert row["quant_bits_per_param"] == pytest.approx(expected, abs=0.05)
        assert row["bits_per_param"] < 32
    if "lm_domain" in spec:
        assert row["perplexity"] == pytest.approx(np.exp(row["loss"]), rel=1e-5)
    else:
        assert 0.0 <= row["accuracy"] <= 1.0
    if config.method == "full":  # every weight of the tiny BERT (placeholder excluded)
        assert row["trainable_params"] == row["base_params"]
    if config.eval.get("select", None):  # the protocol: test scores at the best val epoch
        assert row["best_step"] in range(config.eval.every, config.steps + 1, config.eval.every)
        scores = json.loads(row["predictions"])
        assert len(scores["correct"]) == config.data.eval_examples
        assert np.mean(scores["correct"]) == pytest.approx(row["accuracy"])


# ---- report -----------------------------------------------------------------------------

def _synthetic_frame():
    db = results.ResultsDB(":memory:")
    base = {"method": "lora", "adapt": "q", "lora": {"rank": 1}, "quant": {"fmt": "none",
                                                                          "double_quant": False}}
    acc = {("q", 1): (0.80, 0.90), ("q", 4): (0.85, 0.87), ("all", 1): (0.95, 0.97)}
    for (adapt, rank), values in acc.items():
        for seed, a in enumerate(values):
            cfg = {**base, "adapt": adapt, "lora": {"rank": rank}, "seed": seed}
            db.write(cfg, {"accuracy": a}, experiment="rank_ablation", trainable_params=rank * 10,
                     step_seconds=0.5 + seed, peak_memory_mb=100.0)
    db.write({**base, "method": "full", "seed": 0}, {"accuracy": 0.99},
             experiment="rank_ablation", trainable_params=1000, step_seconds=2.0,
             peak_memory_mb=300.0)
    for fmt, dq, bits, rmse, a in [("none", False, float("nan"), 0.0, 0.9),
                                   ("nf4", True, 4.127, 0.01, 0.8)]:
        cfg = {**base, "adapt": "all", "lora": {"rank": 8}, "seed": 0,
               "quant": {"fmt": fmt, "double_quant": dq}}
        db.write(cfg, {"accuracy": a, "quant_bits_per_param": bits, "weight_rmse": rmse},
                 experiment="quant_ablation", trainable_params=80, step_seconds=1.0,
                 peak_memory_mb=200.0)
    db.write({"seed": 9}, {}, status="failed", experiment="rank_ablation", traceback="x")
    return db.frame("ok")


def test_rank_table_equals_hand_computed_values():
    table = report.rank_table(_synthetic_frame())
    assert table.header == ["weights adapted", "scale", "learning rate", "r=1", "r=4"]
    # q, r=1: (80 + 90) / 2 = 85.0, sample std = |90 - 80| / sqrt(2) = 7.07
    # q, r=4: 86.0 ± 1.4; all, r=1: 96.0 ± 1.4; no all r=4 run (no alpha recorded: "–")
    assert table.rows == [["W_q", "–", "–", "85.0 ± 7.1", "86.0 ± 1.4"],
                          ["all linear", "–", "–", "96.0 ± 1.4", "–"]]
    assert "seeds [0, 1]" in table.caption and "untested" in table.caption
    # baselines in their own table, without a rank; full: one seed, no rate recorded
    assert report.baseline_table(_synthetic_frame()).rows == [
        ["full fine-tuning", "1,000", "–", "99.0", ""]]


def test_quant_and_method_tables_equal_hand_computed_values():
    frame = _synthetic_frame()
    # whole-model bits are the bits_per_param column (not written here: "–"), the
    # quantized-weight bits the metric; no predictions: no paired difference
    assert report.quant_table(frame).rows == [["float32", "–", "32", "0", "–", "90.0", ""],
                                              ["nf4+dq", "–", "4.127", "1.00e-02", "–", "80.0",
                                               ""]]
    rows = report.method_table(frame, ranks=(1, 8)).rows
    # LoRA r=1 on W_q: step seconds of seeds 0 and 1 are 0.5 and 1.5 -> 1.00
    assert ["LoRA r=1 (W_q)", "10", "1.00", "100"] in rows
    assert ["full fine-tuning", "1,000", "2.00", "300"] in rows
    assert ["LoRA r=8 (all linear) over nf4+dq", "80", "1.00", "200"] in rows
    assert rows[-1][0] == "LoRA r=8 (all linear) over nf4+dq"


def test_lm_table_equals_hand_computed_values():
    db = results.ResultsDB(":memory:")
    model = {"num_layers": 4, "hidden_size": 128}
    for fmt, bits, rmse, ppls in [("none", float("nan"), 0.0, (10.0, 10.5)),
                                  ("nf4", 4.5, 0.003, (10.2, 10.4))]:
        for seed, ppl in enumerate(ppls):
            cfg = {"model": model, "lora": {"rank": 8}, "steps": 100, "seed": seed,
                   "quant": {"fmt": fmt, "double_quant": False}}
            db.write(cfg, {"perplexity": ppl, "train_loss": 2.0 + seed,
                           "quant_bits_per_param": bits, "weight_rmse": rmse},
                     experiment="lm_domain")
    table = report.lm_table(db.frame("ok"))
    # float32: mean 10.25, sample std |10.5 - 10.0| / sqrt(2) = 0.354; losses 2.0, 3.0
    assert table.rows == [
        ["LoRA", "float32", "–", "32", "0", "10.25 ± 0.35", "2.500 ± 0.707"],
        ["LoRA", "nf4", "–", "4.500", "3.00e-03", "10.30 ± 0.14", "2.500 ± 0.707"]]
    assert "4-layer" in table.caption and "r=8" in table.caption
    assert report.lm_table(_synthetic_frame()).rows == []  # other experiments: no rows


def test_markdown_and_latex_rendering():
    table = report.Table(["a", "b"], [["W_q", "1.0 ± 0.5"]], "Acc. in %")
    assert report.to_markdown(table).splitlines() == [
        "*Acc. in %*", "", "| a | b |", "|---|---|", "| W_q | 1.0 ± 0.5 |"]
    latex = report.to_latex(table, "tab:x")
    assert r"W\_q & 1.0 $\pm$ 0.5 \\" in latex
    assert latex.index(r"\toprule") < latex.index(r"\midrule") < latex.index(r"\bottomrule")
    assert r"\caption{Acc. in \%}" in latex and r"\label{tab:x}" in latex


def test_report_script_writes_tables_csv_and_figure(tmp_path):
    db_path = tmp_path / "r.sqlite"
    frame = _synthetic_frame()
    db = results.ResultsDB(db_path)
    for _, row in frame.iterrows():
        cfg = {k[len("config."):]: v for k, v in row.items()
               if k.startswith("config.") and pd.notna(v)}
        metrics = {k[len("metric."):]: v for k, v in row.items()
                   if k.startswith("metric.") and pd.notna(v)}
        db.write(results.flatten(cfg), metrics, experiment=row["experiment"],
                 trainable_params=int(row["trainable_params"]),
                 step_seconds=row["step_seconds"], peak_memory_mb=row["peak_memory_mb"])
    db.close()
    assert report.main([f"--db={db_path}", f"--out={tmp_path / 'out'}"]) == 0
    out = tmp_path / "out"
    assert "| W_q | – | – | 85.0 ± 7.1 | 86.0 ± 1.4 |" in (out / "tables.md").read_text()
    assert r"\begin{tabular}" in (out / "tables.tex").read_text()
    assert len(pd.read_csv(out / "runs.csv")) == len(frame)
    assert (out / "accuracy_vs_rank.png").read_bytes()[:4] == b"\x89PNG"


def test_method_none_evaluates_the_stored_base_as_plain_flax_does():
    """quant_perplexity (QLoRA's Table 2): nothing trained, the base as stored; its perplexity
    equals the plain model's on the dequantized weights, computed here without lowrank.apply."""
    from lowrank import data, quant

    module, config = common.load("configs/quant_perplexity.py:tiny")
    overrides = {"quant.fmt": "nf4", "quant.double_quant": True, "quant.block_size": 64}
    assert overrides in module.get_sweep(config)
    config = results.apply_overrides(config, overrides)
    row = run.run(config, db_path=":memory:", experiment="quant_perplexity:tiny")
    assert row["trainable_params"] == 0 and row["step_seconds"] is None
    model, params = tasks.pretrained_lm(tasks.training_config(config))
    stored = quant.quantize_tree(dict(params), quant.QuantSpec(
        "nf4", block_size=64, double_quant=True, targets=common.QUANT_TARGETS["llama"]))
    dense = jax.tree.map(lambda x: quant.dequantize(x, jnp.float32) if quant.is_quantized(x)
                         else x, stored, is_leaf=quant.is_quantized)
    windows = data.lm_windows(data.lm_tokens("python", "validation",
                                             max_bytes=config.data.python_max_bytes),
                              config.data.seq_len)
    n = config.data.eval_windows
    logits = model.apply({"params": dense}, jnp.asarray(windows["inputs"][:n]))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                          jnp.asarray(windows["targets"][:n]))
    assert row["perplexity"] == pytest.approx(float(jnp.exp(nll.mean())), rel=1e-4)
    assert row["weight_rmse"] > 0


def test_lm_study_pretrains_on_the_whole_stdlib_and_keeps_its_validation_curve(
        monkeypatch, tmp_path):
    """lm_domain:study (issue 15's LM study; here its tiny twin): the pretraining corpus is
    every module of the standard library, the held-out loss is logged every ``eval_every``
    steps and kept beside the cached model, the checkpoints are cleaned up, and the cache is
    hit the second time."""
    from lowrank import data

    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path))
    module, config = common.load("configs/lm_domain.py:study_tiny")
    assert config.data.pretrain_domain == "python_tree"
    tree = data.python_documents(config.data.python_max_bytes, tree=True)
    assert any("/" in name for name in tree)  # modules of packages, not only top-level files
    model, params = tasks.pretrained_lm(tasks.training_config(config))
    (cached,) = (tmp_path / "lm_domain").iterdir()
    curve = [json.loads(line) for line in (cached / "pretrain_metrics.jsonl").open()]
    evals = [r for r in curve if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(np.isfinite(r["eval/loss"])
                                                       for r in evals)
    assert not list((tmp_path / "lm_domain").glob("*.pretraining"))
    _, again = tasks.pretrained_lm(tasks.training_config(config))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, again))
    kinds = {(o.get("method"), o.get("quant.fmt")) for o in module.get_sweep(config)}
    assert kinds == {("none", "none"), ("lora", "none"), ("none", "nf4"), ("lora", "nf4"),
                     ("full", None)}
