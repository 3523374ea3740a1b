"""Markdown tables of ``minilm_step``'s variant runs (JSON ``"format": 2``), never typed by hand.

Per run: the machine line (CPU, ISA flags, XLA_FLAGS, load), ours / peer per cell
(configuration x dropout x dtype) for each of our paths, and the PRNG and XLA-flag A/Bs.
Over several runs: the median, min and max of every ratio.

    >>> run = json.loads(Path("peers_variants_run1.json").read_text())  # doctest: +SKIP
    >>> print(run_tables(run))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from benchmarks.peers.variants import Variant


def _cell(v: Variant) -> str:
    return f"{v.config} | {'on' if v.dropout else 'off'} | {v.dtype}"


def machine_line(d: Mapping) -> str:
    """One line: the CPU, its ISA flags, XLA_FLAGS, the load before and after, the code."""
    m = d["meta"]
    cpu = m["cpu"]
    return (f"{cpu['model']}, {cpu['cpus']} CPUs ({' '.join(cpu['flags']) or 'no avx512/amx'}); "
            f"XLA_FLAGS={m['xla_flags_env']!r}; load average {m['load_before']} before, "
            f"{m['load_after']} after; lowrank at {m.get('commit')}; jax "
            f"{m['ours'].get('jax')}, torch {m['peer'].get('torch')}; {m['rounds']} rounds x "
            f"{m['reps']} steps")


def versus_peer_table(d: Mapping) -> str:
    """ours / peer per cell, one column pair per path of ours at the baseline PRNG and flags."""
    base = d["meta"]["baseline"]
    rows: dict[str, dict] = {}
    paths: list[str] = []
    for r in d["ratios"]:
        num, den = Variant.parse(r["num"]), Variant.parse(r["den"])
        if r["kind"] != "ours/peer" or (num.prng, num.xla) != (base["prng"], base["xla"]):
            continue
        row = rows.setdefault(_cell(num), {"peer": d["variants"][den.name]})
        row[num.path] = (d["variants"][num.name], r)
        if num.path not in paths:
            paths.append(num.path)
    head = "| configuration | dropout | dtype | peer (ms) | " + " | ".join(
        f"ours {p} (ms) | {p} / peer | {p} memory / peer" for p in paths) + " |"
    lines = [head, "|---|---|---|--:|" + "--:|--:|--:|" * len(paths)]
    for cell, row in rows.items():
        cols = []
        for p in paths:
            if p in row:
                rec, r = row[p]
                cols.append(f"{rec['median_ms']:.0f} | **{r['ratio']:.2f}** | "
                            f"{r['memory_ratio']:.2f}")
            else:
                cols.append(" | | ")
        lines.append(f"| {cell} | {row['peer']['median_ms']:.0f} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _same(a: Mapping, b: Mapping) -> str:
    """Whether two of our workers compiled the same optimized HLO (an XLA flag that changes
    nothing in it can only change how the same program runs)."""
    if "hlo_sha256" not in a or "hlo_sha256" not in b:
        return "?"
    return "yes" if a["hlo_sha256"] == b["hlo_sha256"] else "no"


def ab_table(d: Mapping) -> str:
    """The ours-only A/Bs: each PRNG or XLA-flag variant against ours at the baseline."""
    lines = ["| A/B | configuration | dropout | dtype | path | variant | baseline (ms) "
             "| variant (ms) | variant / baseline | same program | XLA custom ops (variant) |",
             "|---|---|---|---|---|---|--:|--:|--:|---|---|"]
    for r in d["ratios"]:
        if r["kind"] == "ours/peer":
            continue
        num = Variant.parse(r["num"])
        n, b = d["variants"][r["num"]], d["variants"][r["den"]]
        label = num.prng if r["kind"] == "prng" else num.xla
        kinds = ", ".join(f"{k} x{c}" for k, c in n.get("xla_kinds", {}).items())
        lines.append(f"| {r['kind']} | {_cell(num)} | {num.path} | {label} | "
                     f"{b['median_ms']:.0f} | {n['median_ms']:.0f} | **{r['ratio']:.2f}** | "
                     f"{_same(n, b)} | {kinds} |")
    return "\n".join(lines)


def run_tables(d: Mapping) -> str:
    """Everything about one run, as Markdown."""
    parts = [machine_line(d), "", versus_peer_table(d), "", ab_table(d)]
    for name, error in d.get("failed", {}).items():
        parts.append(f"\nFAILED to start: {name}: {error.splitlines()[-1] if error else ''}")
    warned = {w for v in d["variants"].values() for w in v.get("flag_warnings", [])}
    parts += [f"\nXLA warning: {w}" for w in sorted(warned)]
    return "\n".join(parts)


def ratio_label(r: Mapping, baseline: Mapping) -> str:
    """A ratio's row name across runs (``baseline``: the run's baseline PRNG and flags).

    >>> ratio_label({"kind": "prng", "num": "ours:full:dropout:float32:step:hash:none",
    ...              "den": "ours:full:dropout:float32:step:threefry:none"},
    ...             {"prng": "threefry", "xla": "none"})
    'full | on | float32 | step hash / threefry'
    """
    num, den = Variant.parse(r["num"]), Variant.parse(r["den"])
    if r["kind"] == "ours/peer":
        at_base = (num.prng, num.xla) == (baseline["prng"], baseline["xla"])
        what = f"ours {num.path}" + ("" if at_base else f" ({num.prng}, {num.xla})") + " / peer"
    elif r["kind"] == "prng":
        what = f"{num.path} {num.prng} / {den.prng}"
    else:
        what = f"{num.path} {num.xla} / {den.xla}"
    return f"{_cell(num)} | {what}"


def cross_run_table(runs: Mapping[str, Mapping]) -> str:
    """Every ratio over runs: its median, min and max, and in how many runs it was measured."""
    values: dict[str, list[float]] = {}
    for d in runs.values():
        for r in d["ratios"]:
            values.setdefault(ratio_label(r, d["meta"]["baseline"]), []).append(r["ratio"])
    lines = [f"Over {len(runs)} runs ({', '.join(runs)}):", "",
             "| configuration | dropout | dtype | ratio | runs | median | min | max |",
             "|---|---|---|---|--:|--:|--:|--:|"]
    for label, v in sorted(values.items()):  # a cell's ratios together
        lines.append(f"| {label} | {len(v)} | **{float(np.median(v)):.2f}** | {min(v):.2f} | "
                     f"{max(v):.2f} |")
    return "\n".join(lines)
