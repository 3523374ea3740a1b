"""The compression ablation's table, Pareto figure and comparisons at equal size, generated
from the results database (or its CSV export) of ``configs/compress_ablation.py``.

    python experiments/compression_report.py --db=workdir/compression.sqlite \
        --out=experiments/results

writes ``compression.md`` (the table, the equal-size comparisons, how it was made),
``compression_pareto.png`` and ``compression_runs.csv``. The x axis is the bits stored per
encoder-kernel parameter (codes, scales and factors over the dense kernels' parameter count:
the same kernels in every base, so equal bits are equal bytes).
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

from report import Table, load_runs, to_markdown  # noqa: E402

EXPERIMENT = "compress_ablation"
RECOVERY = {"head": "head only", "lora": "LoRA r=8"}
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


def wilson(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson 95% interval of an accuracy ``correct`` (a fraction) on ``n`` examples.

    >>> [round(v, 3) for v in wilson(0.9, 223)]
    [0.854, 0.933]
    """
    centre = (correct + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(correct * (1 - correct) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def rows(frame: pd.DataFrame, experiment: str = EXPERIMENT) -> pd.DataFrame:
    """One row per base x recovery: kernel bits per parameter, weight RMSE, accuracy (mean
    over seeds), seeds."""
    runs = frame[frame["experiment"] == experiment].copy()
    runs["budget"] = runs["config.compress.budget"].astype(float)
    runs["fmt"] = runs["config.quant.fmt"].astype(str)
    runs["method"] = runs["config.method"].astype(str)
    bits = runs["metric.quant_bits_per_param"].astype(float)
    runs["kernel_bits"] = bits.where(~bits.isna(), 32.0)
    grouped = runs.groupby(["budget", "fmt", "method"], as_index=False).agg(
        kernel_bits=("kernel_bits", "mean"), rmse=("metric.weight_rmse", "mean"),
        accuracy=("metric.accuracy", "mean"), seeds=("seed", "nunique"))
    return grouped.sort_values(["method", "kernel_bits"], ascending=[True, False])


def table(summary: pd.DataFrame, n_eval: int) -> Table:
    header = ["base (encoder kernels)", "bits / kernel param", "weight RMSE", "recovery",
              "accuracy (%)", "95% CI (test set)"]
    out = []
    for _, r in summary.iterrows():
        lo, hi = wilson(r.accuracy, n_eval)
        out.append([base_name(r.budget, r.fmt), f"{r.kernel_bits:.2f}", f"{r.rmse:.2e}",
                    RECOVERY.get(r.method, r.method), f"{100 * r.accuracy:.1f}",
                    f"{100 * lo:.1f}-{100 * hi:.1f}"])
    caption = (f"MiniLM on BBC News over a frozen base whose 36 encoder kernels are compressed "
               f"to low rank (a global budget of their parameters, activation-aware) and/or "
               f"quantized (blocks of 64; a compressed kernel's factors are quantized). Accuracy "
               f"on the {n_eval} test articles; the interval is the test set's binomial (Wilson) "
               f"one, not seed variation.")
    return Table(header, out, caption)


def comparisons(summary: pd.DataFrame, n_eval: int) -> list[str]:
    """Sentences on each equal-size pair, generated from the numbers."""
    lines = []
    for method in sorted(set(summary["method"])):
        sel = summary[summary["method"] == method].set_index(["budget", "fmt"])
        for low, bits in EQUAL_SIZE:
            if low not in sel.index or bits not in sel.index:
                continue
            a, b = sel.loc[low], sel.loc[bits]
            diff = 100 * (a.accuracy - b.accuracy)
            se = 100 * math.sqrt(a.accuracy * (1 - a.accuracy) / n_eval
                                 + b.accuracy * (1 - b.accuracy) / n_eval)
            verdict = ("beats" if diff > 2 * se else "loses to" if diff < -2 * se
                       else "is within two standard errors of")
            lines.append(
                f"- {RECOVERY.get(method, method)}: {base_name(*low)} ({a.kernel_bits:.2f} "
                f"bits/param, {100 * a.accuracy:.1f}%) {verdict} {base_name(*bits)} "
                f"({b.kernel_bits:.2f} bits/param, {100 * b.accuracy:.1f}%): "
                f"{diff:+.1f} points, standard error of the difference {se:.1f}.")
    return lines


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both size (fewer bits) and accuracy, by size.

    >>> pareto([(32, 0.9), (8, 0.92), (4, 0.5), (16, 0.8)])
    [(4, 0.5), (8, 0.92)]
    """
    front, best = [], -np.inf
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    colours = {"head": "tab:grey", "lora": "tab:blue"}
    for method, sel in summary.groupby("method"):
        colour = colours.get(method, "tab:green")
        for _, r in sel.iterrows():
            marker = "s" if not r.budget else "o"
            ax.scatter(r.kernel_bits, 100 * r.accuracy, color=colour, marker=marker, zorder=3)
            ax.annotate(base_name(r.budget, r.fmt), (r.kernel_bits, 100 * r.accuracy),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
        front = pareto(list(zip(sel.kernel_bits, 100 * sel.accuracy, strict=True)))
        ax.plot(*zip(*front, strict=True), color=colour, lw=1,
                label=f"{RECOVERY.get(method, method)} (Pareto front)")
    ax.scatter([], [], color="k", marker="s", label="quantized only")
    ax.scatter([], [], color="k", marker="o", label="low rank (+ quantized factors)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per encoder-kernel parameter (log scale)")
    ax.set_ylabel("BBC News test accuracy (%)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="workdir/compression.sqlite")
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--n-eval", type=int, default=223, help="test articles")
    parser.add_argument("--experiment", default=EXPERIMENT)
    args = parser.parse_args(argv)
    frame = load_runs(args.db)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame[frame["experiment"] == args.experiment].to_csv(out / "compression_runs.csv",
                                                         index=False)
    summary = rows(frame, args.experiment)
    plot(summary, out / "compression_pareto.png")
    text = [to_markdown(table(summary, args.n_eval)), "", "At about equal size:", "",
            *comparisons(summary, args.n_eval)]
    (out / "compression_table.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
