"""The method-comparison table (``configs/method_ablation.py``): LoRA against its variants and
the baselines, each at the learning rate chosen on validation, with paired differences from
LoRA over the test examples (classification) or the test windows (the LM task).

>>> variant_name(pd.Series({"config.method": "lora", "config.lora.method": "dora",
...                         "config.lora.rank": 8}))
'DoRA r=8'
"""

from __future__ import annotations

import math

import pandas as pd
from report_cells import (
    BASELINE_NAMES,
    EDGE_MARKS,
    LM_METHODS,
    Table,
    difference_text,
    experiment_runs,
    interval,
    interval_text,
    loss_difference_text,
    mean_std,
    paired,
    paired_loss,
    rate_cell,
    seeds_of,
)

ORDER = ("LoRA", "rsLoRA", "DoRA", "VeRA", "AdaLoRA", "PiSSA", "LoftQ")


def _get(row: pd.Series, key: str, default=None):
    value = row.get(key, default)
    return default if value is None or (isinstance(value, float) and math.isnan(value)) \
        else value


def variant_name(row: pd.Series) -> str:
    """A run's method in words: "LoRA r=8", "rsLoRA r=8", "DoRA r=8", "VeRA r=256",
    "AdaLoRA r=12→8", "PiSSA r=8", "LoftQ r=8 (nf4 base)", or a baseline's name."""
    method = _get(row, "config.method", "lora")
    if method != "lora":
        return {**LM_METHODS, **BASELINE_NAMES}.get(method, method)
    rank = int(_get(row, "config.lora.rank", 0))
    kind, init = _get(row, "config.lora.method", "lora"), _get(row, "config.lora.init", "")
    if kind == "adalora":
        return f"AdaLoRA r={rank}→{int(_get(row, 'config.lora.adalora.target_rank', rank))}"
    if kind in ("dora", "vera"):
        return f"{kind[:2].capitalize()}{kind[2:].upper()} r={rank}"
    if init == "pissa":
        return f"PiSSA r={rank}"
    if init == "loftq":
        return f"LoftQ r={rank} ({_get(row, 'config.quant.fmt', 'nf4')} base)"
    return f"{'rsLoRA' if bool(_get(row, 'config.lora.rslora', False)) else 'LoRA'} r={rank}"


def _order(name: str) -> tuple:
    family = name.split(" ")[0]
    if family in ORDER:
        return (1, ORDER.index(family))
    return (0 if "head" in name or "not adapted" in name else 2, 0)


def variant_table(frame: pd.DataFrame, experiment: str = "method_ablation") -> Table:
    """Method x (trainable parameters, chosen learning rate, test score mean ± std over seeds,
    its paired difference from LoRA, seconds per step) of a method comparison: accuracy on
    BBC News, or perplexity on the LM task (its variant ``:lm``).

    >>> variant_table(pd.DataFrame()).rows
    []
    """
    runs = experiment_runs(frame, experiment)
    lm = not runs.empty and runs["metric.accuracy"].isna().all() if "metric.accuracy" in runs \
        else not runs.empty
    score = "test perplexity" if lm else "test accuracy (%)"
    versus = "vs LoRA (nats / token)" if lm else "vs LoRA (points)"
    header = ["method", "trainable params", "learning rate", score, "95% CI", versus,
              "s / step"]
    if runs.empty:
        return Table(header, [], "")
    names = runs.apply(variant_name, axis=1)
    reference = runs[names.str.startswith("LoRA ")]
    rows = []
    for name in sorted(set(names), key=_order):
        sel = runs[names == name]
        trained = _get(sel.iloc[0], "config.method", "lora") != "none"
        if lm:
            cell = mean_std(sel["metric.perplexity"].tolist(), scale=1.0, digits=3)
            diff = loss_difference_text(paired_loss(sel, reference))
        else:
            cell = mean_std(sel["metric.accuracy"].tolist())
            diff = difference_text(paired(sel, reference))
        steps = sel["step_seconds"].dropna()
        rows.append([name, f"{int(sel['trainable_params'].iloc[0]):,}",
                     rate_cell(sel) if trained else "–", cell,
                     "" if lm else interval_text(sel),
                     "" if sel.index.equals(reference.index) else diff,
                     f"{steps.median():.3f}" if len(steps) else "–"])
    first = runs.iloc[0]
    what = ("BBC News test accuracy (%) of MiniLM" if not lm else
            f"test perplexity of the {int(first['config.model.num_layers'])}-layer "
            f"Llama-style model (hidden {int(first['config.model.hidden_size'])}) adapted from "
            "Python to English prose")
    caption = (f"LoRA and its variants against the baselines ({experiment}): {what}, mean ± "
               f"std over seeds {seeds_of(runs)}, at the best validation point of "
               f"{int(first['config.steps'])} steps; each method's learning rate chosen on "
               "validation from its grid at seed 0 (the column). "
               + ("Beside it: the mean loss per token minus LoRA's over the test windows "
                  if lm else "Beside it: the 95% bootstrap interval over the test articles, "
                  "and the paired difference from LoRA ")
               + "with its 95% paired-bootstrap interval († where it excludes 0; otherwise "
               "within noise). Seconds per step: median over runs, on a shared 2-core CPU.")
    if any(r[2].endswith(tuple(EDGE_MARKS.values())) for r in rows):
        caption += (" ↑ / ↓: the highest / lowest rate of the method's grid was chosen, so its "
                    "best rate may lie beyond the grid.")
    return Table(header, rows, caption)


def last_point_note(runs: pd.DataFrame) -> str:
    """How many runs chose their last evaluation as the best one (still improving when
    training stopped), from ``metric.best_step`` against ``config.steps``."""
    if "metric.best_step" not in runs or runs["metric.best_step"].isna().all():
        return ""
    trained = runs[runs["config.method"].fillna("lora") != "none"]
    last = int((trained["metric.best_step"] == trained["config.steps"]).sum())
    return (f" The best validation point was the last evaluation in {last} of {len(trained)} "
            "trained runs" + (" (still improving when the budget ended)." if last else "."))


def variant_lines(runs: pd.DataFrame, name: str) -> list[str]:
    """The README summary of a method comparison: each method against LoRA, paired, with the
    verdict "within noise" or "beyond noise" (``report_summary``'s convention)."""
    if runs.empty:
        return []
    names = runs.apply(variant_name, axis=1)
    reference = runs[names.str.startswith("LoRA ")]
    if reference.empty:
        return []
    lm = "metric.accuracy" not in runs or runs["metric.accuracy"].isna().all()
    seeds = sorted(int(s) for s in runs["seed"].unique())
    score = "test perplexity" if lm else "test accuracy"
    lines = [f"**{name}** ({len(seeds)} seeds; {score} at the best validation point, each "
             f"method's learning rate tuned on validation):"]
    parts = []
    for method in sorted(set(names) - set(names[reference.index]), key=_order):
        sel = runs[names == method]
        if lm:
            d = paired_loss(sel, reference)
            value = f"{sel['metric.perplexity'].mean():.3f}"
            diff = "" if d is None else f", {interval(d, unit=' nats/token')}"
        else:
            d = paired(sel, reference)
            value = f"{100 * sel['metric.accuracy'].mean():.1f}%"
            diff = "" if d is None else f", {interval(d, 100, 1, ' points')}"
        if d is not None:
            diff += ": beyond noise" if d.excludes_zero else ": within noise"
        parts.append(f"{method} {value}{diff}")
    ref_value = (f"{reference['metric.perplexity'].mean():.3f}" if lm
                 else f"{100 * reference['metric.accuracy'].mean():.1f}%")
    lines.append(f"- Against {names[reference.index[0]]} ({ref_value}): " + "; ".join(parts)
                 + "." + last_point_note(runs) + _edge_note(runs, names))
    return lines


def _edge_note(runs: pd.DataFrame, names: pd.Series) -> str:
    """Which methods chose the highest or lowest rate of their grid (``grid_edge``)."""
    if "grid_edge" not in runs:
        return ""
    tuned = runs["grid_size"].fillna(1) > 1 if "grid_size" in runs else names == names
    edges = {name: runs[(names == name) & tuned]["grid_edge"].iloc[0]
             for name in set(names[tuned])}
    at = sorted((n for n, e in edges.items() if e in EDGE_MARKS), key=_order)
    if not at:
        return ""
    return (f" {len(at)} of {len(edges)} methods chose the highest or lowest rate of their grid"
            f" ({', '.join(f'{n}: {edges[n]}' for n in at)}), so their best rate may lie "
            "beyond it.")
