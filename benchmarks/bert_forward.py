"""Forward pass of our BERT on all-MiniLM-L6-v2 vs transformers' BertModel in torch.

Batch 32 x 128 tokens (the first 32 BBC News articles, truncated), float32, CPU. One worker
process per framework (ours in this environment, torch in the reference environment) holds
its compiled/loaded model; the driver asks them for repetitions in alternation, so that the
machine's noise hits both alike. It reports the median time per forward pass of each, their
ratio, and the largest difference between the two outputs.

    .venv/bin/python benchmarks/bert_forward.py --rounds 10 --reps 3
    .venv/bin/python benchmarks/bert_forward.py --torch-python /work/refenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH, SEQ = 32, 128


def jax_worker(model_dir: str, inputs: dict[str, np.ndarray]):
    import jax

    from lowrank import models

    model, params = models.from_pretrained(model_dir)
    forward = jax.jit(lambda p, ids, mask, types: model.apply(
        {"params": p}, ids, mask, types).last_hidden_state)
    args = (inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])

    def run():
        return np.asarray(forward(params, *args).block_until_ready())

    return run, {"jax": jax.__version__, "backend": jax.default_backend()}


def torch_worker(model_dir: str, inputs: dict[str, np.ndarray]):
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.BertModel.from_pretrained(model_dir).eval()
    args = {k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()}

    def run():
        with torch.inference_mode():
            return model(**args).last_hidden_state.numpy()

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "attn_implementation": model.config._attn_implementation}
    return run, info


def serve(kind: str, model_dir: str, inputs_file: str, output_file: str) -> None:
    """Worker loop: warm up, then for each line "n" on stdin time n forwards and reply."""
    with np.load(inputs_file, allow_pickle=False) as f:
        inputs = {k: f[k] for k in f.files}
    run, info = (jax_worker if kind == "jax" else torch_worker)(model_dir, inputs)
    np.save(output_file, run())  # also the warm-up (and jit compile) run
    run()
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)


def make_inputs(path: Path) -> None:
    from lowrank import assets, data

    articles = data.load_bbc().texts[:BATCH]
    batch = data.encode(data.load_tokenizer(assets.minilm_dir(), max_length=SEQ), articles)
    np.savez(path, **batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3, help="forwards per worker per round")
    parser.add_argument("--torch-python", default="/work/refenv/bin/python")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(args.worker, args.model_dir, args.inputs, args.output)
        return

    from lowrank import assets

    model_dir = str(assets.minilm_dir())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_inputs(tmp / "inputs.npz")
        workers, info = {}, {}
        for kind, python in (("jax", sys.executable), ("torch", args.torch_python)):
            cmd = [python, __file__, "--worker", kind, "--model-dir", model_dir,
                   "--inputs", str(tmp / "inputs.npz"), "--output", str(tmp / f"{kind}.npy")]
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            workers[kind] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             text=True, env=env)
            info[kind] = json.loads(workers[kind].stdout.readline())  # after warm-up
        times: dict[str, list[float]] = {"jax": [], "torch": []}
        paired = []  # per round: its median ours / its median torch, robust to load drift
        for r in range(args.rounds):
            order = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")
            this_round = {}
            for kind in order:
                workers[kind].stdin.write(f"{args.reps}\n")
                workers[kind].stdin.flush()
                this_round[kind] = json.loads(workers[kind].stdout.readline())
                times[kind] += this_round[kind]
            paired.append(np.median(this_round["jax"]) / np.median(this_round["torch"]))
        for w in workers.values():
            w.stdin.close()
            w.wait()
        diff = float(np.max(np.abs(np.load(tmp / "jax.npy") - np.load(tmp / "torch.npy"))))

    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"ours:  {info['jax']}")
    print(f"torch: {info['torch']}")
    print(f"batch {BATCH} x {SEQ} tokens, float32, {args.rounds} rounds x {args.reps} reps")
    for k in ("jax", "torch"):
        q1, q3 = np.percentile(times[k], [25, 75])
        print(f"  {k:5s} median {1e3 * med[k]:7.1f} ms  (IQR {1e3 * q1:.1f}-{1e3 * q3:.1f})")
    print(f"  ratio ours / torch = {med['jax'] / med['torch']:.3f} (of medians), "
          f"{np.median(paired):.3f} (median of per-round ratios)")
    print(f"  max |ours - torch| over the last hidden state = {diff:.2e}")


if __name__ == "__main__":
    main()
