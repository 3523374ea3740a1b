"""Where the MiniLM training step spends its time: ours per XLA op, the peer's per torch op.

Ours: the step of ``benchmarks/peers/minilm_step.py`` is traced with ``jax.profiler``; each
executed op (a fusion of the compiled HLO) is put in a category by what its fused computation
contains, and its time summed. With more than one core, XLA runs independent ops at the same
time, so op times add up to more than the wall time: run under ``taskset -c 0`` for shares
that add up. The matmul rate of the step's dominant shape, measured alone, gives the floor:
the step's matmul FLOPs (XLA's cost analysis) at that rate.

The peer (in the reference environment): ``torch.profiler``'s self time per aten op.

``--dropout on`` profiles the step as users train (the model's dropout on; ours drawing its
masks from ``--prng``, "threefry" or "hash"); ``--dtype`` and ``--path`` as in
``minilm_step``.

    .venv/bin/python -m benchmarks.peers.profile_step --config lora_qv
    .venv/bin/python -m benchmarks.peers.profile_step --config lora_qv --dropout on --prng hash
    taskset -c 0 .venv/bin/python -m benchmarks.peers.profile_step --config lora_qv
    /work/refenv/bin/python -m benchmarks.peers.profile_step --config lora_qv --peer \\
        --model-dir ~/.cache/lowrank/minilm-0.1.0
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.peers import minilm_step
from benchmarks.peers import variants as vs


def category(body: str) -> str:
    """What an op does, read off the text of its fused computation.

    >>> category("%d = f32[16,12,128,128]{3,2,1,0} dot(%q, %k)")
    'attention matmuls (+ fused softmax)'
    >>> category("%e = f32[2048,384]{1,0} exponential(%x)")
    'softmax (exp)'
    >>> category("%x = u32[786432]{0} xor(%a, %b)")
    'random bits (dropout)'
    """
    if re.search(r" (dot|convolution)\(", body):
        if re.search(r"(f32|bf16)\[(\d+,)*128,128\]", body):
            return "attention matmuls (+ fused softmax)"
        if re.search(r"(f32|bf16)\[(\d+,)*8\]|(f32|bf16)\[8,", body):
            return "rank-8 matmuls (LoRA)"
        return "matmuls"
    for label, pattern in (("random bits (dropout)", r"u32\[[\d,]*\](\{[\d,]*\})? xor\("),
                           ("GELU (erf)", r" erf\("), ("softmax (exp)", r" exponential\("),
                           ("lookups, dequantize", r" gather\(|[su]4\[|u8\["),
                           ("reductions (LayerNorm, loss, AdamW)", r" reduce\("),
                           ("transposes and copies", r" (transpose|copy)\(")):
        if re.search(pattern, body):
            return label
    return "other elementwise"


def _fused_bodies(hlo: str) -> dict[str, str]:
    """Each top-level op's name -> the text of what it runs (its fused computation or itself)."""
    computations = {m.group(1): m.group(2) for m in re.finditer(
        r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M)}
    entry = hlo[hlo.index("\nENTRY"):]
    bodies = {}
    for line in entry.splitlines():
        m = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = ", line)
        if m:
            called = re.search(r"calls=%?([\w.\-]+)", line)
            bodies[m.group(1)] = computations.get(called.group(1), line) if called else line
    return bodies


def categorize(op_ms: dict[str, float], hlo: str) -> dict[str, float]:
    """Sums ``op_ms`` (op name -> ms per step) by category; ops not in the HLO are skipped.

    >>> hlo = "%f (p: f32[2]) -> f32[2] {\\n  ROOT %e = f32[2] exponential(%p)\\n}\\n\\n" \\
    ...       "ENTRY %main {\\n  ROOT %x = f32[2] fusion(%a), calls=%f\\n}"
    >>> categorize({"x": 2.0, "unrelated": 9.0}, hlo)
    {'softmax (exp)': 2.0}
    """
    bodies = _fused_bodies(hlo)
    out: dict[str, float] = collections.Counter()
    for name, ms in op_ms.items():
        body = bodies.get(name)
        if body is None:
            continue
        out[category(body)] += ms
    return dict(out)


def trace_ops(run, steps: int) -> dict[str, float]:
    """ms per step of every XLA op executed by ``steps`` calls of ``run``."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        path = next(Path(tmp).rglob("perfetto_trace.json.gz"))
        events = json.loads(gzip.decompress(path.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            total[e["name"]] += e["dur"] / 1e3 / steps
    return dict(total)


def profile_ours(variant: vs.Variant, inputs: dict, steps: int) -> dict:
    # jax is imported here, not at the top: the peer's profile runs where there is no jax.
    from benchmarks.peers import lowrank_steps
    from lowrank import assets

    step = minilm_step.ours_step(variant, str(assets.minilm_dir()), inputs)
    for _ in range(2):
        step.run()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step.run()
        times.append(time.perf_counter() - start)
    ops = trace_ops(step.run, steps)
    by_category = categorize(ops, step.compiled.as_text())
    flops = float(step.compiled.cost_analysis().get("flops", 0.0))
    tokens = minilm_step.BATCH * minilm_step.SEQ
    rate = lowrank_steps.matmul_rate(tokens, 384, 1536) / 1e9
    return {"variant": variant.name, "step_ms": 1e3 * float(np.median(times)),
            "op_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
            "xla_flops": flops, "matmul_gflops_per_s": rate,
            "floor_ms": 1e3 * flops / (rate * 1e9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="lora_qv", choices=list(minilm_step.CONFIGS))
    parser.add_argument("--dropout", default="off", choices=["on", "off"])
    parser.add_argument("--prng", default="threefry", choices=vs.PRNGS, help="ours' dropout")
    parser.add_argument("--dtype", default="float32", choices=vs.DTYPES)
    parser.add_argument("--path", default="step", choices=vs.PATHS, help="ours' step")
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--peer", action="store_true", help="profile the torch peer instead")
    parser.add_argument("--inputs", default="/tmp/minilm_step_inputs.npz",
                        help="the batch (.npz); ours writes it if missing, the peer reads it")
    parser.add_argument("--model-dir", help="MiniLM directory (the peer needs it)")
    args = parser.parse_args()
    path = Path(args.inputs)
    if not path.is_file():
        if args.peer:
            parser.error(f"--inputs {path} does not exist: run ours first, which writes it")
        minilm_step.make_inputs(path)
    with np.load(path, allow_pickle=False) as f:
        inputs = {k: f[k] for k in f.files}
    dropout = args.dropout == "on"
    if args.peer:
        if not args.model_dir:
            parser.error("--peer needs --model-dir (e.g. ~/.cache/lowrank/minilm-0.1.0)")
        variant = vs.Variant("peer", args.config, dropout, args.dtype)
        print(json.dumps(peer_profile(variant, args.model_dir, inputs, args.steps), indent=1))
        return
    variant = vs.Variant("ours", args.config, dropout, args.dtype, args.path, args.prng, "none")
    result = profile_ours(variant, inputs, args.steps)
    total = sum(result["op_ms"].values())
    print(f"ours {variant.name}: step {result['step_ms']:.0f} ms (median of 5); op time per "
          f"step {total:.0f} ms")
    for label, ms in result["op_ms"].items():
        print(f"  {label:38s} {ms:7.1f} ms  {100 * ms / total:5.1f}%")
    print(f"XLA cost analysis: {result['xla_flops'] / 1e9:.1f} GFLOP per step; a "
          f"[{minilm_step.BATCH * minilm_step.SEQ}, 384] x [384, 1536] matmul alone runs at "
          f"{result['matmul_gflops_per_s']:.0f} GFLOP/s: floor {result['floor_ms']:.0f} ms")


def peer_profile(variant: vs.Variant, model_dir: str | None, inputs: dict, steps: int,
                 top: int = 12) -> dict:
    """The peer's step: wall time and ``torch.profiler`` self time of its top aten ops."""
    from torch.profiler import ProfilerActivity, profile

    run, _ = minilm_step.peer_build(variant, model_dir, inputs)
    for _ in range(2):
        run()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return {"variant": variant.name, "step_ms": 1e3 * float(np.median(times)),
            "self_ms_per_step": {e.key: e.self_cpu_time_total / 1e3 / steps for e in rows}}


if __name__ == "__main__":
    main()
