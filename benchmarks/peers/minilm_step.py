"""One training step on MiniLM, lowrank against PEFT + bitsandbytes, side by side.

all-MiniLM-L6-v2 (real weights) with a 5-way classification head, on one batch of 16 BBC News
articles x 128 tokens, float32 on CPU, AdamW (lr 1e-4, weight decay 0.01), dropout off in
both (the peers' modules in eval mode, ours deterministic: gradients flow the same). Four
configurations, each in ours and in the peer:

- ``full``: every parameter trained (transformers / plain JAX through lowrank's step);
- ``lora_qv``: LoRA r=8, alpha=16 on query and value, classifier trained (PEFT);
- ``lora_all``: the same on every linear layer of the encoder;
- ``qlora_all``: ``lora_all`` over an encoder stored in nf4 with double quantization
  (bitsandbytes ``Linear4bit`` under PEFT; ours ``lowrank.quantize_tree``).

Every (framework, configuration) is its own worker process, so that its peak resident memory
is its own; the driver asks all eight for ``--reps`` steps per round, in a rotating order
(see ``benchmarks/peers/workers.py``). Ours runs in lowrank's environment, the peers in the
reference environment that ``scripts/make_peer_env.sh`` makes.

    .venv/bin/python -m benchmarks.peers.minilm_step --rounds 5 --reps 2
    .venv/bin/python -m benchmarks.peers.minilm_step --configs lora_qv --rounds 2 --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.peers.workers import REPO, Worker, alternate, git_commit, paired_ratio, serve

BATCH, SEQ, RANK, ALPHA, LABELS = 16, 128, 8, 16, 5
CONFIGS = {"full": "full", "lora_qv": "lora", "lora_all": "lora", "qlora_all": "qlora"}
# The same layers by each framework's names: ours are '/'-joined param paths, PEFT's are
# module names (a regex must match the whole dotted name).
OURS_TARGETS = {"qv": r"bert/encoder/.*/(query|value)/kernel", "all": r"bert/encoder/.*/kernel"}
PEFT_TARGETS = {"qv": ["query", "value"], "all": r".*encoder.*\.(query|key|value|dense)"}
DEFAULT_JSON = REPO / "benchmarks" / "figures" / "peers_minilm.json"


def _targets(config: str) -> str:
    return "qv" if config.endswith("_qv") else "all"


def ours_step(config: str, model_dir: str, inputs: dict[str, np.ndarray]):
    """Our compiled step of ``config`` (a ``lowrank_steps.Step``) on the real MiniLM."""
    import jax
    import jax.numpy as jnp

    import lowrank as lr
    from benchmarks.peers import lowrank_steps
    from lowrank import models

    model, params = models.from_pretrained(model_dir, num_labels=LABELS, pooling="pooler",
                                           key=jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in inputs.items()}
    mode = CONFIGS[config]
    spec = lr.LoraSpec(rank=RANK, alpha=ALPHA, targets=OURS_TARGETS[_targets(config)],
                       trainable=r"classifier/.*")
    quant = lr.QuantSpec("nf4", block_size=64, double_quant=True, targets=r"bert/encoder/.*")
    step = lowrank_steps.make_step(model, params, batch, lowrank_steps.bert_forward,
                                   "classification", mode=mode,
                                   spec=None if mode == "full" else spec, quant=quant)
    del params
    return step


def ours_build(config: str, model_dir: str, inputs: dict[str, np.ndarray]):
    import jax

    step = ours_step(config, model_dir, inputs)
    mode = CONFIGS[config]
    info = {"jax": jax.__version__, "backend": jax.default_backend(),
            "trainable_params": step.trainable_params, "weights_bytes": step.frozen_bytes
            if mode != "full" else step.trainable_bytes, "xla": step.xla,
            "opt_state_bytes": step.opt_state_bytes, "losses": step.losses}
    return step.run, info


def peer_build(config: str, model_dir: str, inputs: dict[str, np.ndarray]):
    import peft
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    mode = CONFIGS[config]
    kwargs = {}
    if mode == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier", "pooler"])
    model = transformers.BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=LABELS, dtype=torch.float32, **kwargs)
    if mode != "full":
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS[_targets(config)],
            lora_dropout=0.0, task_type="SEQ_CLS"))
    model.eval()  # dropout off, as ours; autograd is unaffected
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    args = {k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items() if k != "labels"}
    labels = torch.from_numpy(inputs["labels"].astype(np.int64))
    losses = []

    def run():
        loss = model(**args, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    frozen = [t for t in (*model.parameters(), *model.buffers()) if not t.requires_grad]
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "threads": torch.get_num_threads(),
            "attn_implementation": model.config._attn_implementation,
            "trainable_params": sum(p.numel() for p in trainable),
            "weights_bytes": sum(t.numel() * t.element_size() for t in frozen)
            if mode != "full" else sum(p.numel() * p.element_size() for p in trainable),
            "losses": losses}
    if mode == "qlora":
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    return run, info


def make_inputs(path: Path) -> None:
    from lowrank import assets, data

    train = data.split_bbc(data.load_bbc())["train"]
    tokenizer = data.load_tokenizer(assets.minilm_dir(), max_length=SEQ)
    batch = data.encode(tokenizer, train.texts[:BATCH])
    np.savez(path, **batch, labels=np.asarray(train.labels[:BATCH], np.int32))


def _mb(x: float) -> float:
    return round(x / 2**20, 1)


def summarize(configs, workers, result) -> dict:
    rows = {}
    for c in configs:
        row = {}
        for side in ("ours", "peer"):
            name = f"{side}:{c}"
            info, res = workers[name].info, result[name]
            row[side] = {
                "median_ms": 1e3 * float(np.median(res["times"])),
                "iqr_ms": [1e3 * float(q) for q in np.percentile(res["times"], [25, 75])],
                "peak_rss_mb": _mb(res["peak_rss"]),
                "peak_above_baseline_mb": _mb(res["peak_rss"] - info["rss_baseline"]),
                "baseline_rss_mb": _mb(info["rss_baseline"]),
                "weights_mb": _mb(info["weights_bytes"]),
                "trainable_params": info["trainable_params"],
                "first_losses": info["losses"][:2],
            }
            if side == "ours" and info.get("xla"):
                row[side]["xla_mb"] = {k: _mb(v) for k, v in info["xla"].items()}
        row["time_ratio"] = paired_ratio(result[f"ours:{c}"], result[f"peer:{c}"])
        row["memory_ratio"] = (row["ours"]["peak_above_baseline_mb"]
                               / row["peer"]["peak_above_baseline_mb"])
        rows[c] = row
    within = {}
    for num, den in (("qlora_all", "lora_all"), ("lora_all", "full"), ("lora_qv", "full")):
        if num in configs and den in configs:
            for side in ("ours", "peer"):
                within[f"{side} {num} / {den}"] = paired_ratio(result[f"{side}:{num}"],
                                                               result[f"{side}:{den}"])
    return {"rows": rows, "within": within}


def print_summary(summary: dict, meta: dict) -> None:
    print(f"machine: {meta['machine']}; load average {meta['load_before']} before, "
          f"{meta['load_after']} after")
    print(f"ours: {meta['ours']}\npeer: {meta['peer']}")
    print(f"MiniLM, batch {BATCH} x {SEQ} tokens, float32 CPU, {meta['rounds']} rounds x "
          f"{meta['reps']} reps")
    print(f"{'config':10s} {'ours ms':>9s} {'peer ms':>9s} {'ratio':>6s}   "
          f"{'ours MB':>8s} {'peer MB':>8s} {'ratio':>6s}   trainable ours/peer")
    for c, r in summary["rows"].items():
        o, p = r["ours"], r["peer"]
        print(f"{c:10s} {o['median_ms']:9.0f} {p['median_ms']:9.0f} {r['time_ratio']:6.2f}   "
              f"{o['peak_above_baseline_mb']:8.0f} {p['peak_above_baseline_mb']:8.0f} "
              f"{r['memory_ratio']:6.2f}   {o['trainable_params']}/{p['trainable_params']}")
    print("(time ratio: median over rounds of ours / peer; MB: peak resident memory over the "
          "timed steps minus the process's footprint after importing its framework)")
    for k, v in summary["within"].items():
        print(f"  {k}: {v:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2, help="steps per worker per round")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--torch-python", default="/work/refenv/bin/python")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    parser.add_argument("--worker", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with np.load(args.inputs, allow_pickle=False) as f:
            inputs = {k: f[k] for k in f.files}
        build, preload = ((ours_build, ("jax", "lowrank")) if args.worker == "ours" else
                          (peer_build, ("torch", "transformers", "peft")))
        serve(lambda: build(args.config, args.model_dir, inputs), preload)
        return

    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown --configs {unknown}; accepted: {list(CONFIGS)}")
    from lowrank import assets

    model_dir = str(assets.minilm_dir())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.npz"
        make_inputs(inputs)
        workers = {}
        try:
            for c in configs:
                for side, python in (("ours", sys.executable), ("peer", args.torch_python)):
                    workers[f"{side}:{c}"] = Worker([
                        python, "-m", "benchmarks.peers.minilm_step", "--worker", side,
                        "--config", c, "--model-dir", model_dir, "--inputs", str(inputs)])
            result = alternate(workers, args.rounds, args.reps)
        finally:
            for w in workers.values():
                w.close()
    summary = summarize(configs, workers, result)
    ours0, peer0 = workers[f"ours:{configs[0]}"].info, workers[f"peer:{configs[0]}"].info
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_before": [round(x, 1) for x in load_before],
        "load_after": [round(x, 1) for x in os.getloadavg()],
        "ours": {k: ours0[k] for k in ("jax", "backend")},
        "peer": {k: peer0[k] for k in ("torch", "transformers", "peft", "threads",
                                       "attn_implementation")},
        "rounds": args.rounds, "reps": args.reps, "commit": git_commit(),
        "batch": [BATCH, SEQ], "rank": RANK,
    }
    for c in configs:
        if "bitsandbytes" in workers[f"peer:{c}"].info:
            meta["peer"]["bitsandbytes"] = workers[f"peer:{c}"].info["bitsandbytes"]
    print_summary(summary, meta)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, **summary,
                               "times": {k: v["times"] for k, v in result.items()}}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
