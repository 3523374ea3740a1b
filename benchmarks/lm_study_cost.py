"""What issue 15's LM study costs on this machine: one pretraining step of its decoder
(``configs/lm_domain.py:study``, 10.7M parameters, batch 128 x 128 bytes, float32, AdamW),
timed, and the pretraining's ``STUDY_PRETRAIN["steps"]`` steps projected from the median.

The step is the bare jitted update (loss, gradient, AdamW), a lower bound on the training
loop's (which adds the data sampling, logging, and an evaluation every 250 steps).

    .venv/bin/python benchmarks/lm_study_cost.py --rounds 5
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # configs/ is not installed with lowrank
    sys.path.insert(0, str(ROOT))

from configs.lm_domain import STUDY_PRETRAIN, get_config  # noqa: E402
from configs.lm_task import _llama_config  # noqa: E402
from lowrank import models  # noqa: E402


def step_fn(model, optimizer):
    """A jitted ``(params, opt_state, tokens) -> (params, opt_state, loss)``: next-byte
    cross-entropy, its gradient and one AdamW update."""

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], tokens[:, 1:]).mean()

    @jax.jit
    def step(params, opt_state, tokens):
        value, grads = jax.value_and_grad(loss)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = get_config("study")
    model = models.LlamaForCausalLM(_llama_config(config.model))
    batch, seq_len = STUDY_PRETRAIN["batch_size"], config.data.seq_len
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, 256, jnp.int32)
    params = model.init(jax.random.key(0), tokens[:1, :8])["params"]
    optimizer = optax.adamw(STUDY_PRETRAIN["learning_rate"])
    opt_state = optimizer.init(params)
    step = step_fn(model, optimizer)
    params, opt_state, loss = step(params, opt_state, tokens)  # compile
    loss.block_until_ready()
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, tokens)
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    n = sum(p.size for p in jax.tree.leaves(params))
    median, steps = float(np.median(times)), STUDY_PRETRAIN["steps"]
    print(f"machine: {platform.machine()}, {jax.device_count()} x {jax.devices()[0].platform}, "
          f"jax {jax.__version__}")
    print(f"decoder: {n / 1e6:.2f}M parameters; batch {batch} x {seq_len} tokens")
    print(f"step seconds: {', '.join(f'{t:.2f}' for t in times)} (median {median:.2f})")
    print(f"pretraining ({steps} steps): {steps * median / 3600:.1f} h at the median step")


if __name__ == "__main__":
    main()
