"""The report's tables, built from the results rows (``experiments/report.py`` prints them).

Every table takes the rows of one experiment, after :func:`lowrank.tuning.tuned` has kept
each setting's rows at the learning rate the protocol chose on validation. Cells are
``mean ± std`` over seeds (in %); where the rows store per-example test predictions, a cell
also gives its paired difference from a reference with a 95% paired-bootstrap interval over
the test examples (the seeds' correctness averaged per example), marked † when the interval
excludes 0 and "within noise" otherwise.

Bits per parameter are defined once: **whole model** = the frozen tree's stored bits over
all its parameters (``bits_per_param``: embeddings, norms and the head stay float32);
**quantized weight** = the bits of the quantized kernels (codes and scales) over their own
parameters (``metric.quant_bits_per_param``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from lowrank import stats

ADAPT_NAMES = {"q": "W_q", "v": "W_v", "qv": "W_q, W_v", "qkvo": "W_q, W_k, W_v, W_o",
               "all": "all linear"}
BASELINE_NAMES = {"full": "full fine-tuning", "head": "classifier head only"}
DATA_TYPES = ("float32", "int8", "int8+dq", "int4", "int4+dq", "fp4", "fp4+dq", "nf4", "nf4+dq")
LM_METHODS = {"none": "pretrained base, not adapted", "full": "full fine-tuning",
              "lora": "LoRA"}
EDGE_MARKS = {"high": " ↑", "low": " ↓"}  # lowrank.tuning's grid_edge
WHOLE_MODEL_BITS = "bits / param (whole model)"
QUANTIZED_BITS = "bits / quantized weight"


@dataclasses.dataclass(frozen=True)
class Table:
    """A table as text cells: ``header`` and ``rows`` (lists of strings), and a caption."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"mean ± std"`` of ``values * scale`` (sample std, ddof=1); one value: just it; none:
    an en dash.

    >>> mean_std([0.90, 0.92]), mean_std([0.9]), mean_std([])
    ('91.0 ± 1.4', '90.0', '–')
    """
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float) * scale
    if v.size == 0:
        return "–"
    if v.size == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def kind_of(experiment: str) -> str:
    """The table family of an experiment name: its config's stem ("rank_ablation:tiny" ->
    "rank_ablation").

    >>> kind_of("rank_ablation:tiny"), kind_of("quant_ablation")
    ('rank_ablation', 'quant_ablation')
    """
    return str(experiment).split(":")[0]


def experiment_runs(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows filed under experiment ``name`` (none when the frame has no such column)."""
    if frame.empty or "experiment" not in frame:
        return frame.iloc[0:0]
    return frame[frame["experiment"] == name]


def data_type(row: pd.Series) -> str:
    """The QLoRA-style name of a run's base storage: "float32", "int8", ..., "nf4+dq"."""
    fmt = row.get("config.quant.fmt", "none")
    if not isinstance(fmt, str) or fmt == "none":
        return "float32"
    return fmt + ("+dq" if bool(row.get("config.quant.double_quant", 0)) else "")


def scale_name(runs: pd.DataFrame) -> str:
    """How LoRA runs of one row set their scale: "rsLoRA (α=8)" (scale alpha/sqrt(r)),
    "α=2r" (a constant alpha/r), or "α=16" (one alpha, so alpha/r falls with the rank).

    >>> scale_name(pd.DataFrame({"config.lora.alpha": [2.0, 8.0], "config.lora.rank": [1, 4]}))
    'α=2r'
    """
    if "config.lora.alpha" not in runs:
        return "–"
    alphas = runs["config.lora.alpha"].astype(float)
    if "config.lora.rslora" in runs and runs["config.lora.rslora"].fillna(False).astype(bool).all():
        return "rsLoRA (" + ", ".join(f"α={a:g}" for a in sorted(set(alphas))) + ")"
    if (alphas == 2 * runs["config.lora.rank"].astype(float)).all() and alphas.nunique() > 1:
        return "α=2r"
    return ", ".join(f"α={a:g}" for a in sorted(set(alphas)))


def _isnan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


# ---- paired comparisons over the stored per-example predictions ----------------------------

def correctness(rows: pd.DataFrame) -> dict[int, np.ndarray]:
    """``{seed: per-example 0/1 array}`` of the rows that stored predictions."""
    out = {}
    if "predictions" not in rows:
        return out
    for _, row in rows.iterrows():
        text = row["predictions"]
        if isinstance(text, str) and text:
            scores = json.loads(text)
            if "correct" in scores:
                out[int(row["seed"])] = np.asarray(scores["correct"], np.float64)
    return out


def paired(rows: pd.DataFrame, reference: pd.DataFrame) -> stats.PairedDifference | None:
    """The paired bootstrap of ``rows``' accuracy minus ``reference``'s over the seeds both
    have (per example, each side's correctness averaged over those seeds); None without
    stored predictions on both sides."""
    a, b = correctness(rows), correctness(reference)
    seeds = sorted(set(a) & set(b))
    if not seeds or any(a[s].shape != b[s].shape for s in seeds):
        return None
    return stats.paired_bootstrap(np.mean([a[s] for s in seeds], 0),
                                  np.mean([b[s] for s in seeds], 0))


def window_losses(rows: pd.DataFrame) -> dict[int, np.ndarray]:
    """``{seed: per-sequence mean loss}`` of the LM rows that stored per-window scores."""
    out = {}
    for _, row in rows.iterrows():
        text = row.get("predictions")
        if isinstance(text, str) and text:
            scores = json.loads(text)
            if "nll" in scores:
                out[int(row["seed"])] = (np.asarray(scores["nll"], np.float64)
                                         / np.asarray(scores["tokens"], np.float64))
    return out


def paired_loss(rows: pd.DataFrame, reference: pd.DataFrame) -> stats.PairedDifference | None:
    """The paired bootstrap over sequences of ``rows``' mean loss minus ``reference``'s (a
    difference of log-perplexities); None without stored per-window scores."""
    a, b = window_losses(rows), window_losses(reference)
    seeds = sorted(set(a) & set(b))
    if not seeds or any(a[s].shape != b[s].shape for s in seeds):
        return None
    return stats.paired_bootstrap(np.mean([a[s] for s in seeds], 0),
                                  np.mean([b[s] for s in seeds], 0))


def loss_difference_text(d: stats.PairedDifference | None) -> str:
    """``"+0.0012 [-0.0003, +0.0027]"`` (nats per token), † when the interval excludes 0."""
    if d is None:
        return ""
    mark = "†" if d.excludes_zero else ""
    return f"{d.difference:+.4f} [{d.low:+.4f}, {d.high:+.4f}]{mark}"


def difference_text(d: stats.PairedDifference | None) -> str:
    """``"+1.2 [-0.4, +2.9]"`` in points, † when the interval excludes 0; "" for None."""
    if d is None:
        return ""
    mark = "†" if d.excludes_zero else ""
    return f"{100 * d.difference:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]{mark}"


def interval_text(rows: pd.DataFrame) -> str:
    """The 95% bootstrap interval of the seed-averaged accuracy, ``"[88.1, 93.7]"``."""
    scores = correctness(rows)
    if not scores:
        return ""
    low, high = stats.bootstrap_ci(np.mean(list(scores.values()), 0))
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def rate_cell(rows: pd.DataFrame) -> str:
    """The learning rate(s) of ``rows``, marked ↑ / ↓ where tuning chose its grid's top /
    bottom (``grid_edge``).

    >>> rate_cell(pd.DataFrame({"config.optimizer.learning_rate": [0.003, 0.003],
    ...                         "grid_edge": ["high", "high"]}))
    '0.003 ↑'
    """
    if "config.optimizer.learning_rate" not in rows:
        return "–"
    rates = sorted(set(rows["config.optimizer.learning_rate"].dropna()))
    edge = EDGE_MARKS.get(str(rows["grid_edge"].iloc[0]), "") if "grid_edge" in rows else ""
    return ", ".join(f"{r:g}" for r in rates) + edge


def _seeds(runs: pd.DataFrame) -> list[int]:
    return sorted(int(s) for s in runs["seed"].unique())


def _protocol_note(runs: pd.DataFrame) -> str:
    tuned = "grid_size" in runs and (runs["grid_size"] > 1).any()
    selected = "metric.best_step" in runs and runs["metric.best_step"].notna().any()
    parts = []
    if selected:
        parts.append("test accuracy at the best validation epoch")
    if tuned:
        parts.append("learning rate chosen on validation per setting")
    return f" ({'; '.join(parts)})" if parts else ""


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
               f"{_seeds(runs)}{_protocol_note(runs)}, by the weights LoRA adapts, its scale "
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
               f"seeds {_seeds(runs)}{_protocol_note(runs)}; the interval is a bootstrap over "
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
               f"(mean ± std over seeds {_seeds(runs)}{_protocol_note(runs)}) and its paired "
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
               f"mean ± std over seeds {_seeds(runs)}{protocol}{compared}.")
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


def to_markdown(table: Table) -> str:
    """A GitHub Markdown table (caption above it, in italics).

    >>> print(to_markdown(Table(["a", "b"], [["1", "2"]])))
    | a | b |
    |---|---|
    | 1 | 2 |
    """
    lines = [f"*{table.caption}*", ""] if table.caption else []
    lines.append("| " + " | ".join(table.header) + " |")
    lines.append("|" + "|".join("---" for _ in table.header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines)


def _latex_cell(text: str) -> str:
    text = text.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%")
    text = text.replace("_", r"\_").replace("#", r"\#")
    text = text.replace("α", r"$\alpha$").replace("†", r"$^\dagger$")
    return text.replace("±", r"$\pm$").replace("–", "--")


def to_latex(table: Table, label: str = "") -> str:
    """A booktabs ``table`` environment.

    >>> print(to_latex(Table(["a", "b"], [["1 ± 2", "W_q"]])))
    \\begin{table}[t]
    \\centering
    \\begin{tabular}{lr}
    \\toprule
    a & b \\\\
    \\midrule
    1 $\\pm$ 2 & W\\_q \\\\
    \\bottomrule
    \\end{tabular}
    \\end{table}
    """
    lines = [r"\begin{table}[t]", r"\centering"]
    lines.append(r"\begin{tabular}{l" + "r" * (len(table.header) - 1) + "}")
    lines += [r"\toprule", " & ".join(_latex_cell(h) for h in table.header) + r" \\",
              r"\midrule"]
    lines += [" & ".join(_latex_cell(c) for c in row) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.caption:
        lines.append(r"\caption{" + _latex_cell(table.caption) + "}")
    if label:
        lines.append(r"\label{" + label + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines)
