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
    """The finished runs of a results database (SQLite) or of its CSV export, each run once:
    rows repeating a finished run (an older database could hold them) are left out with a
    warning that counts them, so they never count as extra seeds.

    >>> load_runs(":memory:").empty
    True
    """
    if str(path).endswith(".csv"):
        frame = pd.read_csv(path)
        frame = frame[frame["status"] == "ok"].reset_index(drop=True)
    else:
        db = results.ResultsDB(path)
        try:
            frame = db.frame("ok")
        finally:
            db.close()
    frame, dropped = results.drop_duplicate_runs(frame)
    if dropped:
        print(f"report.py: warning: {path} holds {len(dropped)} repeated finished row(s) "
              f"(same experiment, config hash and seed as an earlier row): left out, ids "
              f"{dropped}", file=sys.stderr)
    return frame


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


def lm_table(frame: pd.DataFrame, experiment: str = "lm_domain") -> Table:
    """Base data type x (bits per quantized parameter, weight RMSE, held-out perplexity and
    final training loss, mean ± std over seeds) of the language-model domain adaptation.

    >>> lm_table(pd.DataFrame()).rows
    []
    """
    runs = _experiment(frame, experiment)
    header = ["base data type", "bits / param", "weight RMSE", "English perplexity",
              "final train loss"]
    if runs.empty:
        return Table(header, [], "")
    names = runs.apply(data_type, axis=1)
    rows = []
    for name in [d for d in DATA_TYPES if d in set(names)]:
        sel = runs[names == name]
        bits = sel["metric.quant_bits_per_param"].astype(float).mean()
        rmse = sel["metric.weight_rmse"].astype(float).mean()
        rows.append([name, "32" if name == "float32" or math.isnan(bits) else f"{bits:.3f}",
                     f"{rmse:.2e}" if rmse else "0",
                     mean_std(sel["metric.perplexity"].tolist(), scale=1.0, digits=2),
                     mean_std(sel["metric.train_loss"].tolist(), scale=1.0, digits=3)])
    first = runs.iloc[0]
    seeds = sorted(int(s) for s in runs["seed"].unique())
    caption = (f"A {int(first['config.model.num_layers'])}-layer Llama-style byte-level model "
               f"(hidden {int(first['config.model.hidden_size'])}) pretrained on Python, "
               f"adapted to English prose by LoRA (r={int(first['config.lora.rank'])}, every "
               f"linear layer, {int(first['config.steps'])} steps) over its base stored in each "
               f"data type: perplexity on held-out English, mean ± std over seeds {seeds}.")
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
    runs = _experiment(frame, experiment)
    if runs.empty:
        return Table(header, [], "")
    lora = runs[(runs["config.method"] == "lora") & (runs["config.adapt"] == adapt)
                & (runs["seed"] == seed)].sort_values("config.lora.rank")
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
    caption = (f"The learnt updates of the {ADAPT_NAMES[adapt]} runs (seed {seed}, encoder layer "
               f"{layer}): Roy-Vetterli effective rank of dW = (alpha/r) A B; amplification "
               "factor ||dW||_F / ||U^T W V||_F with U, V the top-r singular directions of dW; "
               f"overlap of the top direction of A_r with the top 8 of A_{ref}.")
    return Table(header, rows, caption)


def report(frame: pd.DataFrame) -> list[tuple[str, Table]]:
    """The tables of ``frame``, each with a LaTeX label; empty ones left out."""
    tables = [("tab:rank", rank_table(frame)), ("tab:quant", quant_table(frame)),
              ("tab:method", method_table(frame)), ("tab:lm", lm_table(frame))]
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
    try:
        frame = load_runs(args.db)
    except (OSError, ValueError, pd.errors.ParserError, results.ResultsDBError) as e:
        parser.exit(1, f"report.py: error: {' '.join(str(e).split())}\n")
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
    if args.runs and not _experiment(frame, "rank_ablation").empty:
        table = adapter_table(frame, args.runs, _minilm_kernels())
        if table.rows:
            print("\n" + to_markdown(table))
            if args.out:
                with open(Path(args.out) / "tables.md", "a") as f:
                    f.write("\n" + to_markdown(table) + "\n")
                with open(Path(args.out) / "tables.tex", "a") as f:
                    f.write("\n" + to_latex(table, "tab:adapters") + "\n")
    return 0


def _minilm_kernels() -> dict:
    """The query and value kernels of the real MiniLM, by path (as the runs name them)."""
    from configs import tasks
    from lowrank import paths

    _, params = tasks._bert_base("minilm", 5, (0, 0, 0, 0))
    return {p: np.asarray(v) for p, v in paths.flatten(params).items()
            if p.endswith(("query/kernel", "value/kernel"))}


if __name__ == "__main__":
    sys.exit(main())
