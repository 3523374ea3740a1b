"""One training step on MiniLM, lowrank against PEFT + bitsandbytes, as users run them.

all-MiniLM-L6-v2 (real weights) with a 5-way classification head, on one batch of 16 BBC News
articles x 128 tokens, CPU, AdamW (lr 1e-4, weight decay 0.01). Four configurations, each in
ours and in the peer:

- ``full``: every parameter trained (transformers / plain JAX);
- ``lora_qv``: LoRA r=8, alpha=16 on query and value, classifier trained (PEFT);
- ``lora_all``: the same on every linear layer of the encoder;
- ``qlora_all``: ``lora_all`` over an encoder stored in nf4 with double quantization
  (bitsandbytes ``Linear4bit`` under PEFT; ours ``lowrank.quantize_tree``).

Each in a cell of dropout on (the model's hidden and attention-probability dropout 0.1: torch
``train()`` mode, ours ``deterministic=False`` with a ``"dropout"`` key) or off (``eval()``,
deterministic; LoRA dropout 0 in both) and float32 or bfloat16 (torch
``autocast("cpu", bfloat16)``, ours ``compute_dtype=bfloat16``; master weights float32 in
both). Ours runs two paths, ``lowrank.train``'s step (``lowrank_steps``) and the README's
plain-JAX recipe (``recipe_step``), and as ours-only A/Bs the dropout PRNG (``lowrank.prng``:
"threefry", "hash") and XLA CPU flags. ``benchmarks/peers/variants.py`` lists the variants
and which pairs are compared.

Every variant is its own worker process (its peak resident memory its own; its XLA_FLAGS set
before JAX starts). The cells are run in groups of at most ``--max-workers`` processes, one
group after another; within a group the driver asks every worker for ``--reps`` steps per
round, in a rotating order (``benchmarks/peers/workers.py``). A worker that fails to start (a
flag XLA rejects) is reported in the JSON and the run goes on without it. Ours runs in
lowrank's environment, the peers in the reference one (``scripts/make_peer_env.sh``). The
tables: ``benchmarks/peers/report.py``.

    .venv/bin/python -m benchmarks.peers.minilm_step --rounds 5 --reps 2 \
        --json benchmarks/figures/peers_variants_run1.json
    .venv/bin/python -m benchmarks.peers.minilm_step --configs lora_qv --dropout on \
        --dtypes float32 --paths step --prngs threefry,hash --xla_flags none --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.peers import variants as vs
from benchmarks.peers.workers import (
    REPO,
    Worker,
    alternate,
    cpu_info,
    git_commit,
    paired_ratio,
    serve,
)

BATCH, SEQ, RANK, ALPHA, LABELS = 16, 128, 8, 16, 5
CONFIGS = vs.CONFIGS
# The same layers by each framework's names: ours are '/'-joined param paths, PEFT's are
# module names (a regex must match the whole dotted name).
OURS_TARGETS = {"qv": r"bert/encoder/.*/(query|value)/kernel", "all": r"bert/encoder/.*/kernel"}
PEFT_TARGETS = {"qv": ["query", "value"], "all": r".*encoder.*\.(query|key|value|dense)"}
DEFAULT_JSON = REPO / "benchmarks" / "figures" / "peers_variants.json"


def _targets(config: str) -> str:
    return "qv" if config.endswith("_qv") else "all"


def ours_step(variant: vs.Variant, model_dir: str, inputs: dict[str, np.ndarray]):
    """Our compiled step of ``variant`` (a ``lowrank_steps.Step``) on the real MiniLM."""
    import functools

    import jax
    import jax.numpy as jnp

    import lowrank as lr
    from benchmarks.peers import lowrank_steps, recipe_step
    from lowrank import models

    model, params = models.from_pretrained(model_dir, num_labels=LABELS, pooling="pooler",
                                           key=jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in inputs.items()}
    mode = CONFIGS[variant.config]
    spec = None if mode == "full" else lr.LoraSpec(
        rank=RANK, alpha=ALPHA, targets=OURS_TARGETS[_targets(variant.config)],
        trainable=r"classifier/.*")
    quant = lr.QuantSpec("nf4", block_size=64, double_quant=True, targets=r"bert/encoder/.*")
    dtype = jnp.dtype(variant.dtype)
    if variant.path == "recipe":
        step = recipe_step.make_recipe_step(model, params, batch, mode=mode, spec=spec,
                                            quant=quant, dropout=variant.dropout,
                                            prng_name=variant.prng, compute_dtype=dtype)
    else:
        forward = functools.partial(lowrank_steps.bert_forward, dropout=variant.dropout,
                                    prng_name=variant.prng)
        step = lowrank_steps.make_step(model, params, batch, forward, "classification",
                                       mode=mode, spec=spec, quant=quant, compute_dtype=dtype)
    del params
    return step


def xla_kinds(hlo: str) -> dict[str, int]:
    """How many custom fusions and custom calls of each kind a compiled program has: where an
    XLA flag that routes matmuls to a library (oneDNN, XNNPACK) shows whether it took effect.

    >>> xla_kinds('f = fusion(a), backend_config={"fusion_config":{"kind":"__ynn_fusion"}}')
    {'__ynn_fusion': 1}
    """
    found = re.findall(r'"kind":"(__[\w$]+)"|custom_call_target="([^"]+)"', hlo)
    kinds: dict[str, int] = {}
    for fusion, call in found:
        kinds[fusion or call] = kinds.get(fusion or call, 0) + 1
    return kinds


def ours_build(variant: vs.Variant, model_dir: str, inputs: dict[str, np.ndarray]):
    import jax

    step = ours_step(variant, model_dir, inputs)
    hlo = step.compiled.as_text()
    info = {"jax": jax.__version__, "backend": jax.default_backend(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "xla_kinds": xla_kinds(hlo),
            # whether an XLA flag changed the optimized program at all
            "hlo_sha256": hashlib.sha256(hlo.encode()).hexdigest()[:16],
            "trainable_params": step.trainable_params, "weights_bytes": step.frozen_bytes
            if step.mode != "full" else step.trainable_bytes, "xla": step.xla,
            "opt_state_bytes": step.opt_state_bytes, "losses": step.losses}
    return step.run, info


def peer_build(variant: vs.Variant, model_dir: str, inputs: dict[str, np.ndarray]):
    import peft
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    mode = CONFIGS[variant.config]
    bf16 = variant.dtype == "bfloat16"
    kwargs = {}
    if mode == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
            llm_int8_skip_modules=["classifier", "pooler"])
    model = transformers.BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=LABELS, dtype=torch.float32, **kwargs)
    if mode != "full":
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS[_targets(variant.config)],
            lora_dropout=0.0, task_type="SEQ_CLS"))
    # train(): hidden and attention-probability dropout 0.1, as a user trains; eval(): none.
    model.train(variant.dropout)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    args = {k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items() if k != "labels"}
    labels = torch.from_numpy(inputs["labels"].astype(np.int64))
    losses = []

    def run():
        # Mixed precision as torch documents it: the forward (and loss) under autocast, the
        # backward outside it; weights and optimizer stay float32.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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


def measured(worker: Worker, result: dict, group: int) -> dict:
    """One variant's record: its times (all steps and per-round medians), memory, and what
    its worker reported about itself."""
    info = worker.info
    out = {
        "group": group,
        "median_ms": 1e3 * float(np.median(result["times"])),
        "iqr_ms": [1e3 * float(q) for q in np.percentile(result["times"], [25, 75])],
        "round_medians": result["round_medians"], "times": result["times"],
        "peak_rss_mb": _mb(result["peak_rss"]),
        "peak_above_baseline_mb": _mb(result["peak_rss"] - info["rss_baseline"]),
        "baseline_rss_mb": _mb(info["rss_baseline"]),
        "weights_mb": _mb(info["weights_bytes"]),
        "trainable_params": info["trainable_params"],
        "first_losses": info["losses"][:2],
    }
    if "jax" in info:
        out.update(xla_flags=info["xla_flags"], xla_kinds=info["xla_kinds"],
                   hlo_sha256=info["hlo_sha256"],
                   xla_mb={k: _mb(v) for k, v in info["xla"].items()},
                   # XLA's warnings about flags it accepts but ignores or retires
                   flag_warnings=[line for line in worker.stderr_lines() if "xla_" in line])
    return out


def ratios(records: dict[str, dict], base_prng: str, base_xla: str) -> list[dict]:
    """Every compared pair (``variants.pairs``) of the variants that ran: the median over
    rounds of the per-round time ratio and, for ours / peer, the memory ratio."""
    out = []
    for kind, num, den in vs.pairs([vs.Variant.parse(k) for k in records], base_prng, base_xla):
        n, d = records[num.name], records[den.name]
        row = {"kind": kind, "num": num.name, "den": den.name,
               "ratio": paired_ratio(n, d)}
        if kind == "ours/peer":
            row["memory_ratio"] = n["peak_above_baseline_mb"] / d["peak_above_baseline_mb"]
        out.append(row)
    return out


def _versions(infos: list[dict], keys: tuple[str, ...]) -> dict:
    return {k: i[k] for i in infos for k in keys if k in i}


def _list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2, help="steps per worker per round")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {list(CONFIGS)}")
    parser.add_argument("--dropout", default="on,off", help="on, off or both")
    parser.add_argument("--dtypes", default=",".join(vs.DTYPES), help=f"subset of {vs.DTYPES}")
    parser.add_argument("--paths", default=",".join(vs.PATHS),
                        help=f"ours: subset of {vs.PATHS} (the first carries the A/Bs)")
    parser.add_argument("--prngs", default=",".join(vs.PRNGS),
                        help=f"ours' dropout PRNGs, {vs.PRNGS}; the first is the baseline")
    parser.add_argument("--xla_flags", "--xla-flags", default=",".join(vs.XLA_FLAGS),
                        help=f"ours' XLA flag sets, {list(vs.XLA_FLAGS)} or '--flag=value'; "
                        "the first is the baseline (added to the environment's XLA_FLAGS)")
    parser.add_argument("--max-workers", type=int, default=8,
                        help="worker processes alive at once (~1 GB each)")
    parser.add_argument("--torch-python", default="/work/refenv/bin/python")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant = vs.Variant.parse(args.variant)
        with np.load(args.inputs, allow_pickle=False) as f:
            inputs = {k: f[k] for k in f.files}
        build, preload = ((ours_build, ("jax", "lowrank")) if variant.framework == "ours" else
                          (peer_build, ("torch", "transformers", "peft")))
        serve(lambda: build(variant, args.model_dir, inputs), preload)
        return

    dropout = {"on": [True], "off": [False]}
    try:
        dropouts = [d for x in _list(args.dropout) for d in dropout[x]]
        prngs, xlas = _list(args.prngs), _list(args.xla_flags)
        variants = vs.expand(_list(args.configs), dropouts, _list(args.dtypes),
                             _list(args.paths), prngs, xlas)
        groups = vs.groups(variants, args.max_workers)
    except (KeyError, ValueError) as e:
        parser.error(str(e))
    from lowrank import assets

    model_dir = str(assets.minilm_dir())
    base_flags = os.environ.get("XLA_FLAGS", "")
    meta = {"format": 2, "machine": platform.platform(), "cpu": cpu_info(),
            "xla_flags_env": base_flags, "commit": git_commit(), "rounds": args.rounds,
            "reps": args.reps, "batch": [BATCH, SEQ], "rank": RANK,
            "baseline": {"prng": prngs[0], "xla": xlas[0]},
            "load_before": [round(x, 2) for x in os.getloadavg()], "groups": []}
    records, failed, infos = {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.npz"
        make_inputs(inputs)
        for g, group in enumerate(groups):
            workers = {}
            try:
                for v in group:
                    python = sys.executable if v.framework == "ours" else args.torch_python
                    env = ({"XLA_FLAGS": f"{base_flags} {vs.xla_flags(v.xla)}".strip()}
                           if v.framework == "ours" else {})
                    cmd = [python, "-m", "benchmarks.peers.minilm_step", "--worker", "--variant",
                           v.name, "--model-dir", model_dir, "--inputs", str(inputs)]
                    try:
                        workers[v.name] = Worker(cmd, env)
                    except RuntimeError as e:  # reported, and the group runs without it
                        failed[v.name] = str(e)
                        print(f"FAILED {v.name}: {e}", file=sys.stderr)
                before = os.getloadavg()
                result = alternate(workers, args.rounds, args.reps)
                meta["groups"].append({"variants": list(workers), "load_before": [
                    round(x, 2) for x in before], "load_after": [
                    round(x, 2) for x in os.getloadavg()]})
                for name, w in workers.items():
                    records[name] = {**dataclasses.asdict(vs.Variant.parse(name)),
                                     **measured(w, result[name], g)}
                    infos.append(w.info)
                print(f"group {g + 1}/{len(groups)} done: {', '.join(workers)}", flush=True)
            finally:
                for w in workers.values():
                    w.close()
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    meta["ours"] = _versions(infos, ("jax", "backend"))
    meta["peer"] = _versions(infos, ("torch", "transformers", "peft", "bitsandbytes",
                                     "threads", "attn_implementation"))
    out = {"meta": meta, "variants": records, "failed": failed,
           "ratios": ratios(records, prngs[0], xlas[0])}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    from benchmarks.peers import report_matrix

    print(report_matrix.run_tables(out))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
