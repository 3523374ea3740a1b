"""report.py under the results protocol: tuned rows, paired differences, any experiment name,
and the READMEs' generated summary block."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lowrank import results, stats, tuning

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from configs import common  # noqa: E402


def _module(name):
    spec = importlib.util.spec_from_file_location(f"exp_{name}",
                                                  ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _module("report")
import report_summary  # noqa: E402


def _row(db, *, rank, seed, lr, correct, val, experiment="rank_ablation:x", method="lora"):
    config = {"method": method, "adapt": "q", "seed": seed, "steps": 10,
              "lora": {"rank": rank, "alpha": 2.0 * rank, "rslora": False},
              "optimizer": {"learning_rate": lr}, "quant": {"fmt": "none"}}
    correct = np.asarray(correct, int)
    db.write(config, {"accuracy": correct.mean(), "val_accuracy": val, "val_loss": 1 - val,
                      "best_step": 5},
             experiment=experiment, trainable_params=10 * rank, step_seconds=0.1,
             peak_memory_mb=1.0, predictions=json.dumps({"correct": correct.tolist()}))


def test_rank_table_reports_the_tuned_rate_and_paired_differences():
    db = results.ResultsDB(":memory:")
    n = 200
    base = np.ones(n, int)
    base[:20] = 0  # r=4: 90% right
    worse = base.copy()
    worse[20:40] = 0  # r=1: wrong on 20 more articles, every seed
    for seed in (0, 1, 2):
        _row(db, rank=4, seed=seed, lr=1e-3, correct=base, val=0.9)
        _row(db, rank=1, seed=seed, lr=1e-3, correct=worse, val=0.8)
    # the other rate of r=1: better on test but worse on validation, so never reported
    _row(db, rank=1, seed=0, lr=3e-3, correct=base, val=0.7)
    frame = db.frame("ok")
    tables = dict(report.report(frame))
    rank = tables["tab:rank-x"]
    assert rank.header == ["weights adapted", "scale", "learning rate", "r=1", "r=4"]
    expected = stats.paired_bootstrap(worse, base)
    assert expected.difference == pytest.approx(-0.1) and expected.excludes_zero
    assert rank.rows == [["W_q", "α=2r", "0.001",
                          f"80.0 ± 0.0 ({100 * expected.difference:+.1f} "
                          f"[{100 * expected.low:+.1f}, {100 * expected.high:+.1f}]†)",
                          "90.0 ± 0.0"]]
    assert "best validation epoch" in rank.caption and "chosen on validation" in rank.caption
    lines = report_summary.summary_lines(frame)
    assert any("0 of 1 cells are within noise" in line and "beyond noise" in line
               for line in lines)


def test_equal_cells_are_within_noise():
    db = results.ResultsDB(":memory:")
    rng = np.random.default_rng(0)
    for seed in (0, 1, 2):
        same = (rng.random(100) < 0.9).astype(int)
        _row(db, rank=1, seed=seed, lr=1e-3, correct=same, val=0.9)
        _row(db, rank=8, seed=seed, lr=1e-3, correct=same, val=0.9)
    lines = report_summary.summary_lines(db.frame("ok"))
    assert any("1 of 1 cells are within noise" in line for line in lines)
    assert "(+0.0 [+0.0, +0.0])" in report.rank_table(db.frame("ok"), "rank_ablation:x").rows[0][3]


def test_report_prints_any_experiment_name_and_lists_unknown_ones(tmp_path, capsys):
    """A :tiny sweep's database (a real one, in-process: the protocol's both phases on a cut
    grid) gets its tables; an experiment without a table family is listed, never "no
    finished runs"."""
    run = _module("run")
    tune = _module("tune")
    module, config = common.load("configs/rank_ablation.py:tiny")
    config = results.apply_overrides(config, {
        "sweep.ranks": (1,), "sweep.adapts": ("q",), "sweep.scales": ("constant",),
        "sweep.baselines": ("head",), "sweep.learning_rates.lora": (1e-3, 3e-3),
        "sweep.learning_rates.head": (1e-2, 3e-2)})
    db_path = tmp_path / "tiny.sqlite"
    grid = module.get_sweep(config)
    assert len(grid) == 4
    for overrides in grid:
        run.run(results.apply_overrides(config, {**overrides, "seed": 0}), db_path=db_path,
                experiment="rank_ablation:tiny")
    db = results.ResultsDB(db_path)
    frame = db.frame("ok")
    db.close()
    chosen = report.tuning.tuned(frame)
    assert len(chosen) == 2 and set(chosen["grid_size"]) == {2}
    for _, row in chosen.iterrows():  # the second phase: seed 1 at each chosen rate
        overrides = next(o for o in grid if o.get("optimizer.learning_rate") ==
                         row["config.optimizer.learning_rate"] and o["method"] ==
                         row["config.method"])
        run.run(results.apply_overrides(config, {**overrides, "seed": 1}), db_path=db_path,
                experiment="rank_ablation:tiny")
    results.ResultsDB(db_path).write({"seed": 0}, {"accuracy": 0.5}, experiment="mine")
    capsys.readouterr()
    assert report.main([f"--db={db_path}", f"--out={tmp_path / 'out'}"]) == 0
    printed = capsys.readouterr().out
    assert "(rank_ablation:tiny)" in printed and "| W_q | α=2 |" in printed
    assert "| classifier head only | 165 |" in printed
    assert "no table family for experiments 'mine' (1 runs)" in printed
    assert "no finished runs" not in printed
    assert (tmp_path / "out" / "accuracy_vs_rank_tiny.png").read_bytes()[:4] == b"\x89PNG"
    # tune.py's second phase asks for every seed of the chosen settings, the sweep skipping
    # those done (sweep.* fields are not hashed, so the whole grid's overrides find the cut
    # grid's rows; the tiny grid tunes at rank 4, absent here, so rank 1's rows chose for
    # the family's ranks 1 and 4), the head beside them
    tune_runs = tune.chosen_runs("configs/rank_ablation.py:tiny", [], db_path=str(db_path),
                                 experiment="rank_ablation:tiny", seeds=3)
    assert len(tune_runs) == 3 * 3 and {r["seed"] for r in tune_runs} == {0, 1, 2}
    assert {r.get("lora.rank") for r in tune_runs} == {1, 4, None}
    assert {r.get("optimizer.learning_rate") for r in tune_runs} == set(
        chosen["config.optimizer.learning_rate"])
    # the database and its own CSV export together: each run counts once, in tables and CSV
    capsys.readouterr()
    assert report.main([f"--db={db_path}", f"--db={tmp_path / 'out' / 'runs.csv'}",
                        f"--out={tmp_path / 'twice'}"]) == 0
    twice = capsys.readouterr()
    assert twice.out == printed and "repeat a run of an earlier --db" in twice.err
    assert len(pd.read_csv(tmp_path / "twice" / "runs.csv")) == len(
        pd.read_csv(tmp_path / "out" / "runs.csv"))


@pytest.mark.parametrize("readme", ["README.md", "experiments/results/README.md"])
def test_committed_readme_summary_is_generated_from_the_committed_rows(readme):
    frame = report.load_runs(ROOT / "experiments" / "results" / "runs.csv")
    generated = report_summary.block(report_summary.summary_lines(frame))
    assert report_summary.readme_block(ROOT / readme) == generated, (
        f"{readme}'s summary block differs from what the committed runs.csv gives: run "
        "python experiments/report.py --db=experiments/results/runs.csv "
        "--readme=README.md --readme=experiments/results/README.md")


def test_summary_block_needs_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match=r"README.md has no report.py summary block"):
        report_summary.update_readme(readme, ["x"])
    assert readme.read_text() == "no markers here\n"  # nothing lost
    readme.write_text(f"a\n{report_summary.START}\nold\n{report_summary.END}\nb\n")
    report_summary.update_readme(readme, ["new"])
    assert readme.read_text() == f"a\n{report_summary.START}\nnew\n{report_summary.END}\nb\n"


def test_frames_without_runs_say_so():
    assert report.report(pd.DataFrame()) == [] and report.untabled(pd.DataFrame()) == {}


def test_perplexity_table_pairs_the_windows_with_the_float_base():
    db = results.ResultsDB(":memory:")
    rng = np.random.default_rng(0)
    base = rng.uniform(1.0, 3.0, 64)
    worse = base + 0.05 + rng.normal(0, 0.01, 64)  # every window a little worse
    model = {"num_layers": 2, "hidden_size": 32}
    data = {"eval_windows": 64, "seq_len": 16, "eval_domain": "python"}
    for fmt, losses in (("none", base), ("nf4", worse)):
        tokens = np.full(64, 16.0)
        db.write({"method": "none", "seed": 0, "model": model, "data": data,
                  "quant": {"fmt": fmt, "block_size": 64, "double_quant": False}},
                 {"perplexity": float(np.exp(losses.mean())), "quant_bits_per_param": 4.5},
                 experiment="quant_perplexity:x",
                 predictions=json.dumps({"nll": (losses * tokens).tolist(),
                                         "tokens": tokens.tolist()}))
    table = report.perplexity_table(db.frame("ok"), "quant_perplexity:x")
    expected = stats.paired_bootstrap(worse, base)
    assert expected.excludes_zero
    assert table.rows[1] == [
        "nf4", f"{np.exp(worse.mean()):.3f} ({expected.difference:+.4f} "
               f"[{expected.low:+.4f}, {expected.high:+.4f}]†)", "4.500"]
    lines = report_summary.summary_lines(db.frame("ok"))
    assert "(beyond noise)" in lines[0]


def test_rows_written_before_and_after_a_defaulted_field_was_added_share_a_cell():
    """A field added later with its default kept out of the hash (``model.dropout`` False):
    old rows lack it, new rows store it; both are one setting, so seed 0's choice holds for
    the new seeds."""
    frame = pd.DataFrame({
        "experiment": ["e"] * 4, "seed": [0, 0, 1, 1], "config_hash": list("abcd"),
        "config.optimizer.learning_rate": [1e-3, 3e-3, 1e-3, 3e-3],
        "config.model.dropout": [np.nan, np.nan, 0.0, 0.0],
        "config.model.name": ["minilm"] * 4,
        "metric.val_accuracy": [0.8, 0.9, 0.95, 0.7]})
    assert tuning.tuned(frame)["config_hash"].tolist() == ["b", "d"]
    frame.loc[2:, "config.model.dropout"] = 1.0  # really another setting: its own choice
    assert tuning.tuned(frame)["config_hash"].tolist() == ["b", "c"]


def test_lm_table_pairs_each_type_with_the_float_base_under_its_own_method():
    """QLoRA's Tables 2 and 3 on the LM task: an untrained nf4 base is compared with the
    untrained float32 one, LoRA over nf4 with LoRA over float32, full fine-tuning with LoRA
    over float32; each against the paired bootstrap computed here over the windows."""
    db = results.ResultsDB(":memory:")
    rng = np.random.default_rng(1)
    tokens = np.full(48, 16.0)
    base = rng.uniform(2.0, 3.0, 48)
    losses = {("none", "none"): base, ("none", "nf4"): base + 0.02 + rng.normal(0, 0.01, 48),
              ("lora", "none"): base - 0.5, ("lora", "nf4"): base - 0.5 + rng.normal(0, 0.01, 48),
              ("full", "none"): base - 0.6}
    model = {"num_layers": 2, "hidden_size": 32}
    for (method, fmt), loss in losses.items():
        db.write({"method": method, "seed": 0, "steps": 8, "model": model,
                  "lora": {"rank": 8}, "quant": {"fmt": fmt}},
                 {"perplexity": float(np.exp(loss.mean())), "train_loss": 1.0,
                  "best_step": 8, "weight_rmse": 0.0, "quant_bits_per_param": 4.5},
                 experiment="lm_domain:x",
                 predictions=json.dumps({"nll": (loss * tokens).tolist(),
                                         "tokens": tokens.tolist()}))
    frame = db.frame("ok")
    rows = {(r[0], r[1]): r for r in report.lm_table(frame, "lm_domain:x").rows}

    def cell(a, b):
        d = stats.paired_bootstrap(losses[a], losses[b])
        mark = "†" if d.excludes_zero else ""
        return f"{d.difference:+.4f} [{d.low:+.4f}, {d.high:+.4f}]{mark}"

    assert rows[("pretrained base, not adapted", "nf4")][-1] == cell(("none", "nf4"),
                                                                      ("none", "none"))
    assert rows[("LoRA", "nf4")][-1] == cell(("lora", "nf4"), ("lora", "none"))
    assert rows[("full fine-tuning", "float32")][-1] == cell(("full", "none"), ("lora", "none"))
    assert rows[("LoRA", "float32")][-1] == ""
    lines = report_summary.summary_lines(frame)
    assert lines[1].startswith("- Before adaptation") and "(beyond noise)" in lines[1]
    assert lines[3].startswith("- Full fine-tuning") and "(beyond noise)" in lines[3]


def test_a_grid_widened_between_passes_keeps_one_cell_per_setting():
    """A second pass that adds a rate to the grid writes rows whose ``sweep.*`` fields (unhashed:
    they change nothing a run computes) differ from the first pass's; the setting is still one
    cell, so the rate is chosen among all the rates tried, not per pass."""
    frame = pd.DataFrame({
        "experiment": ["e"] * 3, "seed": [0, 0, 0], "config_hash": list("abc"),
        "config.optimizer.learning_rate": [1e-3, 3e-3, 1e-2],
        "config.sweep.learning_rates.full": ["[0.001, 0.003]", "[0.001, 0.003]",
                                             "[0.001, 0.003, 0.01]"],
        "config.workdir": ["/a", "/a", "/b"],
        "config.eval.select": ["perplexity"] * 3,
        "metric.val_perplexity": [7.0, 5.7, 5.9]})
    out = tuning.tuned(frame)
    assert out["config_hash"].tolist() == ["b"]
    assert out["grid_size"].tolist() == [3]


def test_a_rank_family_tunes_at_its_tune_rank_and_runs_every_rank_at_that_rate(tmp_path):
    """``sweep.tune_rank``: phase 1 runs the grid at that rank only; the rate each (targets,
    scale) family chose there is the one every rank runs at, every seed, and the one the
    table reports."""
    tune = _module("tune")
    spec = "configs/rank_ablation.py:tiny"  # ranks 1 and 4, tuned at 4
    _, config = common.load(spec)
    first = tune.first_runs(spec, [])
    assert {o.get("lora.rank", 4) for o in first} == {4} and {o["seed"] for o in first} == {0}
    grids = config.sweep.learning_rates
    best = {"lora": grids.lora[0], "full": grids.full[1], "head": grids.head[1]}
    db_path = tmp_path / "db.sqlite"
    db = results.ResultsDB(db_path)
    for overrides in first:  # the family's best rate on validation is `best`, rank 4 only
        val = 0.9 if overrides["optimizer.learning_rate"] == best[overrides["method"]] else 0.6
        db.write(results.apply_overrides(config, overrides),
                 {"val_accuracy": val, "val_loss": 1 - val, "accuracy": val},
                 experiment="rank_ablation:tiny")
    second = tune.chosen_runs(spec, [], db_path=str(db_path), experiment="rank_ablation:tiny",
                              seeds=2)
    lora = [o for o in second if o["method"] == "lora"]
    assert {o["optimizer.learning_rate"] for o in lora} == {best["lora"]}
    assert len(lora) == 2 * 2 * 2 * 2  # targets x scales x ranks (1 and 4) x seeds
    assert {(o["lora.rank"], o["seed"]) for o in lora} == {(1, 0), (1, 1), (4, 0), (4, 1)}
    assert sorted((o["method"], o["optimizer.learning_rate"], o["seed"])
                  for o in second if o["method"] != "lora") == [
        ("full", best["full"], 0), ("full", best["full"], 1),
        ("head", best["head"], 0), ("head", best["head"], 1)]
    for overrides in lora:  # rank 1 gets a higher validation score at the shared rate
        if overrides["lora.rank"] == 1 or overrides["seed"] == 1:
            db.write(results.apply_overrides(config, overrides),
                     {"val_accuracy": 0.95, "val_loss": 0.05, "accuracy": 0.95},
                     experiment="rank_ablation:tiny")
    frame = db.frame("ok")
    db.close()
    kept = tuning.tuned(frame)
    assert set(kept["config.optimizer.learning_rate"][kept["config.method"] == "lora"]) == {
        best["lora"]}
    assert len(kept[kept["config.method"] == "lora"]) == 16
    table = report.rank_table(kept, "rank_ablation:tiny")
    assert [row[2] for row in table.rows] == [f"{best['lora']:g}"] * 4  # 2 rates: no edge
    assert "chosen on validation at r=4" in table.caption
    rates = next(line for line in report_summary.summary_lines(frame) if "Learning" in line)
    assert rates.startswith("- Learning rates chosen on validation at r=4, each row's ranks "
                            f"training at its rate: W_q (α=2r) {best['lora']:g};")
    against = next(line for line in report_summary.summary_lines(frame) if "Against r=4" in line)
    assert "W_q (α=2r): r=1 " in against  # rank 1 paired with the tune rank, row by row


def test_rank_summary_compares_conventions_and_weight_types_paired():
    """The rank summary under the protocol: rsLoRA against the constant scale at each rank and
    every linear layer at the smallest rank against the fewest weight types at the largest,
    each a paired difference, and the rates the rows chose at their tune rank."""
    db = results.ResultsDB(":memory:")
    n = 100
    right = np.ones(n, int)
    worse = right.copy()
    worse[:30] = 0
    for adapt in ("qv", "all"):
        for rslora in (False, True):
            for rank in (1, 64):
                correct = right if adapt == "all" or rslora else worse
                for seed in (0, 1, 2):
                    config = {"method": "lora", "adapt": adapt, "seed": seed, "steps": 10,
                              "sweep": {"tune_rank": 8}, "quant": {"fmt": "none"},
                              "lora": {"rank": rank, "alpha": 8.0 if rslora else 2.0 * rank,
                                       "rslora": rslora},
                              "optimizer": {"learning_rate": 3e-3}}
                    db.write(config, {"accuracy": correct.mean(), "val_accuracy": 0.9,
                                      "val_loss": 0.1, "best_step": 5},
                             experiment="rank_ablation:p", predictions=json.dumps(
                                 {"correct": correct.tolist()}))
    lines = report_summary.summary_lines(db.frame("ok"))
    d = stats.paired_bootstrap(right, worse)
    gain = f"+30.0 points [{100 * d.low:+.1f}, {100 * d.high:+.1f}]: beyond noise"
    assert (f"- More weight types vs a higher rank (α=2r): all linear layers at r=1 (100.0%) "
            f"vs W_q, W_v at r=64 (70.0%): {gain}.") in lines
    convention = next(line for line in lines if "rsLoRA (α=8) minus α=2r" in line)
    assert f"W_q, W_v: r=1 {gain}; r=64 {gain}." in convention
    assert "all linear: r=1 +0.0 points: the same seed-averaged correctness" in convention
    assert not any("Learning rates chosen" in line for line in lines)  # one rate: not tuned


def test_adapter_analysis_reads_each_rank_at_its_chosen_rate_and_constant_scale(tmp_path):
    """The subspace figure and the adapter table of a protocol rank experiment read, per rank,
    the exported adapters of the run at the chosen rate and the constant scale (rsLoRA's and
    the other rates' runs are left out)."""
    import report_figures
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    weight = "bert/encoder/layer_3/attention/self/{}/kernel"
    db = results.ResultsDB(":memory:")
    written = {}
    for rank in (8, 64):
        for rslora, lr, val in ((False, 1e-3, 0.9), (False, 3e-3, 0.8), (True, 1e-3, 0.9)):
            config = {"method": "lora", "adapt": "qv", "seed": 0, "steps": 10,
                      "sweep": {"tune_rank": 8}, "quant": {"fmt": "none"},
                      "lora": {"rank": rank, "alpha": 8.0 if rslora else 2.0 * rank,
                               "rslora": rslora}, "optimizer": {"learning_rate": lr}}
            db.write(config, {"accuracy": 0.9, "val_accuracy": val, "val_loss": 1 - val},
                     experiment="rank_ablation:p")
            arrays = {f"{weight.format(m)}/{ab}": rng.normal(size=shape).astype(np.float32)
                      for m in ("query", "value")
                      for ab, shape in (("a", (96, rank)), ("b", (rank, 96)))}
            folder = tmp_path / "rank_ablation:p" / results.config_hash(config) / "adapters"
            folder.mkdir(parents=True)
            save_file(arrays, str(folder / "adapters.safetensors"))
            written[(rank, rslora, lr)] = arrays
    runs = tuning.tuned(db.frame("ok"))
    pairs = report_figures.subspace_pairs(runs, tmp_path, experiment="rank_ablation:p")
    for name, module in (("W_q", "query"), ("W_v", "value")):
        for got, rank in zip(pairs[name], (8, 64), strict=True):
            np.testing.assert_array_equal(got, written[(rank, False, 1e-3)][
                f"{weight.format(module)}/a"])
    base = {weight.format(m): rng.normal(size=(96, 96)).astype(np.float32)
            for m in ("query", "value")}
    table = report_figures.adapter_table(runs, tmp_path, base, experiment="rank_ablation:p")
    assert [row[:2] for row in table.rows] == [["8", "W_q"], ["8", "W_v"], ["64", "W_q"],
                                               ["64", "W_v"]]
    assert [row[-1] for row in table.rows[2:]] == ["1.00", "1.00"]  # A_64 against itself


def test_lm_summary_names_each_methods_chosen_rate_and_the_runs_still_improving():
    """The LM data-type summary says the rate each method chose on validation (LoRA per base
    type, full fine-tuning) and how many trained runs peaked at their last evaluation."""
    db = results.ResultsDB(":memory:")
    tokens, base = np.full(8, 16.0), np.linspace(2.0, 3.0, 8)
    model = {"num_layers": 2, "hidden_size": 32}
    runs = [("none", "none", None, 9.0, 8), ("lora", "none", 1e-3, 8.0, 8),
            ("lora", "none", 1e-2, 7.0, 4), ("lora", "nf4", 1e-3, 7.5, 8),
            ("lora", "nf4", 1e-2, 7.9, 8), ("full", "none", 1e-4, 6.0, 8),
            ("full", "none", 3e-4, 5.0, 8), ("full", "none", 1e-3, 5.5, 6)]
    for method, fmt, rate, val, best_step in runs:
        config = {"method": method, "seed": 0, "steps": 8, "model": model, "lora": {"rank": 8},
                  "quant": {"fmt": fmt}, "eval": {"select": "perplexity"}}
        if rate is not None:
            config["optimizer"] = {"learning_rate": rate}
        loss = base - (0.1 if method != "none" else 0.0)
        db.write(config, {"perplexity": float(np.exp(loss.mean())), "val_perplexity": val,
                          "best_step": best_step, "weight_rmse": 0.0},
                 experiment="lm_domain:x",
                 predictions=json.dumps({"nll": (loss * tokens).tolist(),
                                         "tokens": tokens.tolist()}))
    rates = next(line for line in report_summary.summary_lines(db.frame("ok"))
                 if "Learning rates" in line)
    assert rates == ("- Learning rates chosen on validation: LoRA over float32 0.01; LoRA over "
                     "nf4 0.001; full fine-tuning 0.0003; none at its grid's edge. The best "
                     "validation point was the last evaluation in 2 of 3 trained runs (still "
                     "improving when the budget ended).")
