"""lowrank's training steps on an accelerator in bfloat16, and the model FLOP utilization.

Random weights and synthetic tokens only (no downloads), so it runs on a machine with jax,
flax, optax and numpy and nothing else. Two parts, each written to ``OUT/gpu_bench.json`` as
soon as it is done:

- ``bert``: the MiniLM benchmark's four steps (full fine-tuning, LoRA r=8 on query/value and
  on every encoder linear layer, QLoRA nf4 + double quantization on every encoder linear
  layer) on a MiniLM-shaped BERT (random weights), batch 16 x 128 tokens.
- ``llama``: full fine-tuning, LoRA and QLoRA (r=16, every linear layer of the decoder
  layers) of a ~1.1B-parameter Llama-style model (TinyLlama's shape: d=2048, 22 layers, 32
  heads, 4 key/value heads, SwiGLU 5632, vocabulary 32000), batch 16 x 512 tokens, with MFU.

Every step computes in bfloat16: full fine-tuning from float32 master weights, LoRA over a
base stored in bfloat16, QLoRA over nf4 dequantized to bfloat16; adapters and optimizer
state in float32. The steps of one model are timed in alternation (rotating order, rounds of
``reps`` steps); figures are medians.

MFU = model FLOPs per step / (step time x peak dense bf16 FLOP/s), with model FLOPs as in
``benchmarks.peers.lowrank_steps.model_flops``: ``6 N T`` for full fine-tuning and
``4 N T + 6 T P`` for (Q)LoRA (N: parameters of matmul kernels, the LM head included and the
embedding table not; T: tokens; P: adapter parameters); attention's token-token products are
not counted. Peak: 989e12 for an H100/H200 (SXM, dense, no sparsity); the measured bf16 matmul
rate on this device is reported beside it.

    bash benchmarks/gpu.sh OUTDIR                      # the real run (about 4 minutes)
    LOWRANK_GPU_TINY=1 bash benchmarks/gpu.sh OUTDIR   # tiny sizes: a smoke run, CPU too
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lowrank as lr
from benchmarks.peers import lowrank_steps as ls
from benchmarks.peers.workers import git_commit

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
"""Dense bf16 peak FLOP/s by device name (sparsity off), for MFU."""
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536)
TINY_BERT = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64)
# (hidden, layers, heads, kv heads, intermediate, vocab, batch, seq)
LLAMA_1B = (2048, 22, 32, 4, 5632, 32000, 16, 512)
TINY_LLAMA = (64, 2, 4, 2, 128, 256, 2, 16)
BERT_QV = r"bert/encoder/.*/(query|value)/kernel"
BERT_ALL = r"bert/encoder/.*/kernel"


def peak_flops(device) -> float | None:
    """The dense bf16 peak of ``device`` when it is known (else None: MFU is not reported)."""
    return next((v for k, v in PEAK_BF16.items() if k in device.device_kind), None)


def alternate(steps: dict[str, ls.Step], rounds: int, reps: int) -> dict[str, list[float]]:
    """Round medians of each step, the steps taking turns in a rotating order."""
    names = list(steps)
    medians = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            medians[k].append(float(np.median(ls.time_steps(steps[k], reps))))
    return medians


def _device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def row(step: ls.Step, medians: list[float], flops: float | None, peak: float | None) -> dict:
    seconds = float(np.median(medians))
    out = {"median_ms": 1e3 * seconds, "round_medians_ms": [1e3 * m for m in medians],
           "trainable_params": step.trainable_params, "adapter_params": step.adapter_params,
           "frozen_mib": step.frozen_bytes / 2**20,
           "xla_mib": {k: v / 2**20 for k, v in step.xla.items()},
           "losses": step.losses[:2] + step.losses[-1:]}
    if flops is not None:
        out["model_tflops"] = flops / 1e12
        out["achieved_tflops_per_s"] = flops / seconds / 1e12
        if peak:
            out["mfu"] = flops / seconds / peak
    return out


def run_models(setups: dict, rounds: int, reps: int, peak: float | None,
               tokens: int | None = None, n_matmul: int | None = None) -> dict:
    """Builds, warms up and times the given ``{name: make_step kwargs}`` of one model."""
    steps, build_s = {}, {}
    for name, kwargs in setups.items():
        start = time.perf_counter()
        steps[name] = ls.make_step(**kwargs)
        steps[name].run()
        build_s[name] = time.perf_counter() - start
        print(f"  built {name} in {build_s[name]:.0f} s", flush=True)
    medians = alternate(steps, rounds, reps)
    out = {}
    for name, s in steps.items():
        flops = None
        if tokens is not None:
            flops = ls.model_flops(s.mode, n_matmul, tokens, s.adapter_params)
        out[name] = {**row(s, medians[name], flops, peak), "build_s": build_s[name]}
    for num, den in (("qlora", "lora"), ("lora", "full"), ("qlora_all", "lora_all"),
                     ("lora_all", "full"), ("lora_qv", "full")):
        if num in medians and den in medians:
            out[f"{num} / {den}"] = float(np.median(np.divide(medians[num], medians[den])))
    return out


def bert_part(tiny: bool, rounds: int, reps: int, peak: float | None) -> dict:
    from lowrank import models

    cfg = models.BertConfig(**(TINY_BERT if tiny else MINILM))
    model = models.BertForSequenceClassification(cfg, num_labels=5, pooling="pooler",
                                                 dtype=jnp.bfloat16)
    batch_size, seq = (4, 16) if tiny else (16, 128)
    ids = jax.random.randint(jax.random.key(0), (batch_size, seq), 1, cfg.vocab_size, jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
             "token_type_ids": jnp.zeros_like(ids),
             "labels": jax.random.randint(jax.random.key(1), (batch_size,), 0, 5, jnp.int32)}
    params = jax.jit(model.init)(jax.random.key(2), ids)["params"]
    common = dict(model=model, params=params, batch=batch, forward=ls.bert_forward,
                  loss="classification", compute_dtype=jnp.bfloat16,
                  frozen_dtype=jnp.bfloat16)
    quant = lr.QuantSpec("nf4", block_size=64, double_quant=True, targets=r"bert/encoder/.*")

    def spec(targets):
        return lr.LoraSpec(rank=8, alpha=16, targets=targets, trainable=r"classifier/.*")

    setups = {"full": dict(common, mode="full"),
              "lora_qv": dict(common, mode="lora", spec=spec(BERT_QV)),
              "lora_all": dict(common, mode="lora", spec=spec(BERT_ALL)),
              "qlora_all": dict(common, mode="qlora", spec=spec(BERT_ALL), quant=quant)}
    out = run_models(setups, rounds, reps, peak)
    out["shape"] = {"batch": batch_size, "seq": seq, **(TINY_BERT if tiny else MINILM)}
    return out


def llama_part(tiny: bool, rounds: int, reps: int, peak: float | None, rank: int,
               modes: list[str]) -> dict:
    hidden, layers, heads, kv, inter, vocab, batch, seq = TINY_LLAMA if tiny else LLAMA_1B
    setup = ls.llama(hidden, layers, heads, inter, vocab=vocab, batch=batch, seq=seq,
                     kv_heads=kv)
    print(f"  llama: {setup.params_count / 1e9:.3f}B params "
          f"({setup.matmul_params / 1e9:.3f}B in matmuls), {setup.tokens} tokens", flush=True)
    common = dict(model=setup.model.clone(dtype=jnp.bfloat16), params=setup.params,
                  batch=setup.batch, forward=ls.lm_forward, loss="lm", layouts=setup.layouts,
                  compute_dtype=jnp.bfloat16, frozen_dtype=jnp.bfloat16)
    spec = lr.LoraSpec(rank=rank, alpha=2 * rank, targets=ls.LLAMA_TARGETS)
    quant = lr.QuantSpec("nf4", block_size=64, double_quant=True,
                         targets=ls.LLAMA_QUANT_TARGETS)
    setups = {"full": dict(common, mode="full"), "lora": dict(common, mode="lora", spec=spec),
              "qlora": dict(common, mode="qlora", spec=spec, quant=quant)}
    setups = {k: v for k, v in setups.items() if k in modes}
    out = run_models(setups, rounds, reps, peak, setup.tokens, setup.matmul_params)
    out["shape"] = {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv,
                    "intermediate": inter, "vocab": vocab, "batch": batch, "seq": seq,
                    "params": setup.params_count, "matmul_params": setup.matmul_params,
                    "rank": rank}
    return out


def print_part(name: str, part: dict) -> None:
    print(f"{name}: {part['shape']}")
    for k, v in part.items():
        if isinstance(v, dict) and "median_ms" in v:
            mfu = f"  MFU {100 * v['mfu']:.1f}%" if "mfu" in v else ""
            rate = (f"  {v['achieved_tflops_per_s']:.0f} TFLOP/s"
                    if "achieved_tflops_per_s" in v else "")
            print(f"  {k:10s} {v['median_ms']:9.2f} ms  peak {v['xla_mib'].get('peak', 0):9.1f} "
                  f"MiB (frozen {v['frozen_mib']:.1f}, temp {v['xla_mib'].get('temp', 0):.1f})"
                  f"{rate}{mfu}")
    for k, v in part.items():
        if " / " in k:
            print(f"  {k}: {v:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_bench.json")
    parser.add_argument("--tiny", action="store_true",
                        default=os.environ.get("LOWRANK_GPU_TINY", "") not in ("", "0"),
                        help="tiny sizes (also LOWRANK_GPU_TINY=1): a smoke run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5, help="steps per round")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the Llama part")
    parser.add_argument("--parts", default="bert,llama")
    parser.add_argument("--modes", default=",".join(ls.MODES), help="modes of the Llama part")
    args = parser.parse_args()
    rounds, reps = (1, 2) if args.tiny else (args.rounds, args.reps)
    device = jax.devices()[0]
    peak = peak_flops(device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"meta": {
        "device": device.device_kind, "platform": device.platform,
        "devices": jax.device_count(), "jax": jax.__version__, "host": platform.platform(),
        "tiny": args.tiny, "rounds": rounds, "reps": reps, "peak_bf16_flops": peak,
        "commit": git_commit(),
    }}
    start = time.perf_counter()
    if device.platform == "gpu" and not args.tiny:
        results["meta"]["measured_bf16_matmul_tflops"] = (
            ls.matmul_rate(8192, 8192, 8192, jnp.bfloat16, reps=10) / 1e12)
    print(json.dumps(results["meta"]), flush=True)

    def save():
        results["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
        results["meta"]["device_peak_bytes"] = _device_peak_bytes()
        (out_dir / "gpu_bench.json").write_text(json.dumps(results, indent=1))

    parts = args.parts.split(",")
    if "bert" in parts:
        print("bert (MiniLM shape, random weights):", flush=True)
        results["bert"] = bert_part(args.tiny, rounds, reps, peak)
        save()
        print_part("bert", results["bert"])
    if "llama" in parts:
        print("llama (~1.1B, random weights):", flush=True)
        results["llama"] = llama_part(args.tiny, rounds, reps, peak, args.rank,
                                      args.modes.split(","))
        save()
        print_part("llama", results["llama"])
    save()
    print(f"wrote {out_dir / 'gpu_bench.json'} ({results['meta']['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
