"""How the cost of a training step grows with model size and with LoRA rank (lowrank, CPU).

Llama-style causal LMs with random weights (vocabulary 8192, untied head, SwiGLU, layers
scanned) from ~10M to ~300M parameters, trained on one batch of random tokens. For each model
size (LoRA rank 8) and for each rank at one size, LoRA and QLoRA (nf4, double quantization)
steps adapt every linear layer of the decoder layers; full fine-tuning is the reference up to
``--full-up-to`` parameters. The steps of one model are timed in alternation (rotating order
every round) and the figures are medians. Peak memory is XLA's accounting of the compiled
step: arguments (frozen tree, trainable tree, optimizer state, batch) + outputs not written
in place + temporaries (activations, and whatever the step keeps alive between its forward
and backward passes).

    .venv/bin/python -m benchmarks.scaling              # ~10 minutes on 2 loaded CPU cores
    .venv/bin/python -m benchmarks.scaling --tiny       # a smoke run of a few seconds

Writes ``benchmarks/figures/scaling.json`` and ``scaling.png`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

import lowrank as lr
from benchmarks.peers import lowrank_steps as ls
from benchmarks.peers.workers import git_commit

# name: (hidden, layers, heads, intermediate); vocabulary VOCAB.
SIZES = {
    "10M": (256, 8, 4, 688),
    "34M": (512, 8, 8, 1376),
    "98M": (768, 12, 12, 2048),
    "300M": (1024, 22, 16, 2816),
}
TINY_SIZES = {"tiny-a": (32, 2, 4, 64), "tiny-b": (64, 2, 4, 128)}
VOCAB, TINY_VOCAB = 8192, 256
RANKS = (1, 4, 16, 64, 256)
QLORA_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # nf4 codes + 8-bit block scales + their scales
FIGURES = Path(__file__).resolve().parent / "figures"


def measure(setup: ls.Llama, configs: list[tuple[str, int]], rounds: int,
            reps: int) -> list[dict]:
    """One row per ``(mode, rank)`` of one model, all of them timed in alternation."""
    quant = lr.QuantSpec("nf4", block_size=64, double_quant=True,
                         targets=ls.LLAMA_QUANT_TARGETS)
    steps, build_s = {}, {}
    for mode, rank in configs:
        spec = lr.LoraSpec(rank=rank, alpha=2 * rank, targets=ls.LLAMA_TARGETS)
        start = time.perf_counter()
        steps[mode, rank] = ls.make_step(
            setup.model, setup.params, setup.batch, ls.lm_forward, "lm", mode=mode,
            spec=None if mode == "full" else spec, quant=quant, layouts=setup.layouts)
        steps[mode, rank].run()  # warm-up
        build_s[mode, rank] = time.perf_counter() - start
    round_medians = {c: [] for c in configs}
    for r in range(rounds):
        for c in configs[r % len(configs):] + configs[: r % len(configs)]:
            round_medians[c].append(float(np.median(ls.time_steps(steps[c], reps))))
    rows = {}
    for (mode, rank), s in steps.items():
        seconds = float(np.median(round_medians[mode, rank]))
        flops = ls.model_flops(mode, setup.matmul_params, setup.tokens, s.adapter_params)
        rows[mode, rank] = {
            "mode": mode, "rank": rank if mode != "full" else None,
            "params": setup.params_count, "matmul_params": setup.matmul_params,
            "tokens": setup.tokens, "median_s": seconds,
            "round_medians_s": round_medians[mode, rank], "build_s": build_s[mode, rank],
            "model_flops": flops, "gflops_per_s": flops / seconds / 1e9,
            "trainable_params": s.trainable_params, "adapter_params": s.adapter_params,
            "quantized_params": s.quantized_params, "frozen_bytes": s.frozen_bytes,
            "trainable_bytes": s.trainable_bytes, "opt_state_bytes": s.opt_state_bytes,
            "xla": s.xla, "losses": s.losses[:3],
        }

    def paired(a: dict, b: dict) -> float:
        return float(np.median(np.divide(a["round_medians_s"], b["round_medians_s"])))

    full = next((row for (mode, _), row in rows.items() if mode == "full"), None)
    for (mode, rank), row in rows.items():
        lora = rows.get(("lora", rank))
        if mode == "qlora" and lora is not None:
            # LoRA's peak with the quantized weights at 4.127 instead of 32 bits: the QLoRA
            # peak to expect if nothing else changed (activations and adapters are the same).
            saved = 4 * row["quantized_params"] * (1 - QLORA_BITS / 32)
            row["expected_peak"] = lora["xla"].get("peak", 0) - saved
            row["paired_time_vs_lora"] = paired(row, lora)
        if mode == "lora" and full is not None:
            row["paired_time_vs_full"] = paired(row, full)
    return list(rows.values())


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    styles = {"full": ("k", "o", "full fine-tuning"), "lora": ("C0", "s", "LoRA"),
              "qlora": ("C3", "^", "QLoRA (nf4 + DQ)")}
    by_size, by_rank = results["by_size"], results["by_rank"]
    for mode, (color, marker, label) in styles.items():
        rows = [r for r in by_size if r["mode"] == mode]
        if rows:
            x = [r["params"] / 1e6 for r in rows]
            axes[0, 0].plot(x, [r["median_s"] for r in rows], color=color, marker=marker,
                            label=label)
            axes[0, 1].plot(x, [r["xla"]["peak"] / 2**20 for r in rows], color=color,
                            marker=marker, label=label)
        rows = [r for r in by_rank if r["mode"] == mode]
        if rows:
            x = [r["rank"] for r in rows]
            axes[1, 0].plot(x, [r["median_s"] for r in rows], color=color, marker=marker,
                            label=label)
            axes[1, 1].plot(x, [r["xla"]["peak"] / 2**20 for r in rows], color=color,
                            marker=marker, label=label)
    for ax, rows in ((axes[0, 1], by_size), (axes[1, 1], by_rank)):
        exp = [r for r in rows if r["mode"] == "qlora" and "expected_peak" in r]
        if exp:
            key = "params" if rows is by_size else "rank"
            scale = 1e6 if key == "params" else 1
            ax.plot([r[key] / scale for r in exp], [r["expected_peak"] / 2**20 for r in exp],
                    color="C3", ls="--", label="QLoRA expected: LoRA with 4.127-bit weights")
    meta = results["meta"]
    size_rank = meta["rank_for_sizes"]
    titles = [f"step time vs size (rank {size_rank})", f"peak memory vs size (rank {size_rank})",
              f"step time vs rank ({meta['rank_sweep_size']})",
              f"peak memory vs rank ({meta['rank_sweep_size']})"]
    for ax, title in zip(axes.flat, titles, strict=True):
        ax.set_xscale("log")
        if ax is axes[1, 0]:  # a narrow range: linear from 0 shows the growth honestly
            ax.set_ylim(bottom=0, top=1.15 * ax.get_ylim()[1])
        else:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[0]:
        ax.set_xlabel("parameters (millions)")
    for ax in axes[1]:
        ax.set_xlabel("LoRA rank")
    for ax in axes[:, 0]:
        ax.set_ylabel("seconds per step (median)")
    for ax in axes[:, 1]:
        ax.set_ylabel("peak MiB (XLA accounting)")
    fig.suptitle(f"lowrank training step, {meta['tokens']} tokens per step, float32, "
                 f"{meta['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        extra = ""
        if "paired_time_vs_lora" in r:
            extra = (f"  QLoRA/LoRA time {r['paired_time_vs_lora']:.2f}, expected peak "
                     f"{r['expected_peak'] / 2**20:.0f} MiB")
        if "paired_time_vs_full" in r:
            extra = f"  LoRA/full time {r['paired_time_vs_full']:.2f}"
        rank = "-" if r["rank"] is None else r["rank"]
        print(f"  {r['params'] / 1e6:7.1f}M {r['mode']:6s} r={rank!s:4s} "
              f"{1e3 * r['median_s']:9.1f} ms {r['gflops_per_s']:7.1f} GFLOP/s  peak "
              f"{r['xla'].get('peak', 0) / 2**20:8.1f} MiB (temp "
              f"{r['xla'].get('temp', 0) / 2**20:.1f}){extra}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models, one round: a smoke run")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=1, help="steps per mode per round")
    parser.add_argument("--rank", type=int, default=8, help="rank of the size sweep")
    parser.add_argument("--sizes", default=None, help=f"subset of {list(SIZES)} (default all)")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)),
                        help="ranks of the rank sweep ('' skips it)")
    parser.add_argument("--rank-size", default="34M", help="model of the rank sweep")
    parser.add_argument("--full-up-to", type=float, default=110e6,
                        help="full fine-tuning reference for models up to this many params")
    parser.add_argument("--out", default=str(FIGURES), help="folder for scaling.json/.png")
    args = parser.parse_args()
    sizes, vocab = (TINY_SIZES, TINY_VOCAB) if args.tiny else (SIZES, VOCAB)
    if args.sizes and not args.tiny:
        unknown = sorted(set(args.sizes.split(",")) - set(SIZES))
        if unknown:
            parser.error(f"unknown --sizes {unknown}; accepted: {list(SIZES)}")
        sizes = {k: v for k, v in SIZES.items() if k in args.sizes.split(",")}
    rank_size = next(iter(TINY_SIZES)) if args.tiny else args.rank_size
    if rank_size not in (TINY_SIZES if args.tiny else SIZES):
        parser.error(f"--rank-size {rank_size!r} is not one of {list(SIZES)}")
    ranks = [int(r) for r in args.ranks.split(",") if r]
    rounds = 1 if args.tiny else args.rounds
    start, load_before = time.perf_counter(), os.getloadavg()
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, {device}; "
          f"batch {args.batch} x {args.seq} tokens", flush=True)

    by_size = []
    for name, (hidden, layers, heads, inter) in sizes.items():
        setup = ls.llama(hidden, layers, heads, inter, vocab=vocab, batch=args.batch,
                         seq=args.seq)
        modes = (["full"] if setup.params_count <= args.full_up_to else []) + ["lora", "qlora"]
        print(f"size {name}: {setup.params_count:,} params", flush=True)
        rows = measure(setup, [(m, args.rank) for m in modes], rounds, args.reps)
        _print_rows(rows)
        by_size += [{**r, "size": name} for r in rows]
        del setup
    by_rank = []
    if ranks:
        hidden, layers, heads, inter = (TINY_SIZES if args.tiny else SIZES)[rank_size]
        setup = ls.llama(hidden, layers, heads, inter, vocab=vocab, batch=args.batch,
                         seq=args.seq)
        print(f"ranks at {rank_size}: {setup.params_count:,} params", flush=True)
        # Every rank's two steps in one alternation, so that load drift does not bend the curve.
        rows = measure(setup, [(m, r) for r in ranks for m in ("lora", "qlora")], rounds,
                       args.reps)
        _print_rows(rows)
        by_rank = [{**r, "size": rank_size} for r in rows]

    results = {
        "meta": {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                            f"{platform.platform()}", "device": device, "jax": jax.__version__,
                 "commit": git_commit(), "batch": args.batch, "seq": args.seq,
                 "tokens": args.batch * args.seq,
                 "vocab": vocab, "rounds": rounds, "reps": args.reps,
                 "rank_for_sizes": args.rank, "rank_sweep_size": rank_size,
                 "sizes": {k: list(v) for k, v in sizes.items()},
                 "load_before": [round(x, 1) for x in load_before],
                 "load_after": [round(x, 1) for x in os.getloadavg()],
                 "wall_s": round(time.perf_counter() - start, 1)},
        "by_size": by_size, "by_rank": by_rank,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "scaling.png")
    print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'} "
          f"({results['meta']['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
