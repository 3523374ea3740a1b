"""QLoRA at the scale it exists for: a 7B-class Llama loaded in 4 bits and trained on a CPU.

Writes (once) a random-weight Hugging Face checkpoint of a published Llama shape, loads it
with the kernels of the decoder layers quantized on load (nf4 + double quantization; the
embeddings, norms and LM head kept in bfloat16), and runs QLoRA training steps: LoRA r=16 on
every linear layer of the decoder layers, batch 1 x 128 tokens, scanned and remat'ed layers,
float32 compute, AdamW on the adapters. Each stage's peak resident set (VmHWM, reset between
stages with /proc/self/clear_refs) is measured in this one process and set beside the figure
expected from the shapes.

    .venv/bin/python -m benchmarks.big_qlora --preset llama-2-7b      # ~15 min, 13.5 GB disk
    .venv/bin/python -m benchmarks.big_qlora --preset llama-3-8b
    .venv/bin/python -m benchmarks.big_qlora --preset llama-2-7b --layers 2 --steps 2  # smoke

The checkpoint goes to ``--dir`` (default ``/tmp/lowrank-big/<preset>``) and is reused when
its config matches. Results: ``benchmarks/figures/big_qlora_<preset>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank as lr
from lowrank import models
from lowrank.models import random_checkpoint

FIGURES = Path(__file__).resolve().parent / "figures"
QUANT = lr.QuantSpec("nf4", block_size=64, double_quant=True, targets=r"model/layers/.*")
TARGETS = r"model/layers/.*/kernel"  # every linear layer of the decoder layers


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


class Stage:
    """Peak and end resident set of a stage, as growth over the process before it."""

    def __init__(self, name: str, log: dict):
        self.name, self.log = name, log

    def __enter__(self):
        self.start_rss = _kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self.start
        peak, end = _kib("VmHWM") * 1024, _kib("VmRSS") * 1024
        self.log[self.name] = {"seconds": seconds, "peak_rss": peak, "end_rss": end,
                               "start_rss": self.start_rss * 1024}
        print(f"{self.name:12s} {seconds:8.1f} s  peak RSS {peak / 2**30:6.2f} GiB  "
              f"(end {end / 2**30:.2f})", flush=True)


def ensure_checkpoint(directory: Path, config: models.LlamaConfig) -> float:
    """Writes the random checkpoint unless ``directory`` already holds this config."""
    wanted = {k: v for k, v in vars(config).items()}
    existing = directory / "config.json"
    if existing.is_file() and (directory / "model.safetensors.index.json").is_file():
        have = json.loads(existing.read_text())
        if all(have.get(k) == v for k, v in wanted.items() if k != "rope_theta"):
            return 0.0
    start = time.perf_counter()
    random_checkpoint.write_random_llama(directory, config, progress=True)
    return time.perf_counter() - start


def expected_bytes(model, frozen, adapters, batch: int, seq: int) -> dict:
    """The memory a step needs, from the shapes alone."""
    c = model.config
    report = lr.memory_report(frozen)
    adapter_bytes = lr.memory_report(adapters).bytes
    hidden, inter, vocab, layers = (c.hidden_size, c.intermediate_size, c.vocab_size,
                                    c.num_hidden_layers)
    kv = c.num_key_value_heads * c.head_dim
    layer_kernel_params = hidden * (2 * hidden + 2 * kv) + 3 * hidden * inter
    tokens = batch * seq
    return {
        "frozen_quantized_kernels": report.quantized.bytes,
        "frozen_float_leaves": report.bytes - report.quantized.bytes,
        # adapters + their gradients + AdamW's two moments, float32
        "adapters_grads_adam": 4 * adapter_bytes,
        # remat: each layer's input is kept for the backward pass
        "layer_inputs": layers * tokens * hidden * 4,
        # one layer recomputed at a time, its kernels dequantized to float32
        "one_layer_dequantized": layer_kernel_params * 4,
        # logits, their softmax and gradient, float32
        "logits": 3 * tokens * vocab * 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-2-7b", choices=sorted(random_checkpoint.PRESETS))
    parser.add_argument("--dir", default=None, help="checkpoint directory (written if missing)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers: a smoke run")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default=str(FIGURES))
    args = parser.parse_args()
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    config = random_checkpoint.preset(args.preset, **overrides)
    name = args.preset + ("" if args.layers is None else f"-{args.layers}layers")
    directory = Path(args.dir or f"/tmp/lowrank-big/{name}")
    log: dict = {}
    write_s = ensure_checkpoint(directory, config)
    jax.block_until_ready(jnp.zeros(1) + 1)
    baseline = _kib("VmRSS") * 1024
    print(f"{name}: {directory} (written in {write_s:.0f} s; 0 = reused); baseline RSS "
          f"{baseline / 2**30:.2f} GiB", flush=True)

    with Stage("load", log):
        model, frozen = models.from_pretrained(directory, scan_layers=True, remat=True,
                                               param_dtype=jnp.bfloat16, quant=QUANT)
        jax.block_until_ready(frozen)
    report = lr.memory_report(frozen)
    print(f"frozen tree: {report}", flush=True)

    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (args.batch, args.seq + 1)), jnp.int32)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    layouts = lr.discover_layouts(model, models.abstract_params(model), inputs)
    spec = lr.LoraSpec(rank=args.rank, alpha=2 * args.rank, targets=TARGETS)
    adapters = lr.init_adapters(jax.random.key(0), frozen, spec, layouts=layouts)  # float32
    tx = optax.adamw(1e-4)
    opt_state = tx.init(adapters)

    def loss_fn(adapters, frozen, inputs, targets):
        logits = lr.apply(model, frozen, adapters, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), targets).mean()

    def step(adapters, opt_state, frozen, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, frozen, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    losses, step_seconds = [], []
    with Stage("first_step", log):
        compiled = jitted.lower(adapters, opt_state, frozen, inputs, targets).compile()
        start = time.perf_counter()
        adapters, opt_state, loss = compiled(adapters, opt_state, frozen, inputs, targets)
        losses.append(float(loss))
        step_seconds.append(time.perf_counter() - start)
    xla = compiled.memory_analysis()
    with Stage("steady_steps", log):
        for _ in range(args.steps - 1):
            start = time.perf_counter()
            adapters, opt_state, loss = compiled(adapters, opt_state, frozen, inputs, targets)
            losses.append(float(loss))
            step_seconds.append(time.perf_counter() - start)
            print(f"  step {len(losses)}: loss {losses[-1]:.4f}, {step_seconds[-1]:.1f} s",
                  flush=True)

    expected = expected_bytes(model, frozen, adapters, args.batch, args.seq)
    steady = step_seconds[1:] or step_seconds
    result = {
        "preset": name, "config": vars(config), "directory": str(directory),
        "checkpoint_bytes": sum(f.stat().st_size for f in directory.glob("*.safetensors")),
        "write_seconds": write_s, "baseline_rss": baseline, "stages": log,
        "frozen_bytes": report.bytes, "frozen_params": report.params,
        "bits_per_param_all": report.bits_per_param,
        "bits_per_param_quantized": report.quantized.bits_per_param,
        "quantized_params": report.quantized.params,
        "float32_model_bytes": 4 * report.params,
        "adapter_params": lr.memory_report(adapters).params,
        "expected_bytes": expected, "expected_total": sum(expected.values()),
        "xla": {"argument": xla.argument_size_in_bytes, "output": xla.output_size_in_bytes,
                "temp": xla.temp_size_in_bytes, "alias": xla.alias_size_in_bytes},
        "losses": losses, "step_seconds": step_seconds,
        "median_step_seconds": float(np.median(steady)),
        "tokens_per_second": args.batch * args.seq / float(np.median(steady)),
        "batch": args.batch, "seq": args.seq, "rank": args.rank,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average": os.getloadavg(), "jax": jax.__version__},
        "compile_seconds": log["first_step"]["seconds"] - step_seconds[0],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"big_qlora_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    gib = 2**30
    print(f"\n{name}: {report.params / 1e9:.2f}B params, float32 weights "
          f"{4 * report.params / gib:.1f} GiB; frozen tree {report.bytes / gib:.2f} GiB "
          f"({report.bits_per_param:.3f} bits/param overall, "
          f"{report.quantized.bits_per_param:.3f} over the quantized kernels)")
    for stage, row in log.items():
        print(f"  {stage:12s} peak RSS {row['peak_rss'] / gib:6.2f} GiB, {row['seconds']:.1f} s")
    print(f"  expected step memory {sum(expected.values()) / gib:.2f} GiB + baseline "
          f"{baseline / gib:.2f}: " + ", ".join(f"{k} {v / gib:.2f}" for k, v in expected.items()))
    print(f"  steps: {result['median_step_seconds']:.1f} s median, "
          f"{result['tokens_per_second']:.1f} tokens/s; losses {[round(x, 4) for x in losses]}")
    print(f"  XLA temp {xla.temp_size_in_bytes / gib:.2f} GiB; "
          f"{math.fsum(step_seconds):.0f} s of steps")


if __name__ == "__main__":
    main()
