"""Run in a subprocess by tests/test_quantize_on_load.py: the peak RSS growth of one load.

    python tests/load_peak.py DIR [--scan] [--param-dtype bfloat16]

Prints one JSON line: the growth of the process's peak resident set (VmHWM, reset just
before the call with /proc/self/clear_refs) over its resident set just before the call, and
the loaded tree's memory report.
"""

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

import lowrank as lr
from lowrank import models


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--warm-up", default=None, help="a small directory loaded first, so "
                        "that XLA's one-time start-up is not counted")
    args = parser.parse_args()
    jax.block_until_ready(jnp.zeros(1) + 1)  # the runtime up before the baseline
    spec = lr.QuantSpec("nf4", double_quant=True)
    if args.warm_up:
        jax.block_until_ready(models.from_pretrained(args.warm_up, quant=spec)[1])
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    model, frozen = models.from_pretrained(args.directory, scan_layers=args.scan,
                                           param_dtype=jnp.dtype(args.param_dtype), quant=spec)
    jax.block_until_ready(frozen)
    peak = _status_kib("VmHWM")
    report = lr.memory_report(frozen)
    json.dump({"growth_bytes": (peak - before) * 1024, "rss_before_bytes": before * 1024,
               "tree_bytes": report.bytes, "params": report.params,
               "quantized_bytes": report.quantized.bytes,
               "quantized_params": report.quantized.params}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
