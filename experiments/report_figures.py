"""The figures and the adapter analysis of the report: accuracy against rank (error bars for
LoRA, bands for the baselines), the LoRA paper's subspace-similarity heatmaps (Figure 3), and
what the learnt updates look like (Table 7: effective rank, amplification factor).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from report_cells import (
    ADAPT_NAMES,
    BASELINE_NAMES,
    Table,
    experiment_runs,
)
from report_tables import (
    rank_rows,
)

OFF_SCALE = 10.0
"""Points (%) below the median line point at which a point is drawn off scale: a run that
diverged would otherwise flatten every other line into a band at the top."""


def _std(x) -> float:
    return float(x.std(ddof=1)) if len(x) > 1 else 0.0


def off_scale(points: dict, spread: float = OFF_SCALE) -> tuple[float | None, list]:
    """The y-axis floor and the keys of the points drawn below it, from ``points`` (key ->
    (mean, std) in %): those more than ``spread`` below the median mean; (None, []) when none
    is, so the axis takes every point.

    >>> off_scale({"a": (95.0, 1.0), "b": (96.0, 0.5), "c": (26.8, 6.7)})
    (93.0, ['c'])
    >>> off_scale({"a": (95.0, 1.0), "b": (90.0, 2.0)})
    (None, [])
    """
    median = float(np.median([mean for mean, _ in points.values()]))
    low = [key for key, (mean, _) in points.items() if mean < median - spread]
    if not low:
        return None, []
    return min(mean - std for key, (mean, std) in points.items() if key not in low) - 1.0, low


def plot_accuracy_vs_rank(frame: pd.DataFrame, path: str | Path,
                          experiment: str = "rank_ablation") -> bool:
    """Accuracy (%) against rank, one line per target set and scale convention with std error
    bars over seeds, each baseline as a horizontal line with a mean ± std band; returns False
    (and writes nothing) without runs."""
    runs = experiment_runs(frame, experiment)
    if runs.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.0), dpi=120)
    groups = rank_rows(runs)
    several_scales = len({scale for _, scale in groups}) > 1
    points = {}
    for (adapt, scale), sel in groups.items():
        summary = sel.groupby("config.lora.rank")["metric.accuracy"].agg(["mean", _std])
        label = ADAPT_NAMES[adapt] + (f", {scale}" if several_scales else "")
        ax.errorbar(summary.index, 100 * summary["mean"], yerr=100 * summary["_std"],
                    marker="o", capsize=3, label=label,
                    linestyle="--" if several_scales and scale.startswith("rs") else "-")
        points.update({(label, rank): (100 * row["mean"], 100 * row["_std"])
                       for rank, row in summary.iterrows()})
    floor, low = off_scale(points) if points else (None, [])
    if floor is not None:  # a diverged cell: keep the others readable, name it at the edge
        top = max(mean + std for key, (mean, std) in points.items() if key not in low)
        ax.set_ylim(floor, min(top + 1.0, 100.5))
        for i, (label, rank) in enumerate(low):
            ax.annotate(f"{label}, r={rank}: {points[label, rank][0]:.1f}% (off scale)",
                        xy=(rank, floor), xytext=(-6, 10 + 11 * i), textcoords="offset points",
                        ha="right", fontsize=7, arrowprops=dict(arrowstyle="->", lw=0.8))
    for (method, name), style in zip(BASELINE_NAMES.items(), ("--", ":"), strict=True):
        sel = runs[runs["config.method"] == method]["metric.accuracy"]
        if not sel.empty:
            mean, std = 100 * sel.mean(), 100 * _std(sel)
            ax.axhline(mean, color="gray", linestyle=style, label=f"{name} (band: ± std)")
            ax.axhspan(mean - std, mean + std, color="gray", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MiniLM on BBC News ({experiment}): accuracy vs rank (mean ± std)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: lines cross
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def adapter_runs(frame: pd.DataFrame, experiment: str = "rank_ablation", adapt: str = "qv",
                 seed: int = 0) -> pd.DataFrame:
    """The LoRA runs of ``experiment`` on ``adapt`` at ``seed`` whose adapters the analysis
    reads: one per rank, at the constant scale alpha/r (rsLoRA rows left out; pass rows after
    :func:`lowrank.tuning.tuned` so that each rank is its chosen rate's run).

    >>> adapter_runs(pd.DataFrame()).empty
    True
    """
    runs = experiment_runs(frame, experiment)
    if runs.empty:
        return runs
    rslora = (runs["config.lora.rslora"].fillna(False).astype(bool)
              if "config.lora.rslora" in runs else False)
    return runs[(runs["config.method"] == "lora") & (runs["config.adapt"] == adapt)
                & (runs["seed"] == seed) & ~rslora].sort_values("config.lora.rank")


def subspace_pairs(frame: pd.DataFrame, runs_dir: str | Path, experiment: str = "rank_ablation",
                   adapt: str = "qv", ranks: tuple[int, int] = (8, 64), seed: int = 0,
                   layer: int = 3) -> dict[str, tuple]:
    """``{"W_q": (A of rank ranks[0], A of rank ranks[1]), "W_v": ...}`` from the exported
    adapters of the ``adapt`` runs of one seed at encoder layer ``layer``
    (:func:`adapter_runs`)."""
    lora = adapter_runs(frame, experiment, adapt, seed)
    out: dict[str, tuple] = {}
    by_rank = {int(r["config.lora.rank"]): r["config_hash"] for _, r in lora.iterrows()}
    if not all(r in by_rank for r in ranks):
        return out
    for name, module in (("W_q", "query"), ("W_v", "value")):
        weight = f"bert/encoder/layer_{layer}/attention/self/{module}/kernel"
        pairs = [_adapter_pair(Path(runs_dir), experiment, by_rank[r], weight) for r in ranks]
        if all(p is not None for p in pairs):
            out[name] = tuple(p[0] for p in pairs)
    return out


def plot_subspace_similarity(pairs: dict[str, tuple], path: str | Path, ranks=(8, 64),
                             layer: int = 3) -> bool:
    """The LoRA paper's Figure 3: phi(A_{r1}, A_{r2}, i, j) heatmaps for each weight type."""
    if not pairs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowrank.analysis import subspace_similarity_grid

    fig, axes = plt.subplots(1, len(pairs), figsize=(5.0 * len(pairs), 2.6), dpi=120,
                             squeeze=False)
    for ax, (name, (a1, a2)) in zip(axes[0], pairs.items(), strict=True):
        grid = np.asarray(subspace_similarity_grid(a1, a2))
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                       extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
        ax.set_xlabel(f"j (top directions of A, r={ranks[1]})")
        ax.set_ylabel(f"i (r={ranks[0]})")
        ax.set_title(f"{name}, layer {layer}: phi(A_r={ranks[0]}, A_r={ranks[1]}, i, j)",
                     fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _adapter_pair(runs_dir: Path, experiment: str, config_hash: str, weight: str):
    from safetensors.numpy import load_file

    file = runs_dir / experiment / config_hash / "adapters" / "adapters.safetensors"
    if not file.is_file():
        return None
    arrays = load_file(str(file))
    if f"{weight}/a" not in arrays:
        return None
    return arrays[f"{weight}/a"], arrays[f"{weight}/b"]


def adapter_table(frame: pd.DataFrame, runs_dir: str | Path, base: dict,
                  experiment: str = "rank_ablation", adapt: str = "qv", seed: int = 0,
                  layer: int = 3) -> Table:
    """Per rank, for the ``adapt`` runs of one seed at encoder layer ``layer``: effective
    rank of each learnt update dW = (alpha / r) A B, its amplification factor
    ||dW||_F / ||U^T W V||_F against the base weight W (the LoRA paper's Table 7), and the
    subspace similarity of its top direction with the r=64 run's top-8 (phi(A_r, A_64, 1, 8)).

    Args:
      base: ``{weight path: W}`` of the frozen base (float arrays ``[in, out]``).
    """
    from lowrank.analysis import amplification_factor, effective_rank, subspace_similarity

    header = ["rank r", "weight", "effective rank of dW", "amplification", "phi(A_r, A_64, 1, 8)"]
    lora = adapter_runs(frame, experiment, adapt, seed)
    if lora.empty:
        return Table(header, [], "")
    rows = []
    largest = {}
    for _, run in lora.iloc[::-1].iterrows():  # the largest rank first, as the reference
        for module in ("query", "value"):
            weight = f"bert/encoder/layer_{layer}/attention/self/{module}/kernel"
            pair = _adapter_pair(Path(runs_dir), experiment, run["config_hash"], weight)
            if pair is None or weight not in base:
                continue
            a, b = pair
            rank = int(run["config.lora.rank"])
            largest.setdefault(module, (rank, a))
            dw = (float(run["config.lora.alpha"]) / rank) * (a @ b)
            ref_rank, ref_a = largest[module]
            phi = subspace_similarity(a, ref_a, 1, min(8, ref_rank))
            rows.append([str(rank), ADAPT_NAMES["q" if module == "query" else "v"],
                         f"{float(effective_rank(dw)):.2f}",
                         f"{float(amplification_factor(dw, base[weight], rank)):.1f}",
                         f"{float(phi):.2f}"])
    rows.sort(key=lambda row: (int(row[0]), row[1]))
    ref = max((r for r, _ in largest.values()), default=0)
    header[-1] = f"phi(A_r, A_{ref}, 1, 8)"
    caption = (f"The learnt updates of the {ADAPT_NAMES[adapt]} runs of {experiment} (seed "
               f"{seed}, encoder layer {layer}, scale alpha/r): Roy-Vetterli effective rank of "
               "dW = (alpha/r) A B; amplification "
               "factor ||dW||_F / ||U^T W V||_F with U, V the top-r singular directions of dW; "
               f"overlap of the top direction of A_r with the top 8 of A_{ref}.")
    return Table(header, rows, caption)


def minilm_kernels() -> dict:
    """The query and value kernels of the real MiniLM, by path (as the runs name them)."""
    from configs.bbc_task import bert_base
    from lowrank import paths

    _, params = bert_base("minilm", 5, (0, 0, 0, 0))
    return {p: np.asarray(v) for p, v in paths.flatten(params).items()
            if p.endswith(("query/kernel", "value/kernel"))}
