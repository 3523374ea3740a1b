"""The report's cells: the :class:`Table` every report table is, the text of its cells (mean ±
std over seeds, paired differences with their intervals, learning rates) and its rendering as
Markdown or LaTeX. The tables themselves are built in ``report_tables.py``.

Cells are ``mean ± std`` over seeds (in %); where the rows store per-example test predictions,
a cell also gives its paired difference from a reference with a 95% paired-bootstrap interval
over the test examples (the seeds' correctness averaged per example), marked † when the
interval excludes 0 and "within noise" otherwise.

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


def _paired_over_seeds(a: dict[int, np.ndarray],
                       b: dict[int, np.ndarray]) -> stats.PairedDifference | None:
    """The paired bootstrap of per-example scores averaged over the seeds both sides have."""
    seeds = sorted(set(a) & set(b))
    if not seeds or any(a[s].shape != b[s].shape for s in seeds):
        return None
    return stats.paired_bootstrap(np.mean([a[s] for s in seeds], 0),
                                  np.mean([b[s] for s in seeds], 0))


def paired(rows: pd.DataFrame, reference: pd.DataFrame) -> stats.PairedDifference | None:
    """The paired bootstrap of ``rows``' accuracy minus ``reference``'s over the seeds both
    have (per example, each side's correctness averaged over those seeds); None without
    stored predictions on both sides."""
    return _paired_over_seeds(correctness(rows), correctness(reference))


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
    return _paired_over_seeds(window_losses(rows), window_losses(reference))


def signed(x: float, digits: int) -> str:
    """``x`` with its sign to ``digits`` decimals; a small negative keeps its sign ("-0.0"), since
    an interval's sign at its end is what its verdict rests on.

    >>> signed(-0.0004, 1), signed(0.25, 2), signed(-1.26, 1)
    ('-0.0', '+0.25', '-1.3')
    """
    return f"{x:+.{digits}f}"


def interval(d: stats.PairedDifference, scale: float = 1.0, digits: int = 4,
             unit: str = "") -> str:
    """``"+1.2 points [-0.4, +2.9]"``: a paired difference and its interval, times ``scale``.

    >>> interval(stats.PairedDifference(0.012, -0.004, 0.029, 0.95), 100, 1, " points")
    '+1.2 points [-0.4, +2.9]'
    """
    return (f"{signed(scale * d.difference, digits)}{unit} [{signed(scale * d.low, digits)}, "
            f"{signed(scale * d.high, digits)}]")


def loss_difference_text(d: stats.PairedDifference | None) -> str:
    """``"+0.0012 [-0.0003, +0.0027]"`` (nats per token), † when the interval excludes 0."""
    if d is None:
        return ""
    mark = "†" if d.excludes_zero else ""
    return interval(d) + mark


def difference_text(d: stats.PairedDifference | None) -> str:
    """``"+1.2 [-0.4, +2.9]"`` in points, † when the interval excludes 0; "" for None."""
    if d is None:
        return ""
    mark = "†" if d.excludes_zero else ""
    return interval(d, 100, 1) + mark


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


def seeds_of(runs: pd.DataFrame) -> list[int]:
    """The seeds of ``runs``, sorted."""
    return sorted(int(s) for s in runs["seed"].unique())


def protocol_note(runs: pd.DataFrame) -> str:
    """What the rows' protocol did, for a caption: " (test accuracy at the best validation epoch;
    learning rate chosen on validation per setting)", or "" for rows without it."""
    tuned = "grid_size" in runs and (runs["grid_size"] > 1).any()
    selected = "metric.best_step" in runs and runs["metric.best_step"].notna().any()
    parts = []
    if selected:
        parts.append("test accuracy at the best validation epoch")
    if tuned:
        parts.append("learning rate chosen on validation per setting")
    return f" ({'; '.join(parts)})" if parts else ""



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
