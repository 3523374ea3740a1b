"""Markdown tables of the issue-10 benchmarks, generated from their JSON (never typed by hand).

The peers' runs come in two formats: issue 10's (``peers_minilm_run*.json``: dropout off,
float32, one table per configuration) and the variant runs of issue 19
(``peers_variants_run*.json``, ``"format": 2``: tables by ``report_matrix``, and a cross-run
median table when there are several).

    .venv/bin/python -m benchmarks.peers.report                       # all that exist
    .venv/bin/python -m benchmarks.peers.report --peers /tmp/a.json /tmp/b.json
    .venv/bin/python -m benchmarks.peers.report --gpu OUTDIR/gpu_bench.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.peers import report_matrix

FIGURES = Path(__file__).resolve().parents[1] / "figures"


def peers_table(d: dict) -> str:
    lines = [
        "| configuration | ours (ms) | peer (ms) | ours / peer | ours peak (MB) | peer peak (MB) "
        "| ours / peer | ours above import (MB) | peer above import (MB) | trainable |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c, r in d["rows"].items():
        o, p = r["ours"], r["peer"]
        lines.append(
            f"| {c} | {o['median_ms']:.0f} | {p['median_ms']:.0f} | **{r['time_ratio']:.2f}** "
            f"| {o['peak_rss_mb']:.0f} | {p['peak_rss_mb']:.0f} "
            f"| {o['peak_rss_mb'] / p['peak_rss_mb']:.2f} | {o['peak_above_baseline_mb']:.0f} "
            f"| {p['peak_above_baseline_mb']:.0f} | {o['trainable_params']:,} |")
    lines.append("")
    lines.append("| within one framework (median of per-round ratios) | ratio |")
    lines.append("|---|--:|")
    for k, v in d["within"].items():
        lines.append(f"| {k} | {v:.2f} |")
    lines.append("")
    lines.append("| ours, XLA accounting (MiB) | arguments | temporaries | peak |")
    lines.append("|---|--:|--:|--:|")
    for c, r in d["rows"].items():
        x = r["ours"].get("xla_mb", {})
        if x:
            lines.append(f"| {c} | {x['argument']:.0f} | {x['temp']:.0f} | {x['peak']:.0f} |")
    return "\n".join(lines)


def peers_runs_table(runs: dict[str, dict]) -> str:
    """One row per run: the load it ran under and its ours / peer time ratios."""
    configs = list(next(iter(runs.values()))["rows"])
    lines = ["| run | lowrank at | rounds | load average (1 min) before, after | "
             + " | ".join(configs) + " | ours QLoRA / LoRA | ours LoRA / full |",
             "|---|---|--:|---|" + "--:|" * (len(configs) + 2)]
    for name, d in runs.items():
        m, w = d["meta"], d["within"]
        ratios = " | ".join(f"{d['rows'][c]['time_ratio']:.2f}" for c in configs)
        lines.append(f"| {name} | {m.get('commit') or 'see text'} | {m['rounds']} | "
                     f"{m['load_before'][0]}, {m['load_after'][0]} | {ratios} | "
                     f"{w.get('ours qlora_all / lora_all', float('nan')):.2f} | "
                     f"{w.get('ours lora_all / full', float('nan')):.2f} |")
    return "\n".join(lines)


def scaling_table(d: dict) -> str:
    lines = [
        "| sweep | params | mode | rank | median step (ms) | model GFLOP/s | peak (MiB) "
        "| temporaries (MiB) | QLoRA expected peak (MiB) | paired ratio |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for sweep in ("by_size", "by_rank"):
        for r in d[sweep]:
            ratio = ""
            if "paired_time_vs_lora" in r:
                ratio = f"QLoRA / LoRA {r['paired_time_vs_lora']:.2f}"
            elif "paired_time_vs_full" in r:
                ratio = f"LoRA / full {r['paired_time_vs_full']:.2f}"
            expected = f"{r['expected_peak'] / 2**20:.0f}" if "expected_peak" in r else ""
            lines.append(
                f"| {sweep[3:]} | {r['params'] / 1e6:.1f}M | {r['mode']} | "
                f"{r['rank'] if r['rank'] is not None else '-'} | {1e3 * r['median_s']:.0f} | "
                f"{r['gflops_per_s']:.1f} | {r['xla']['peak'] / 2**20:.0f} | "
                f"{r['xla']['temp'] / 2**20:.0f} | {expected} | {ratio} |")
    return "\n".join(lines)


def gpu_table(d: dict) -> str:
    lines = ["| part | step | median (ms) | peak (MiB) | temporaries (MiB) | TFLOP/s | MFU |",
             "|---|---|--:|--:|--:|--:|--:|"]
    ratios = []
    for part in ("bert", "llama"):
        for k, v in d.get(part, {}).items():
            if isinstance(v, dict) and "median_ms" in v:
                tf = f"{v['achieved_tflops_per_s']:.0f}" if "achieved_tflops_per_s" in v else ""
                mfu = f"{100 * v['mfu']:.1f}%" if "mfu" in v else ""
                lines.append(f"| {part} | {k} | {v['median_ms']:.2f} | "
                             f"{v['xla_mib'].get('peak', 0):.0f} | "
                             f"{v['xla_mib'].get('temp', 0):.0f} | {tf} | {mfu} |")
            elif " / " in k:
                ratios.append(f"{part} {k}: {v:.2f}")
    return "\n".join(lines) + "\n\n" + "; ".join(ratios)


def _run_number(path: Path) -> tuple[int, str]:
    """Sort key: ``..._run10`` after ``..._run9``.

    >>> sorted([Path("a_run10.json"), Path("a_run9.json")], key=_run_number)[0].name
    'a_run9.json'
    """
    digits = re.search(r"(\d+)$", path.stem)
    return (int(digits.group(1)) if digits else -1, path.stem)


def _old_peers_tables(runs: dict[str, dict]) -> str:
    return peers_runs_table(runs) + "\n\n" + peers_table(runs[list(runs)[-1]])


def _variant_tables(runs: dict[str, dict]) -> str:
    last = list(runs)[-1]
    parts = [f"{last}:", "", report_matrix.run_tables(runs[last])]
    if len(runs) > 1:
        parts += ["", report_matrix.cross_run_table(runs)]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", nargs="*", help="minilm_step JSONs (default: "
                        "figures/peers_minilm*.json and figures/peers_variants*.json); the "
                        "last one of each format gets the full table")
    parser.add_argument("--scaling", default=str(FIGURES / "scaling.json"))
    parser.add_argument("--gpu", default=str(FIGURES / "gpu_bench.json"))
    args = parser.parse_args()
    peers = args.peers or [str(p) for pattern in ("peers_minilm*.json", "peers_variants*.json")
                           for p in sorted(FIGURES.glob(pattern), key=_run_number)]
    loaded = {Path(p).stem: (p, json.loads(Path(p).read_text())) for p in peers}
    old = {k: d for k, (_, d) in loaded.items() if d.get("meta", {}).get("format", 1) == 1}
    new = {k: d for k, (_, d) in loaded.items() if k not in old}
    for runs, tables in ((old, _old_peers_tables), (new, _variant_tables)):
        if runs:
            print("<!-- generated from " + ", ".join(Path(loaded[k][0]).name for k in runs)
                  + " by benchmarks/peers/report.py -->")
            print(tables(runs))
            print()
    for path, table in ((args.scaling, scaling_table), (args.gpu, gpu_table)):
        if Path(path).is_file():
            print(f"<!-- generated from {Path(path).name} by benchmarks/peers/report.py -->")
            print(table(json.loads(Path(path).read_text())))
            print()


if __name__ == "__main__":
    main()
