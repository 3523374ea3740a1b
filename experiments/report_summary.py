"""The findings the READMEs quote, generated from the rows (so prose and tables cannot drift).

``report.py --readme=FILE`` rewrites the block between :data:`START` and :data:`END` in each
FILE with :func:`summary_lines`; a test checks that the committed READMEs hold exactly what
the committed ``runs.csv`` gives. A difference is called "within noise" whenever its 95%
paired-bootstrap interval over the test examples contains 0, and "untested" when the rows
stored no per-example predictions.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from report_cells import (
    ADAPT_NAMES,
    BASELINE_NAMES,
    DATA_TYPES,
    EDGE_MARKS,
    data_type,
    interval,
    kind_of,
    paired,
    paired_loss,
    rate_cell,
    signed,
)
from report_tables import (
    lm_methods,
    rank_rows,
)
from report_variants import last_point_note, variant_lines

from lowrank import stats, tuning

PAPER_ORDER = ("nf4", "fp4", "int4")  # QLoRA Table 2: NF4 best, then FP4, Int4 worst
START = "<!-- report.py summary: start (generated from the rows; do not edit by hand) -->"
END = "<!-- report.py summary: end -->"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _verdict(d: stats.PairedDifference | None, a: float, b: float) -> str:
    """``"+1.2 points [-0.4, +2.9]: within noise"`` or ``"... beyond noise"``; without a
    paired test just the difference of the means, "untested"."""
    if d is None:
        return f"{signed(100 * (a - b), 1)} points (untested)"
    if d.low == d.high == 0:  # the bootstrap cannot vary what does not differ
        return "+0.0 points: the same seed-averaged correctness on every test example"
    where = "beyond noise" if d.excludes_zero else "within noise"
    return f"{interval(d, 100, 1, ' points')}: {where}"


def _protocol(runs: pd.DataFrame) -> str:
    selected = "metric.best_step" in runs and runs["metric.best_step"].notna().any()
    tuned = "grid_size" in runs and (runs["grid_size"] > 1).any()
    if selected and tuned:
        return "test accuracy at the best validation epoch, learning rates tuned on validation"
    steps = f"{int(runs['config.steps'].iloc[0])} steps" if "config.steps" in runs else "runs"
    return (f"{steps} at fixed learning rates, evaluated once at the end: not the "
            "results protocol (no validation selection, no tuning)")


def rank_lines(runs: pd.DataFrame, name: str) -> list[str]:
    groups = rank_rows(runs)
    if not groups:
        return []
    seeds = sorted(int(s) for s in runs["seed"].unique())
    lines = [f"**{name}** ({len(seeds)} seed{'s' * (len(seeds) != 1)}; {_protocol(runs)}):"]
    exceptions, spans, tested = [], [], 0
    for (adapt, scale), group in groups.items():
        means = group.groupby("config.lora.rank")["metric.accuracy"].mean()
        top_rank = int(means.index.max())
        top = group[group["config.lora.rank"] == top_rank]
        spans.append((100 * (means.max() - means.min()), f"{ADAPT_NAMES[adapt]}, {scale}"))
        for rank in means.index:
            if int(rank) == top_rank:
                continue
            d = paired(group[group["config.lora.rank"] == rank], top)
            if d is not None:
                tested += 1
                if d.excludes_zero:
                    exceptions.append(f"{ADAPT_NAMES[adapt]} ({scale}) r={int(rank)}: "
                                      f"{_verdict(d, 0, 0)}")
    widest = max(spans)
    if tested:
        lines.append(f"- Small ranks: {tested - len(exceptions)} of {tested} cells are within "
                     "noise of the largest rank of their row" + (
                         "; beyond noise: " + "; ".join(exceptions) if exceptions else "."))
    lines.append(f"- Within each row the ranks' mean accuracies span at most {widest[0]:.1f} "
                 f"points ({widest[1]}).")
    lines += _tune_rank_line(runs, groups)
    lines += _more_types_line(groups)
    lines += _convention_line(groups)
    lines += _baseline_line(runs, groups)
    lines += _rate_line(runs, groups)
    return lines


def _tune_rank_line(runs: pd.DataFrame, groups: dict) -> list[str]:
    """Each other rank against the rank every row's rate was tuned at (``sweep.tune_rank``),
    paired: the rate is that rank's best, so a gap there is the rank's."""
    tune_rank = runs.get(tuning.TUNE_RANK, pd.Series([], dtype=float)).dropna()
    if tune_rank.empty:
        return []
    at = int(tune_rank.iloc[0])
    parts = []
    for (adapt, scale), group in groups.items():
        ref = group[group["config.lora.rank"] == at]
        if ref.empty:
            continue
        cells = []
        for rank in sorted(set(group["config.lora.rank"]) - {at}):
            sel = group[group["config.lora.rank"] == rank]
            verdict = _verdict(paired(sel, ref), sel["metric.accuracy"].mean(),
                               ref["metric.accuracy"].mean())
            cells.append(f"r={int(rank)} {verdict}")
        if cells:
            parts.append(f"{ADAPT_NAMES[adapt]} ({scale}): " + "; ".join(cells))
    if not parts:
        return []
    return [f"- Against r={at}, where each row's rate was tuned: " + ". ".join(parts) + "."]


def _more_types_line(groups: dict) -> list[str]:
    """Adapting every linear layer at the smallest rank against the fewest weight types (W_q
    if adapted, else the first set of ``ADAPT_NAMES`` there is) at the largest, per scale."""
    lines = []
    for (adapt, scale), group in groups.items():
        fewest = next((a for a in ADAPT_NAMES if a != "all" and (a, scale) in groups), None)
        if adapt != "all" or fewest is None:
            continue
        few = groups[(fewest, scale)]
        low = group[group["config.lora.rank"] == group["config.lora.rank"].min()]
        high = few[few["config.lora.rank"] == few["config.lora.rank"].max()]
        a, b = low["metric.accuracy"].mean(), high["metric.accuracy"].mean()
        lines.append(f"- More weight types vs a higher rank ({scale}): all linear layers at "
                     f"r={int(low['config.lora.rank'].iloc[0])} ({_pct(a)}) vs "
                     f"{ADAPT_NAMES[fewest]}{'' if ',' in ADAPT_NAMES[fewest] else ' alone'} "
                     f"at r={int(high['config.lora.rank'].iloc[0])} "
                     f"({_pct(b)}): {_verdict(paired(low, high), a, b)}.")
    return lines


def _convention_line(groups: dict) -> list[str]:
    """rsLoRA against the constant scale, rank by rank, for each target set run under both
    (same rate: rsLoRA's scale is 4x the constant's at r=1, 1/2 at r=64)."""
    scales = {}
    for adapt, scale in groups:
        scales.setdefault(adapt, []).append(scale)
    parts = []
    for adapt, names in scales.items():
        if len(names) != 2:
            continue
        constant, rslora = (groups[(adapt, name)] for name in names)
        cells = []
        for rank in sorted(set(constant["config.lora.rank"]) & set(rslora["config.lora.rank"])):
            a = rslora[rslora["config.lora.rank"] == rank]
            b = constant[constant["config.lora.rank"] == rank]
            verdict = _verdict(paired(a, b), a["metric.accuracy"].mean(),
                               b["metric.accuracy"].mean())
            cells.append(f"r={int(rank)} {verdict}")
        parts.append(f"{ADAPT_NAMES[adapt]}: " + "; ".join(cells))
    if not parts:
        return []
    return ["- The second scale convention minus the first at the same rank and rate "
            f"({' minus '.join(reversed(next(n for n in scales.values() if len(n) == 2)))}): "
            + ". ".join(parts) + "."]


def _rate_line(runs: pd.DataFrame, groups: dict) -> list[str]:
    """The rates the rank rows chose, at the rank they were tuned at."""
    tune_rank = runs.get(tuning.TUNE_RANK, pd.Series([], dtype=float)).dropna()
    where = (f" at r={int(tune_rank.iloc[0])}, each row's ranks training at its rate"
             if not tune_rank.empty else "")
    labelled = {f"{ADAPT_NAMES[adapt]} ({scale})": group
                for (adapt, scale), group in groups.items()}
    return chosen_rates_line(runs, labelled, where)


def chosen_rates_line(runs: pd.DataFrame, groups: dict[str, pd.DataFrame],
                      where: str = "") -> list[str]:
    """The rate each labelled group of tuned rows chose, the grid edges among them, and the runs
    still improving at their last evaluation; nothing for rows that were not tuned.

    >>> rows = pd.DataFrame({"grid_size": [3], "config.optimizer.learning_rate": [1e-3],
    ...                      "grid_edge": [""], "metric.best_step": [10], "config.steps": [20],
    ...                      "config.method": ["lora"]})
    >>> chosen_rates_line(rows, {"nf4": rows})[0].split(";")[0]
    '- Learning rates chosen on validation: nf4 0.001'
    """
    if "grid_size" not in runs or not (runs["grid_size"] > 1).any():
        return []
    parts, edges = [], []
    for label, group in groups.items():
        rate = rate_cell(group)
        parts.append(f"{label} {rate}")
        if any(mark in rate for mark in EDGE_MARKS.values()):
            edges.append(label)
    edge = (f"; at its grid's edge (the best rate may lie beyond): {', '.join(edges)}"
            if edges else "; none at its grid's edge")
    return [f"- Learning rates chosen on validation{where}: {'; '.join(parts)}{edge}."
            + last_point_note(runs)]


def _baseline_line(runs: pd.DataFrame, groups: dict) -> list[str]:
    best_cell, best = None, -math.inf
    for (adapt, scale), group in groups.items():
        for rank, sel in group.groupby("config.lora.rank"):
            if sel["metric.accuracy"].mean() > best:
                best, best_cell = sel["metric.accuracy"].mean(), (adapt, scale, rank, sel)
    parts = []
    for method, label in BASELINE_NAMES.items():
        sel = runs[runs["config.method"] == method]
        if sel.empty or best_cell is None:
            continue
        a = sel["metric.accuracy"].mean()
        parts.append(f"{label} {_pct(a)} ({_verdict(paired(sel, best_cell[3]), a, best)} "
                     "against the best LoRA cell)")
    if not parts:
        return []
    adapt, scale, rank, _ = best_cell
    return ["- Baselines: " + "; ".join(parts) + f". Best LoRA cell: {ADAPT_NAMES[adapt]}, "
            f"{scale}, r={int(rank)}, {_pct(best)}."]


def quant_lines(runs: pd.DataFrame, name: str) -> list[str]:
    names = runs.apply(data_type, axis=1)
    present = [d for d in DATA_TYPES if d in set(names)]
    if not present:
        return []
    seeds = sorted(int(s) for s in runs["seed"].unique())
    lines = [f"**{name}** ({len(seeds)} seed{'s' * (len(seeds) != 1)}; {_protocol(runs)}):"]
    rmse = {d: runs[names == d]["metric.weight_rmse"].astype(float).mean() for d in present}
    four_bit = sorted((d for d in PAPER_ORDER if d in rmse), key=rmse.get)
    if len(four_bit) > 1:
        order = " < ".join(f"{d} ({rmse[d]:.2e})" for d in four_bit)
        paper = [d for d in PAPER_ORDER if d in four_bit]
        note = "" if four_bit == paper else (
            f"; not the order of QLoRA's Table 2 ({' < '.join(paper)}), which ranks the "
            "types by the perplexity of the quantized model, not by weight RMSE")
        lines.append(f"- Weight RMSE of the 4-bit types (no seed noise): {order}{note}.")
    if "float32" in present:
        ref = runs[names == "float32"]
        a_ref = ref["metric.accuracy"].mean()
        parts = [f"{d} {_verdict(paired(runs[names == d], ref), runs[names == d]['metric.accuracy'].mean(), a_ref)}"  # noqa: E501
                 for d in present if d != "float32"]
        lines.append(f"- Accuracy against the float32 base ({_pct(a_ref)}): "
                     + "; ".join(parts) + ".")
    return lines + chosen_rates_line(runs, {d: runs[names == d] for d in present})


def _loss_verdict(d: stats.PairedDifference) -> str:
    where = "beyond noise" if d.excludes_zero else "within noise"
    return f"{interval(d)} ({where})"


def lm_lines(runs: pd.DataFrame, name: str) -> list[str]:
    names, methods = runs.apply(data_type, axis=1), lm_methods(runs)
    lora = methods == "lora"
    parts = [f"{d} {runs[lora & (names == d)]['metric.perplexity'].mean():.2f}"
             for d in DATA_TYPES if d in set(names[lora])]
    if not parts:
        return []
    if "metric.best_step" in runs and runs["metric.best_step"].notna().any():
        return _lm_protocol_lines(runs, name, names, methods)
    line = (f"**{name}**: held-out English perplexity after LoRA, by base data type: "
            + ", ".join(parts) + " (mean over seeds)")
    for method, label in (("none", "the base not adapted"), ("full", "full fine-tuning")):
        if (methods == method).any():
            line += f"; {label}: {runs[methods == method]['metric.perplexity'].mean():.2f}"
    return [line + "."]


def _lm_protocol_lines(runs: pd.DataFrame, name: str, names: pd.Series,
                       methods: pd.Series) -> list[str]:
    """QLoRA's Tables 2 and 3 on the LM task: each data type against float32 before
    adaptation (method "none") and after LoRA, paired over the test windows."""
    seeds = sorted(int(s) for s in runs["seed"].unique())
    protocol = _protocol(runs).replace("accuracy at the best validation epoch",
                                       "perplexity at the best validation point")
    lines = [f"**{name}** ({len(seeds)} seeds; {protocol}; loss minus the float32 base's "
             "under the same method, nats per token, 95% paired bootstrap over the test "
             "windows):"]
    for method, label in (("none", "Before adaptation (the base as stored, QLoRA's Table 2 on "
                                   "the target domain)"),
                          ("lora", "After LoRA (Table 3)")):
        sel, sel_names = runs[methods == method], names[methods == method]
        if "float32" not in set(sel_names):
            continue
        reference = sel[sel_names == "float32"]
        ppl = {d: sel[sel_names == d]["metric.perplexity"].mean() for d in DATA_TYPES
               if d in set(sel_names)}
        tests = [f"{d} {ppl[d]:.3f}, {_loss_verdict(diff)}" for d in ppl if d != "float32"
                 and (diff := paired_loss(sel[sel_names == d], reference)) is not None]
        four_bit = sorted((d for d in PAPER_ORDER if d in ppl), key=ppl.get)
        paper = [d for d in PAPER_ORDER if d in four_bit]
        order = (" < ".join(four_bit) + (" (the order of QLoRA's Table 2)" if four_bit == paper
                                         else f" (QLoRA's Table 2: {' < '.join(paper)})")
                 if len(four_bit) > 1 else "")
        lines.append(f"- {label}: float32 perplexity {ppl['float32']:.3f}; "
                     + "; ".join(tests) + (f". 4-bit types by perplexity: {order}" if order
                                           else "") + ".")
    full = runs[methods == "full"]
    reference = runs[(methods == "lora") & (names == "float32")]
    if not full.empty and (diff := paired_loss(full, reference)) is not None:
        lines.append(f"- Full fine-tuning of the float32 base: perplexity "
                     f"{full['metric.perplexity'].mean():.3f}, against LoRA over float32 "
                     f"{_loss_verdict(diff)}.")
    groups = {f"LoRA over {d}": runs[(methods == "lora") & (names == d)] for d in DATA_TYPES
              if ((methods == "lora") & (names == d)).any()}
    if not full.empty:
        groups["full fine-tuning"] = full
    return lines + chosen_rates_line(runs, groups)


def perplexity_lines(runs: pd.DataFrame, name: str) -> list[str]:
    names = runs.apply(data_type, axis=1)
    if "config.quant.block_size" not in runs or "float32" not in set(names):
        return []
    base = runs[names == "float32"]["metric.perplexity"].mean()
    smallest = runs[names != "float32"]["config.quant.block_size"].min()
    at = runs[(names == "float32") | (runs["config.quant.block_size"] == smallest)]
    at_names = at.apply(data_type, axis=1)
    ppl = {d: at[at_names == d]["metric.perplexity"].mean() for d in DATA_TYPES
           if d in set(at_names)}
    four_bit = sorted((d for d in PAPER_ORDER if d in ppl), key=ppl.get)
    paper = [d for d in PAPER_ORDER if d in four_bit]
    order = " < ".join(f"{d} {ppl[d]:.3f}" for d in four_bit)
    agrees = ("" if len(four_bit) < 2 else ": the order of QLoRA's Table 2" if four_bit == paper
              else f": not the order of QLoRA's Table 2 ({' < '.join(paper)})")
    reference = runs[names == "float32"]
    tests = []
    for d in four_bit:
        diff = paired_loss(at[at_names == d], reference)
        if diff is not None:
            where = "beyond noise" if diff.excludes_zero else "within noise"
            tests.append(f"{d} {interval(diff)} ({where})")
    line = (f"**{name}** (the base as stored, nothing trained; deterministic): float32 "
            f"perplexity {base:.3f}; at blocks of {int(smallest)} the 4-bit types give "
            f"{order}{agrees}")
    if tests:
        line += ("; loss minus float32's, nats per token, 95% paired bootstrap over windows: "
                 + "; ".join(tests))
    return [line + "."]


BUILDERS = {"rank_ablation": rank_lines, "quant_ablation": quant_lines, "lm_domain": lm_lines,
            "quant_perplexity": perplexity_lines, "method_ablation": variant_lines}


def summary_lines(frame: pd.DataFrame) -> list[str]:
    """The findings of every experiment in ``frame`` with a summary, as Markdown lines."""
    lines: list[str] = []
    if frame.empty or "experiment" not in frame:
        return lines
    for name in sorted(frame["experiment"].dropna().unique()):
        builder = BUILDERS.get(kind_of(name))
        if builder is None:
            continue
        block = builder(tuning.tuned(frame[frame["experiment"] == name]), name)
        if block:
            lines += [*block, ""]
    if any("(untested)" in line for line in lines):
        lines.append("\"(untested)\": those rows stored no per-example predictions, so no paired "
                     "test is possible; \"within noise\" means a 95% paired-bootstrap interval "
                     "over the test examples that contains 0.")
    return lines[:-1] if lines and not lines[-1] else lines


def block(lines: list[str]) -> str:
    """The README block: the markers around ``lines``."""
    return "\n".join([START, *lines, END])


def update_readme(path: str | Path, lines: list[str]) -> None:
    """Replaces the block between the markers in ``path`` (which must hold both)."""
    path = Path(path)
    text = path.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{path} has no report.py summary block: put the two lines\n{START}\n"
                         f"{END}\nwhere the summary should go")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + block(lines) + tail)


def readme_block(path: str | Path) -> str:
    """The block currently in ``path`` (markers included)."""
    text = Path(path).read_text()
    return START + text.split(START, 1)[1].split(END, 1)[0] + END
