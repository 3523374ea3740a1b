"""The report's tables, built from the results rows (``experiments/report.py`` prints them).

Every table takes the rows of one experiment, after :func:`lowrank.tuning.tuned` has kept
each setting's rows at the learning rate the protocol chose on validation; its cells and their
rendering are in ``report_cells.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
from report_cells import (
    ADAPT_NAMES,
    BASELINE_NAMES,
    DATA_TYPES,
    LM_METHODS,
    QUANTIZED_BITS,
    WHOLE_MODEL_BITS,
    Table,
    data_type,
    difference_text,
    experiment_runs,
    interval_text,
    loss_difference_text,
    mean_std,
    paired,
    paired_loss,
    protocol_note,
    rate_cell,
    scale_name,
    seeds_of,
)

# ---- the tables ---------------------------------------------------------------------------

def rank_rows(runs: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """The LoRA rows of a rank experiment by (target set, scale convention), in table order."""
    lora = runs[runs["config.method"] == "lora"]
    if lora.empty:
        return {}
    rslora = (lora["config.lora.rslora"].fillna(False).astype(bool) if "config.lora.rslora"
              in lora else pd.Series(False, index=lora.index))
    groups = {}
    for adapt in [a for a in ADAPT_NAMES if a in set(lora["config.adapt"])]:
        for flag in (False, True):
            group = lora[(lora["config.adapt"] == adapt) & (rslora == flag)]
            if not group.empty:
                groups[(adapt, scale_name(group))] = group
    return groups


def _rate_note(runs: pd.DataFrame) -> str:
    tune_rank = runs.get("config.sweep.tune_rank", pd.Series([], dtype=float)).dropna()
    if tune_rank.empty:
        return ""
    return (f"; each row's learning rate was chosen on validation at r={int(tune_rank.iloc[0])}"
            " and every rank of the row trains at it, so rank varies at a fixed rate")


def rank_table(frame: pd.DataFrame, experiment: str = "rank_ablation",
               metric: str = "metric.accuracy") -> Table:
    """Targets (and scale convention) x rank: mean ± std of test accuracy (%) over seeds; with
    stored predictions, each rank below the largest also gives its paired difference from the
    largest rank of its row (95% CI). Baselines are in :func:`baseline_table`.

    >>> rank_table(pd.DataFrame()).rows
    []
    """
    runs = experiment_runs(frame, experiment)
    groups = rank_rows(runs) if not runs.empty else {}
    if not groups:
        return Table(["weights adapted", "scale"], [], "")
    ranks = sorted({int(r) for g in groups.values() for r in g["config.lora.rank"]})
    header = ["weights adapted", "scale", "learning rate", *[f"r={r}" for r in ranks]]
    rows = []
    for (adapt, scale), group in groups.items():
        top = group[group["config.lora.rank"] == max(group["config.lora.rank"])]
        cells = [ADAPT_NAMES[adapt], scale, rate_cell(group)]
        for r in ranks:
            sel = group[group["config.lora.rank"] == r]
            text = mean_std(sel[metric].tolist())
            if not sel.empty and r < int(top["config.lora.rank"].iloc[0]):
                diff = difference_text(paired(sel, top))
                text += f" ({diff})" if diff else ""
            cells.append(text)
        rows.append(cells)
    caption = (f"Test accuracy (%) on BBC News ({experiment}), mean ± std over seeds "
               f"{seeds_of(runs)}{protocol_note(runs)}, by the weights LoRA adapts, its scale "
               f"convention and rank r{_rate_note(runs)}. In parentheses: the paired "
               "difference from the largest "
               "rank of the row with its 95% bootstrap interval over the test articles "
               "(† where it excludes 0; otherwise within noise).")
    if not ("predictions" in runs and runs["predictions"].notna().any()):
        caption = caption.split(" In parentheses")[0] + (
            " No per-example predictions were stored, so differences are untested.")
    return Table(header, rows, caption)


def baseline_table(frame: pd.DataFrame, experiment: str = "rank_ablation",
                   metric: str = "metric.accuracy") -> Table:
    """The baselines without adapters (full fine-tuning, the head alone), one row each:
    trainable parameters, the learning rate used, test accuracy and its 95% interval.

    >>> baseline_table(pd.DataFrame()).rows
    []
    """
    runs = experiment_runs(frame, experiment)
    header = ["method", "trainable params", "learning rate", "accuracy (%)", "95% CI"]
    if runs.empty:
        return Table(header, [], "")
    rows = []
    for method, name in BASELINE_NAMES.items():
        sel = runs[runs["config.method"] == method]
        if sel.empty:
            continue
        rates = sorted(set(sel.get("config.optimizer.learning_rate", pd.Series([])).dropna()))
        rows.append([name, f"{int(sel['trainable_params'].iloc[0]):,}",
                     ", ".join(f"{r:g}" for r in rates) or "–", mean_std(sel[metric].tolist()),
                     interval_text(sel)])
    caption = (f"Baselines of {experiment} (no adapters): test accuracy (%), mean ± std over "
               f"seeds {seeds_of(runs)}{protocol_note(runs)}; the interval is a bootstrap over "
               "the test articles of the seed-averaged accuracy.")
    return Table(header, rows, caption)


def quant_table(frame: pd.DataFrame, experiment: str = "quant_ablation") -> Table:
    """Data type x (bits per parameter of the whole model and of the quantized weights,
    weight RMSE, the learning rate used, accuracy mean ± std, paired difference from the
    float32 base).

    >>> quant_table(pd.DataFrame()).rows
    []
    """
    runs = experiment_runs(frame, experiment)
    header = ["base data type", WHOLE_MODEL_BITS, QUANTIZED_BITS, "weight RMSE",
              "learning rate", "accuracy (%)", "vs float32"]
    if runs.empty:
        return Table(header, [], "")
    names = runs.apply(data_type, axis=1)
    reference = runs[names == "float32"]
    rows = []
    for name in [d for d in DATA_TYPES if d in set(names)]:
        sel = runs[names == name]
        whole = sel["bits_per_param"].astype(float).mean() if "bits_per_param" in sel else 32.0
        bits = sel["metric.quant_bits_per_param"].astype(float).mean()
        rmse = sel["metric.weight_rmse"].astype(float).mean()
        diff = "" if name == "float32" else difference_text(paired(sel, reference))
        rows.append([name, "–" if math.isnan(whole) else f"{whole:.2f}",
                     "32" if name == "float32" or math.isnan(bits) else f"{bits:.3f}",
                     f"{rmse:.2e}" if rmse else "0", rate_cell(sel),
                     mean_std(sel["metric.accuracy"].tolist()), diff])
    caption = (f"LoRA over a frozen MiniLM whose transformer kernels are stored in each data "
               f"type ({experiment}): bits per parameter of the whole frozen model and of the "
               "quantized kernels alone, RMSE of the dequantized kernels, BBC News test accuracy "
               f"(mean ± std over seeds {seeds_of(runs)}{protocol_note(runs)}) and its paired "
               "difference from the float32 base (95% CI, † beyond noise).")
    return Table(header, rows, caption)


def lm_methods(runs: pd.DataFrame) -> pd.Series:
    """Each row's ``config.method`` (LoRA where the column is absent or empty).

    >>> lm_methods(pd.DataFrame({"config.method": ["full", None]})).tolist()
    ['full', 'lora']
    """
    if "config.method" in runs:
        return runs["config.method"].fillna("lora")
    return pd.Series("lora", index=runs.index)


def lm_table(frame: pd.DataFrame, experiment: str = "lm_domain") -> Table:
    """Method x base data type (bits per parameter, weight RMSE, held-out perplexity and final
    training loss, mean ± std over seeds) of the language-model domain adaptation; where the
    rows store each test window's loss, the paired difference from the float32 base under the
    same method (full fine-tuning: from LoRA over float32), in nats per token.

    >>> lm_table(pd.DataFrame()).rows
    []
    """
    runs = experiment_runs(frame, experiment)
    header = ["method", "base data type", "learning rate", QUANTIZED_BITS, "weight RMSE",
              "English perplexity", "final train loss", "vs float32 (nats/token)"]
    if runs.empty:
        return Table(header, [], "")
    methods, names = lm_methods(runs), runs.apply(data_type, axis=1)
    rows = []
    for method, label in LM_METHODS.items():
        reference = runs[(names == "float32") & (methods == ("lora" if method == "full"
                                                              else method))]
        for name in [d for d in DATA_TYPES if d in set(names[methods == method])]:
            sel = runs[(names == name) & (methods == method)]
            bits = sel["metric.quant_bits_per_param"].astype(float).mean()
            rmse = sel["metric.weight_rmse"].astype(float).mean()
            compared = method == "full" or name != "float32"
            rows.append([label, name, "–" if method == "none" else rate_cell(sel),
                         "32" if name == "float32" or math.isnan(bits) else f"{bits:.3f}",
                         f"{rmse:.2e}" if rmse else "0",
                         mean_std(sel["metric.perplexity"].tolist(), scale=1.0, digits=2),
                         mean_std(sel["metric.train_loss"].tolist(), scale=1.0, digits=3),
                         loss_difference_text(paired_loss(sel, reference)) if compared else ""])
    if not any(row[-1] for row in rows):
        header, rows = header[:-1], [row[:-1] for row in rows]
    first = runs.iloc[0]
    selected = "metric.best_step" in runs and runs["metric.best_step"].notna().any()
    tuned = "grid_size" in runs and (runs["grid_size"] > 1).any()
    protocol = "; test perplexity at the best validation point" if selected else ""
    protocol += ("; learning rates chosen on validation (↑ / ↓: the grid's top / bottom)"
                 if tuned else "")
    compared = ("; paired difference of the test loss from the float32 base under the same "
                "method (full fine-tuning: from LoRA over float32), 95% CI over windows, † "
                "beyond noise" if len(header) == 8 else "")
    caption = (f"A {int(first['config.model.num_layers'])}-layer Llama-style byte-level model "
               f"(hidden {int(first['config.model.hidden_size'])}) pretrained on Python, "
               f"adapted to English prose ({int(first['config.steps'])} steps) by full "
               f"fine-tuning or LoRA (r={int(first['config.lora.rank'])}, every linear layer) "
               "over its base stored in each data type (QLoRA's Table 3), against the base "
               "not adapted (Table 2 on the target domain): perplexity on held-out English, "
               f"mean ± std over seeds {seeds_of(runs)}{protocol}{compared}.")
    return Table(header, rows, caption)


def perplexity_table(frame: pd.DataFrame, experiment: str = "quant_perplexity") -> Table:
    """QLoRA's Table 2: data type x block size of the held-out perplexity of the base as
    stored (nothing trained), with the bits per quantized weight at each block size.

    >>> perplexity_table(pd.DataFrame()).rows
    []
    """
    runs = experiment_runs(frame, experiment)
    if runs.empty:
        return Table(["base data type"], [], "")
    names = runs.apply(data_type, axis=1)
    quantized = runs[names != "float32"]
    blocks = sorted(int(b) for b in quantized["config.quant.block_size"].unique()) \
        if not quantized.empty else []
    header = ["base data type", *[f"perplexity, blocks of {b}" for b in blocks],
              f"{QUANTIZED_BITS} ({', '.join(map(str, blocks))})"]
    reference = runs[names == "float32"]
    tested = False
    rows = []
    for name in [d for d in DATA_TYPES if d in set(names)]:
        sel = runs[names == name]
        if name == "float32":
            ppl = mean_std(sel["metric.perplexity"].tolist(), scale=1.0, digits=3)
            rows.append([name, *[ppl] * max(len(blocks), 1), "32"])
            continue
        cells, bits = [], []
        for b in blocks:
            at = sel[sel["config.quant.block_size"] == b]
            diff = loss_difference_text(paired_loss(at, reference))
            tested = tested or bool(diff)
            cells.append(mean_std(at["metric.perplexity"].tolist(), scale=1.0, digits=3)
                         + (f" ({diff})" if diff else ""))
            bits.append("–" if at.empty else f"{at['metric.quant_bits_per_param'].mean():.3f}")
        rows.append([name, *cells, ", ".join(bits)])
    first = runs.iloc[0]
    domain = first.get("config.data.eval_domain", "english")
    caption = (f"The pretrained {int(first['config.model.num_layers'])}-layer Llama-style model "
               f"(hidden {int(first['config.model.hidden_size'])}) with its transformer kernels "
               f"stored in each data type and block size, nothing trained ({experiment}): "
               f"perplexity on {int(first['config.data.eval_windows'])} held-out {domain} "
               f"windows of {int(first['config.data.seq_len'])} bytes (QLoRA's Table 2). "
               "Deterministic: no seeds.")
    if tested:
        caption += (" In parentheses: the loss (nats per token) minus the float32 base's, with "
                    "its 95% paired-bootstrap interval over the windows († where it excludes "
                    "0; otherwise within noise).")
    return Table(header, rows, caption)


def method_name(row: pd.Series) -> str:
    """A run's method in words: "full fine-tuning", "LoRA r=8 (W_q, W_v)", "LoRA r=8 (all
    linear) over nf4+dq"."""
    method = row["config.method"]
    if method in BASELINE_NAMES:
        return BASELINE_NAMES[method]
    name = f"LoRA r={int(row['config.lora.rank'])} ({ADAPT_NAMES.get(row['config.adapt'], '?')})"
    dtype = data_type(row)
    return name if dtype == "float32" else f"{name} over {dtype}"


def method_table(frame: pd.DataFrame, ranks: Sequence[int] = (8,),
                 experiments: Sequence[str] = ("rank_ablation", "quant_ablation")) -> Table:
    """Method x (trainable parameters, seconds per step, peak memory) on MiniLM: every
    baseline, LoRA at ``ranks`` on each target set, and each quantized base (means over seeds)
    of ``experiments`` (other models' runs would mix into the same method names).

    >>> method_table(pd.DataFrame()).rows
    []
    """
    header = ["method", "trainable params", "s / step", "peak memory (MB)"]
    if frame.empty or "experiment" not in frame:
        return Table(header, [], "")
    frame = frame[frame["experiment"].isin(list(experiments))]
    if frame.empty:
        return Table(header, [], "")
    keep = (frame["config.method"] != "lora") | frame["config.lora.rank"].isin(list(ranks))
    runs = frame[keep]
    if runs.empty:
        return Table(header, [], "")
    names = runs.apply(method_name, axis=1)
    order = {name: _method_order(row) for name, (_, row) in zip(names, runs.iterrows(),
                                                                strict=True)}
    rows = []
    for name in sorted(order, key=order.get):
        sel = runs[names == name]
        rows.append([name, f"{int(sel['trainable_params'].iloc[0]):,}",
                     f"{sel['step_seconds'].mean():.2f}", f"{sel['peak_memory_mb'].mean():.0f}"])
    caption = ("Cost of each method on this CPU: trainable parameters, seconds per optimizer "
               "step (compilation excluded, mean over runs; a shared machine, so only rough) "
               "and peak resident memory of the run's process.")
    return Table(header, rows, caption)


def _method_order(row: pd.Series) -> tuple:
    """Head only, LoRA (by target set, then rank), full fine-tuning, then quantized bases."""
    method, dtype = row["config.method"], data_type(row)
    if method != "lora":
        return (0 if method == "head" else 2, 0, 0, 0)
    adapt = list(ADAPT_NAMES).index(row["config.adapt"]) if row["config.adapt"] in ADAPT_NAMES \
        else len(ADAPT_NAMES)
    group = 1 if dtype == "float32" else 3
    dtype_index = DATA_TYPES.index(dtype) if dtype in DATA_TYPES else len(DATA_TYPES)
    return (group, dtype_index, adapt, int(row["config.lora.rank"]))
