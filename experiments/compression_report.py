"""The compression ablation's tables, Pareto figures and comparisons at equal size, generated
from the results database (or its CSV export) of ``configs/compress_ablation.py`` (MiniLM on
BBC News) and ``configs/compress_ablation.py:lm`` (the LM task).

    python experiments/compression_report.py --db=workdir/protocol.sqlite \
        --out=experiments/results

writes ``compression_table.md`` (one table per experiment and the equal-size comparisons; the
same lines into each ``--readme``'s generated block),
``compression_pareto.png`` (one panel per experiment) and ``compression_runs.csv`` (every
finished row of both, every learning rate tried). Each setting's rows are those at the
learning rate chosen on validation (``lowrank.tuning.tuned``); scores are mean ± std over
seeds; differences are paired over the test examples (articles, or windows' mean loss) with
95% paired-bootstrap intervals, "within noise" where the interval holds 0. The x axis is the
bits stored per transformer-kernel parameter (codes, scales and factors over the dense
kernels' parameter count: the same kernels in every base, so equal bits are equal bytes).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import load_runs, to_markdown  # noqa: E402
from report_cells import (  # noqa: E402
    EDGE_MARKS,
    Table,
    difference_text,
    experiment_runs,
    interval,
    loss_difference_text,
    mean_std,
    paired,
    paired_loss,
    rate_cell,
)
from report_summary import update_readme  # noqa: E402

from lowrank import stats, tuning  # noqa: E402

EXPERIMENTS = ("compress_ablation", "compress_ablation:lm")
RECOVERY = {"head": "head only", "none": "none (base as compressed)", "lora": "LoRA r=8"}
# Pairs of bases of about the same size: (low rank, fewer bits).
EQUAL_SIZE = [((0.25, "none"), (0.0, "int8")), ((0.5, "int8"), (0.0, "nf4")),
              ((0.25, "int8"), (0.5, "nf4"))]


def base_name(budget: float, fmt: str) -> str:
    """``"rank 50% + nf4"``, ``"dense int8"``, ``"dense float32"``.

    >>> base_name(0.5, "nf4"), base_name(0.0, "none")
    ('rank 50% + nf4', 'dense float32')
    """
    bits = "float32" if fmt == "none" else fmt
    return f"dense {bits}" if not budget else f"rank {budget:.0%} + {bits}"


def is_lm(runs: pd.DataFrame) -> bool:
    """Whether rows score perplexity (the LM task) rather than accuracy."""
    return "metric.accuracy" not in runs or runs["metric.accuracy"].isna().all()


def settings(runs: pd.DataFrame) -> dict[tuple[float, str, str], pd.DataFrame]:
    """``{(budget, fmt, method): rows}`` of the tuned rows (each setting at its chosen rate,
    every seed)."""
    runs = tuning.tuned(runs)
    keys = zip(runs["config.compress.budget"].astype(float), runs["config.quant.fmt"].astype(str),
               runs["config.method"].astype(str), strict=True)
    labels = pd.Series(list(keys), index=runs.index)
    out = {key: runs[labels == key] for key in dict.fromkeys(labels)}
    for key, rows in out.items():
        if tuning.cells(rows).nunique() > 1:
            print(f"compression_report.py: warning: the rows of {base_name(*key[:2])} / "
                  f"{key[2]} come from {tuning.cells(rows).nunique()} different settings "
                  "(another --db, or config overrides): they are averaged together",
                  file=sys.stderr)
    return out


def kernel_bits(rows: pd.DataFrame) -> float:
    """Bits per transformer-kernel parameter (32 for a dense float base)."""
    bits = rows["metric.quant_bits_per_param"].astype(float).mean()
    return 32.0 if math.isnan(bits) else float(bits)


def score(rows: pd.DataFrame) -> np.ndarray:
    """Per-seed test scores: accuracy in %, or perplexity."""
    column = "metric.perplexity" if is_lm(rows) else "metric.accuracy"
    return rows[column].astype(float).to_numpy() * (1.0 if is_lm(rows) else 100.0)


def compare(rows: pd.DataFrame, reference: pd.DataFrame) -> stats.PairedDifference | None:
    """The paired difference of ``rows`` from ``reference``: accuracy, or mean loss per token
    (nats; negative is better) on the LM task."""
    return paired_loss(rows, reference) if is_lm(rows) else paired(rows, reference)


def _difference(d: stats.PairedDifference | None, lm: bool) -> str:
    return loss_difference_text(d) if lm else difference_text(d)


def table(runs: pd.DataFrame, experiment: str) -> Table:
    """Base x recovery: bits per kernel parameter, weight RMSE, chosen rate, test score mean ±
    std over seeds, and the paired difference from the dense float32 base with the same
    recovery.

    >>> table(pd.DataFrame(), "compress_ablation").rows
    []
    """
    runs = experiment_runs(runs, experiment)
    lm = is_lm(runs)
    header = ["base (transformer kernels)", "bits / kernel param", "weight RMSE", "recovery",
              "learning rate", "test perplexity" if lm else "test accuracy (%)",
              "vs dense float32 (nats / token)" if lm else "vs dense float32 (points)"]
    if runs.empty:
        return Table(header, [], "")
    cells = settings(runs)
    out = []
    for (budget, fmt, method), rows in sorted(
            cells.items(), key=lambda kv: (kv[0][2] != "none" and kv[0][2] != "head",
                                           -kernel_bits(kv[1]))):
        reference = cells.get((0.0, "none", method))
        rate = "–" if method == "none" else rate_cell(rows)
        values = score(rows)
        diff = "" if reference is None or rows.index.equals(reference.index) else \
            _difference(compare(rows, reference), lm)
        out.append([base_name(budget, fmt), f"{kernel_bits(rows):.2f}",
                    f"{rows['metric.weight_rmse'].astype(float).mean():.2e}",
                    RECOVERY.get(method, method), rate,
                    mean_std(values, scale=1.0, digits=3 if lm else 1), diff])
    seeds = sorted(int(s) for s in runs["seed"].unique())
    first = runs.iloc[0]
    what = (f"test perplexity of the {int(first['config.model.num_layers'])}-layer "
            f"Llama-style model (hidden {int(first['config.model.hidden_size'])}) adapted from "
            "Python to English prose" if lm else "BBC News test accuracy (%) of MiniLM")
    caption = (f"Compression of the frozen base ({experiment}): {what}, mean ± std over seeds "
               f"{seeds}, at the best validation point of {int(first['config.steps'])} steps; "
               "each setting's learning rate chosen on validation at seed 0. The transformer "
               "kernels are compressed to low rank (a global budget of their parameters, "
               "activation-aware) and/or quantized (blocks of 64; a compressed kernel's "
               "factors are quantized). Beside each score: its paired difference from the "
               "dense float32 base with the same recovery, 95% paired-bootstrap interval over "
               "the test " + ("windows" if lm else "articles")
               + " († where it excludes 0; otherwise within noise).")
    if any(r[4].endswith(tuple(EDGE_MARKS.values())) for r in out):
        caption += " ↑ / ↓: the highest / lowest rate of the grid was chosen."
    return Table(header, out, caption)


def comparisons(runs: pd.DataFrame, experiment: str) -> list[str]:
    """A sentence per pair of bases of about equal size (low rank against fewer bits) and
    recovery, with the paired difference and "within noise" / "beyond noise"."""
    runs = experiment_runs(runs, experiment)
    if runs.empty:
        return []
    lm = is_lm(runs)
    cells = settings(runs)
    unit = "nats/token" if lm else "points"
    lines = []
    for method in sorted({m for _, _, m in cells}):
        for low, bits in EQUAL_SIZE:
            a, b = cells.get((*low, method)), cells.get((*bits, method))
            if a is None or b is None:
                continue
            d = compare(a, b)
            if lm:
                values = f"{score(a).mean():.3f} vs {score(b).mean():.3f} perplexity"
                diff = "" if d is None else interval(d, unit=f" {unit}")
                better = d is not None and d.difference < 0
            else:
                values = f"{score(a).mean():.1f}% vs {score(b).mean():.1f}%"
                diff = "" if d is None else interval(d, 100, 1, f" {unit}")
                better = d is not None and d.difference > 0
            verdict = ("no paired scores" if d is None else
                       ("the low-rank base better, beyond noise" if better else
                        "the quantized base better, beyond noise") if d.excludes_zero
                       else "within noise")
            lines.append(f"- {RECOVERY.get(method, method)}: {base_name(*low)} "
                         f"({kernel_bits(a):.2f} bits) against {base_name(*bits)} "
                         f"({kernel_bits(b):.2f} bits): {values}, {diff}: {verdict}.")
    return lines


def pareto(points: Sequence[tuple[float, float]],
           higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The points no other point beats in both size (fewer bits) and score, by size.

    >>> pareto([(32, 0.9), (8, 0.92), (4, 0.5), (16, 0.8)])
    [(4, 0.5), (8, 0.92)]
    >>> pareto([(32, 7.0), (8, 7.5), (4, 9.0)], higher_is_better=False)
    [(4, 9.0), (8, 7.5), (32, 7.0)]
    """
    sign = 1.0 if higher_is_better else -1.0
    front, best = [], -np.inf
    for x, y in sorted(points):
        if sign * y > best:
            front.append((x, y))
            best = sign * y
    return front


def plot(frame: pd.DataFrame, experiments: Sequence[str], path: Path) -> None:
    """One panel per experiment: each base's paired difference from the dense float32 base
    with the same recovery (nats per token on the LM task, accuracy points on BBC; the bar is
    its 95% paired-bootstrap interval) against bits per kernel parameter, each recovery's
    Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [e for e in experiments if not experiment_runs(frame, e).empty]
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(6.4 * max(1, len(present)), 5.2),
                             squeeze=False)
    colours = {"head": "tab:grey", "none": "tab:grey", "lora": "tab:blue"}
    for ax, experiment in zip(axes[0], present, strict=False):
        runs = experiment_runs(frame, experiment)
        lm = is_lm(runs)
        scale = 1.0 if lm else 100.0
        cells = settings(runs)
        for method in sorted({m for _, _, m in cells}):
            colour = colours.get(method, "tab:green")
            reference = cells.get((0.0, "none", method))
            points = []
            for (budget, fmt, m), rows in cells.items():
                if m != method or reference is None:
                    continue
                x = kernel_bits(rows)
                d = None if rows.index.equals(reference.index) else compare(rows, reference)
                y = 0.0 if d is None else scale * d.difference
                err = [[0.0], [0.0]] if d is None else [[y - scale * d.low],
                                                        [scale * d.high - y]]
                ax.errorbar(x, y, yerr=err, color=colour, capsize=3, zorder=3,
                            marker="s" if not budget else "o", linestyle="none")
                ax.annotate(base_name(budget, fmt), (x, y), fontsize=6, color=colour,
                            xytext=(4, -3 if method == "lora" else 3),
                            textcoords="offset points")
                points.append((x, y))
            front = pareto(points, higher_is_better=not lm)
            if front:
                ax.plot(*zip(*front, strict=True), color=colour, lw=1,
                        label=f"{RECOVERY.get(method, method)} (Pareto front)")
        ax.axhline(0.0, color="k", lw=0.5)
        ax.scatter([], [], color="k", marker="s", label="quantized only")
        ax.scatter([], [], color="k", marker="o", label="low rank (+ quantized factors)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per transformer-kernel parameter (log scale)")
        ax.set_ylabel("test loss - dense float32's (nats / token; lower is better)" if lm else
                      "test accuracy - dense float32's (points; higher is better)")
        ax.set_title(f"{experiment}: vs the dense float32 base with the same recovery",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", action="append", default=None,
                        help="results database or CSV export (repeatable)")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--experiment", action="append", default=None,
                        help=f"experiment names (default: {', '.join(EXPERIMENTS)})")
    parser.add_argument("--readme", action="append", default=[],
                        help="a Markdown file whose generated block (report.py's markers) "
                             "gets the tables and comparisons (repeatable)")
    args = parser.parse_args(argv)
    dbs = args.db or ["workdir/protocol.sqlite"]
    frame = pd.concat([load_runs(db) for db in dbs], ignore_index=True)
    experiments = args.experiment or list(EXPERIMENTS)
    known = set(frame["experiment"].dropna()) if "experiment" in frame else set()
    missing = [e for e in experiments if e not in known]
    if len(missing) == len(experiments):
        print(f"compression_report.py: no finished runs of {experiments} in {dbs}; "
              f"experiments there: {sorted(known)}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame[frame["experiment"].isin(experiments)].to_csv(out / "compression_runs.csv",
                                                        index=False)
    plot(frame, experiments, out / "compression_pareto.png")
    text = summary(frame, [e for e in experiments if e not in missing])
    (out / "compression_table.md").write_text("\n".join(text) + "\n")
    for readme in args.readme:
        update_readme(readme, text)
    print("\n".join(text))
    return 0


def summary(frame: pd.DataFrame, experiments: Sequence[str]) -> list[str]:
    """The Markdown lines of each experiment's table and equal-size comparisons (what
    ``compression_table.md`` and the ``--readme`` blocks hold)."""
    text: list[str] = []
    for experiment in experiments:
        text += [f"### {experiment}", "", to_markdown(table(frame, experiment)), "",
                 "At about equal size (paired over the test examples, seeds averaged):", "",
                 *comparisons(frame, experiment), ""]
    return text[:-1] if text and not text[-1] else text


if __name__ == "__main__":
    sys.exit(main())
