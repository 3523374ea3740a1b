"""Paper-style tables and figures from the results database (never typed by hand).

    python experiments/report.py --db=workdir/results.sqlite --runs=workdir/runs \\
        --out=experiments/results --readme=experiments/results/README.md --readme=README.md

Prints the Markdown tables of every experiment in the database that has a table family
(``rank_ablation``, ``quant_ablation``, ``lm_domain``, ``quant_perplexity``,
``method_ablation``, with any ``:variant``) and lists the
experiments that have none; with ``--out`` writes ``tables.md``, ``tables.tex`` (booktabs),
``runs.csv`` (every run, failed ones included), ``accuracy_vs_rank*.png`` and, when ``--runs``
holds the exported adapters, ``subspace_similarity.png``; each ``--readme`` gets its summary
block rewritten (``report_summary``). ``--db`` may also be a CSV export.

Tables (``report_tables``): targets x scale x rank of test accuracy with paired differences
from the largest rank (the LoRA paper's Tables 5 and 6), the baselines in their own table,
data type x (bits per parameter, weight RMSE, accuracy, paired difference from float32)
(QLoRA's data-type comparison), method x cost, the LM study, and LoRA's variants against the
baselines (``report_variants``). Where a sweep tuned the
learning rate, each setting's rows at the rate chosen on validation are the ones reported
(``lowrank.tuning``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "experiments"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import pandas as pd  # noqa: E402
from report_cells import (  # noqa: E402, F401
    ADAPT_NAMES,
    BASELINE_NAMES,
    DATA_TYPES,
    Table,
    data_type,
    experiment_runs,
    kind_of,
    mean_std,
    to_latex,
    to_markdown,
)
from report_figures import (  # noqa: E402, F401  (re-exported: notebooks use report.X)
    adapter_table,
    minilm_kernels,
    plot_accuracy_vs_rank,
    plot_subspace_similarity,
    subspace_pairs,
)
from report_summary import summary_lines, update_readme  # noqa: E402
from report_tables import (  # noqa: E402, F401
    baseline_table,
    lm_table,
    method_table,
    perplexity_table,
    quant_table,
    rank_table,
)
from report_variants import variant_table  # noqa: E402

from lowrank import results, tuning  # noqa: E402


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


def _label(prefix: str, name: str) -> str:
    variant = name.partition(":")[2]
    return f"tab:{prefix}" + (f"-{variant}" if variant else "")


def report(frame: pd.DataFrame) -> list[tuple[str, Table]]:
    """The tables of every experiment in ``frame`` whose name has a table family, each with a
    LaTeX label; empty ones left out. Each experiment's rows go through
    :func:`lowrank.tuning.tuned` first (its settings at the learning rates chosen on
    validation, when it tuned any)."""
    tables: list[tuple[str, Table]] = []
    if frame.empty or "experiment" not in frame:
        return tables
    costs = []
    for name in sorted(frame["experiment"].dropna().unique()):
        runs = tuning.tuned(experiment_runs(frame, name))
        kind = kind_of(name)
        if kind == "rank_ablation":
            tables += [(_label("rank", name), rank_table(runs, name)),
                       (_label("baselines", name), baseline_table(runs, name))]
            costs.append(name)
        elif kind == "quant_ablation":
            tables.append((_label("quant", name), quant_table(runs, name)))
            costs.append(name)
        elif kind == "lm_domain":
            tables.append((_label("lm", name), lm_table(runs, name)))
        elif kind == "quant_perplexity":
            tables.append((_label("perplexity", name), perplexity_table(runs, name)))
        elif kind == "method_ablation":
            tables.append((_label("variants", name), variant_table(runs, name)))
    if costs:
        tuned = pd.concat([tuning.tuned(experiment_runs(frame, n)) for n in costs])
        tables.append(("tab:method", method_table(tuned, experiments=costs)))
    return [(label, t) for label, t in tables if t.rows]


def untabled(frame: pd.DataFrame) -> dict[str, int]:
    """``{experiment: finished runs}`` of the experiments no table family covers."""
    if frame.empty or "experiment" not in frame:
        return {}
    known = ("rank_ablation", "quant_ablation", "lm_domain", "quant_perplexity",
             "method_ablation")
    counts = frame.groupby(frame["experiment"].fillna("(none)")).size()
    return {name: int(n) for name, n in counts.items() if kind_of(name) not in known}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", action="append", default=[],
                        help="results database (.sqlite) or a CSV export (.csv); repeatable: "
                        "the rows of all of them (default: workdir/results.sqlite)")
    parser.add_argument("--runs", default=None,
                        help="the sweeps' --workdir, for the exported adapters (heatmaps)")
    parser.add_argument("--out", default=None,
                        help="folder for tables.md, tables.tex, runs.csv and the figures")
    parser.add_argument("--readme", action="append", default=[],
                        help="a Markdown file whose summary block is rewritten (repeatable)")
    args = parser.parse_args(argv)
    args.db = args.db or [str(ROOT / "workdir" / "results.sqlite")]
    for path in args.db:
        if not str(path).endswith(".csv") and not Path(path).is_file():
            parser.error(f"--db {path!r} does not exist")
    try:
        frame = pd.concat([load_runs(path) for path in args.db], ignore_index=True)
    except (OSError, ValueError, pd.errors.ParserError, results.ResultsDBError) as e:
        parser.exit(1, f"report.py: error: {' '.join(str(e).split())}\n")
    frame, dropped = results.drop_duplicate_runs(frame)
    if dropped:  # one run in two sources (a database and its CSV export) counts once
        print(f"report.py: warning: {len(dropped)} finished row(s) repeat a run of an earlier "
              f"--db: left out", file=sys.stderr)
    tables = report(frame)
    markdown = "\n\n".join(to_markdown(t) for _, t in tables)
    if tables:
        print(markdown)
    elif frame.empty:
        print(f"no finished runs in {', '.join(args.db)}")
    others = untabled(frame)
    if others:
        listing = ", ".join(f"{name!r} ({n} runs)" for name, n in sorted(others.items()))
        print(f"\nno table family for experiments {listing}: tables are made for experiments "
              "named rank_ablation, quant_ablation, lm_domain, quant_perplexity or "
              "method_ablation (with any ':variant'); "
              "file runs under one with --experiment")
    if args.out:
        _write_outputs(Path(args.out), frame, tables, markdown, args)
    for name in rank_experiments(frame) if args.runs else []:
        adapters = adapter_table(tuning.tuned(experiment_runs(frame, name)), args.runs,
                                 minilm_kernels(), experiment=name)
        if adapters.rows:
            print("\n" + to_markdown(adapters))
        if adapters.rows and args.out:
            with open(Path(args.out) / "tables.md", "a") as f:
                f.write("\n" + to_markdown(adapters) + "\n")
            with open(Path(args.out) / "tables.tex", "a") as f:
                f.write("\n" + to_latex(adapters, _label("adapters", name)) + "\n")
    lines = summary_lines(frame)
    for readme in args.readme:
        try:
            update_readme(readme, lines)
        except (OSError, ValueError) as e:
            parser.exit(1, f"report.py: error: {e}\n")
    return 0


def _write_outputs(out: Path, frame: pd.DataFrame, tables, markdown: str, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(markdown + "\n")
    (out / "tables.tex").write_text(
        "% generated by experiments/report.py; needs \\usepackage{booktabs}\n"
        + "\n\n".join(to_latex(t, label) for label, t in tables) + "\n")
    every = [pd.read_csv(path) if str(path).endswith(".csv") else results.read_runs([path], None)
             for path in args.db]
    runs_csv = results.drop_duplicate_runs(pd.concat(every, ignore_index=True))[0]
    if (out / "runs.csv").resolve() in {Path(p).resolve() for p in args.db}:
        tmp = out / "runs.csv.tmp"  # it is read above: replace it whole, never half-written
        runs_csv.to_csv(tmp, index=False)
        tmp.replace(out / "runs.csv")
    else:
        runs_csv.to_csv(out / "runs.csv", index=False)
    for name in rank_experiments(frame):
        variant = name.partition(":")[2]
        suffix = "_" + variant if variant else ""
        runs = tuning.tuned(experiment_runs(frame, name))
        plot_accuracy_vs_rank(runs, out / f"accuracy_vs_rank{suffix}.png", experiment=name)
        if args.runs:
            plot_subspace_similarity(subspace_pairs(runs, args.runs, experiment=name),
                                     out / f"subspace_similarity{suffix}.png")


def rank_experiments(frame: pd.DataFrame) -> list[str]:
    """The names of the rank-ablation experiments in ``frame`` (any ``:variant``)."""
    if frame.empty or "experiment" not in frame:
        return []
    return [name for name in sorted(frame["experiment"].dropna().unique())
            if kind_of(name) == "rank_ablation"]


if __name__ == "__main__":
    sys.exit(main())
