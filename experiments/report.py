"""Paper-style tables and figures from the results database (never typed by hand).

    python experiments/report.py --db=workdir/results.sqlite --runs=workdir/runs \\
        --out=experiments/results

Prints the Markdown tables and, with ``--out``, writes ``tables.md``, ``tables.tex``
(booktabs), ``runs.csv`` (every run, failed ones included), ``accuracy_vs_rank.png`` and,
when ``--runs`` holds the exported adapters, ``subspace_similarity.png``.

Tables: targets x rank of mean +- std test accuracy over seeds (the LoRA paper's Tables 5
and 6); data type x (bits per parameter, weight RMSE, accuracy) (QLoRA's data-type
comparison); method x (trainable parameters, seconds per step, peak memory). ``--db`` may
also be a CSV export.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lowrank import results  # noqa: E402

ADAPT_NAMES = {"q": "W_q", "v": "W_v", "qv": "W_q, W_v", "qkvo": "W_q, W_k, W_v, W_o",
               "all": "all linear"}
BASELINE_NAMES = {"full": "full fine-tuning", "head": "classifier head only"}
DATA_TYPES = ("float32", "int8", "int4", "fp4", "nf4", "nf4+dq")


@dataclasses.dataclass(frozen=True)
class Table:
    """A table as text cells: ``header`` and ``rows`` (lists of strings), and a caption."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""


def load_runs(path: str | Path) -> pd.DataFrame:
    """The finished runs of a results database (SQLite) or of its CSV export.

    >>> load_runs(":memory:").empty
    True
    """
    if str(path).endswith(".csv"):
        frame = pd.read_csv(path)
        return frame[frame["status"] == "ok"].reset_index(drop=True)
    db = results.ResultsDB(path)
    try:
        return db.frame("ok")
    finally:
        db.close()


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


def _experiment(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    if frame.empty or "experiment" not in frame:
        return frame.iloc[0:0]
    return frame[frame["experiment"] == name]


def data_type(row: pd.Series) -> str:
    """The QLoRA-style name of a run's base storage: "float32", "int8", ..., "nf4+dq"."""
    fmt = row.get("config.quant.fmt", "none")
    if not isinstance(fmt, str) or fmt == "none":
        return "float32"
    return fmt + ("+dq" if bool(row.get("config.quant.double_quant", 0)) else "")


def rank_table(frame: pd.DataFrame, experiment: str = "rank_ablation",
               metric: str = "metric.accuracy") -> Table:
    """Targets x rank: mean ± std of ``metric`` (in %) over seeds, then a row per baseline.

    >>> rank_table(pd.DataFrame()).rows
    []
    """
    runs = _experiment(frame, experiment)
    if runs.empty:
        return Table(["weights adapted"], [], "")
    lora = runs[runs["config.method"] == "lora"]
    ranks = sorted(int(r) for r in lora["config.lora.rank"].unique())
    header = ["weights adapted", *[f"r={r}" for r in ranks]]
    rows = []
    adapts = [a for a in ADAPT_NAMES if a in set(lora["config.adapt"])]
    for adapt in adapts:
        cells = [ADAPT_NAMES[adapt]]
        for r in ranks:
            sel = lora[(lora["config.adapt"] == adapt) & (lora["config.lora.rank"] == r)]
            cells.append(mean_std(sel[metric].tolist()))
        rows.append(cells)
    for method, name in BASELINE_NAMES.items():
        sel = runs[runs["config.method"] == method]
        if not sel.empty:
            rows.append([name, mean_std(sel[metric].tolist()), *[""] * (len(ranks) - 1)])
    seeds = sorted(int(s) for s in runs["seed"].unique())
    caption = (f"Test accuracy (%) on BBC News, mean ± std over seeds {seeds}, by the weights "
               "LoRA adapts and its rank r; baselines train every weight or the head alone.")
    return Table(header, rows, caption)


def quant_table(frame: pd.DataFrame, experiment: str = "quant_ablation") -> Table:
    """Data type x (bits per quantized parameter, weight RMSE, accuracy mean ± std).

    >>> quant_table(pd.DataFrame()).rows
    []
    """
    runs = _experiment(frame, experiment)
    header = ["base data type", "bits / param", "weight RMSE", "accuracy (%)"]
    if runs.empty:
        return Table(header, [], "")
    names = runs.apply(data_type, axis=1)
    rows = []
    for name in [d for d in DATA_TYPES if d in set(names)]:
        sel = runs[names == name]
        bits = sel["metric.quant_bits_per_param"].astype(float).mean()
        bits_text = "32" if name == "float32" or math.isnan(bits) else f"{bits:.3f}"
        rmse = sel["metric.weight_rmse"].astype(float).mean()
        rows.append([name, bits_text, f"{rmse:.2e}" if rmse else "0",
                     mean_std(sel["metric.accuracy"].tolist())])
    caption = ("LoRA (r=8, every linear layer) over a frozen MiniLM whose transformer weights are "
               "stored in each data type (blocks of 64): bits per stored weight, RMSE of the "
               "dequantized weights, BBC News test accuracy (mean ± std over seeds).")
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


def method_table(frame: pd.DataFrame, ranks: Sequence[int] = (8,)) -> Table:
    """Method x (trainable parameters, seconds per step, peak memory): every baseline, LoRA
    at ``ranks`` on each target set, and each quantized base (means over seeds).

    >>> method_table(pd.DataFrame()).rows
    []
    """
    header = ["method", "trainable params", "s / step", "peak memory (MB)"]
    if frame.empty:
        return Table(header, [], "")
    keep = (frame["config.method"] != "lora") | frame["config.lora.rank"].isin(list(ranks))
    runs = frame[keep]
    names = runs.apply(method_name, axis=1)
    rows = []
    for name in dict.fromkeys(sorted(names, key=lambda n: (_method_order(n), n))):
        sel = runs[names == name]
        rows.append([name, f"{int(sel['trainable_params'].iloc[0]):,}",
                     f"{sel['step_seconds'].mean():.2f}", f"{sel['peak_memory_mb'].mean():.0f}"])
    caption = ("Cost of each method on this CPU: trainable parameters, seconds per optimizer "
               "step (compilation excluded, mean over runs; a shared machine, so only rough) "
               "and peak resident memory of the run's process.")
    return Table(header, rows, caption)


def _method_order(name: str) -> int:
    if name.startswith("classifier"):
        return 0
    if name.startswith("full"):
        return 2
    return 1 if " over " not in name else 3


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


def plot_accuracy_vs_rank(frame: pd.DataFrame, path: str | Path,
                          experiment: str = "rank_ablation") -> bool:
    """Accuracy (%) against rank, one line per target set with std error bars over seeds,
    baselines as horizontal bands; returns False (and writes nothing) without runs."""
    runs = _experiment(frame, experiment)
    if runs.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    lora = runs[runs["config.method"] == "lora"]
    for adapt in [a for a in ADAPT_NAMES if a in set(lora["config.adapt"])]:
        sel = lora[lora["config.adapt"] == adapt]
        stats = (sel.groupby("config.lora.rank")["metric.accuracy"]
                 .agg(["mean", lambda x: x.std(ddof=1) if len(x) > 1 else 0.0]))
        stats.columns = ["mean", "std"]
        ax.errorbar(stats.index, 100 * stats["mean"], yerr=100 * stats["std"].fillna(0.0),
                    marker="o", capsize=3, label=ADAPT_NAMES[adapt])
    for (method, name), style in zip(BASELINE_NAMES.items(), ("--", ":"), strict=True):
        sel = runs[runs["config.method"] == method]["metric.accuracy"]
        if not sel.empty:
            ax.axhline(100 * sel.mean(), color="gray", linestyle=style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MiniLM on BBC News: accuracy vs rank (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _adapter_a(runs_dir: Path, experiment: str, config_hash: str, weight: str):
    from safetensors.numpy import load_file

    file = runs_dir / experiment / config_hash / "adapters" / "adapters.safetensors"
    if not file.is_file():
        return None
    arrays = load_file(str(file))
    return arrays.get(f"{weight}/a")


def subspace_pairs(frame: pd.DataFrame, runs_dir: str | Path, experiment: str = "rank_ablation",
                   adapt: str = "qv", ranks: tuple[int, int] = (8, 64), seed: int = 0,
                   layer: int = 3) -> dict[str, tuple]:
    """``{"W_q": (A of rank ranks[0], A of rank ranks[1]), "W_v": ...}`` from the exported
    adapters of the ``adapt`` runs of one seed at encoder layer ``layer``."""
    runs = _experiment(frame, experiment)
    out: dict[str, tuple] = {}
    if runs.empty:
        return out
    lora = runs[(runs["config.method"] == "lora") & (runs["config.adapt"] == adapt)
                & (runs["seed"] == seed)]
    by_rank = {int(r["config.lora.rank"]): r["config_hash"] for _, r in lora.iterrows()}
    if not all(r in by_rank for r in ranks):
        return out
    for name, module in (("W_q", "query"), ("W_v", "value")):
        weight = f"bert/encoder/layer_{layer}/attention/self/{module}/kernel"
        pair = tuple(_adapter_a(Path(runs_dir), experiment, by_rank[r], weight) for r in ranks)
        if all(a is not None for a in pair):
            out[name] = pair
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


def report(frame: pd.DataFrame) -> list[tuple[str, Table]]:
    """The three tables of ``frame``, each with a LaTeX label; empty ones left out."""
    tables = [("tab:rank", rank_table(frame)), ("tab:quant", quant_table(frame)),
              ("tab:method", method_table(frame))]
    return [(label, t) for label, t in tables if t.rows]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=str(ROOT / "workdir" / "results.sqlite"),
                        help="results database (.sqlite) or its CSV export (.csv)")
    parser.add_argument("--runs", default=None,
                        help="the sweeps' --workdir, for the exported adapters (heatmaps)")
    parser.add_argument("--out", default=None,
                        help="folder for tables.md, tables.tex, runs.csv and the figures")
    args = parser.parse_args(argv)
    if not str(args.db).endswith(".csv") and not Path(args.db).is_file():
        parser.error(f"--db {args.db!r} does not exist")
    frame = load_runs(args.db)
    tables = report(frame)
    markdown = "\n\n".join(to_markdown(t) for _, t in tables)
    print(markdown if tables else f"no finished runs in {args.db}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tables.md").write_text(markdown + "\n")
        (out / "tables.tex").write_text(
            "% generated by experiments/report.py; needs \\usepackage{booktabs}\n"
            + "\n\n".join(to_latex(t, label) for label, t in tables) + "\n")
        if not str(args.db).endswith(".csv"):
            db = results.ResultsDB(args.db)
            db.export_csv(out / "runs.csv")
            db.close()
        plot_accuracy_vs_rank(frame, out / "accuracy_vs_rank.png")
        if args.runs:
            plot_subspace_similarity(subspace_pairs(frame, args.runs),
                                     out / "subspace_similarity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
