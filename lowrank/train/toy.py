"""Tiny synthetic tasks for tests, benchmarks and examples: they run in seconds on a CPU.

``classifier``: an MLP labels Gaussian features by a fixed random teacher (learnable).
``lm``: an embedding-MLP language model on sequences that count up modulo the vocabulary.
Both read optional settings from ``config.toy`` (width, depth, features, classes, vocab,
length, base_seed, eval_batches). Batches are a function of (seed, step) alone.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowrank.train.task import Task

_DEFAULTS = dict(
    width=32, depth=2, features=16, classes=8, vocab=32, length=8, base_seed=0, eval_batches=2
)
_EVAL_SEED = 1_000_003  # eval data never coincides with a training seed's batches


def _settings(config: Any) -> dict:
    given = dict(config.get("toy", None) or {})
    unknown = set(given) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"config.toy has unknown keys {sorted(unknown)}; accepted: "
                         f"{sorted(_DEFAULTS)}")
    return {**_DEFAULTS, **given}


class MLP(nn.Module):
    """Dense layers ``hidden_<i>`` with ReLU, then a Dense ``head``."""

    width: int
    depth: int
    out: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            x = nn.relu(nn.Dense(self.width, name=f"hidden_{i}")(x))
        return nn.Dense(self.out, name="head")(x)


class TinyLM(nn.Module):
    """Token embedding, Dense layers ``hidden_<i>`` with ReLU, logits by the tied embedding."""

    vocab: int
    width: int
    depth: int

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.width, name="embed")
        x = embed(tokens)
        for i in range(self.depth):
            x = x + nn.relu(nn.Dense(self.width, name=f"hidden_{i}")(x))
        return embed.attend(x)


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def classifier(config: Any) -> Task:
    """The toy classification task for ``config.batch_size`` examples per step.

    >>> import ml_collections
    >>> task = classifier(ml_collections.ConfigDict({"batch_size": 8}))
    >>> b = task.train_batch(0, 3)
    >>> b["inputs"].shape, bool((b["labels"] == task.train_batch(0, 3)["labels"]).all())
    ((8, 16), True)
    """
    s = _settings(config)
    batch_size = config.batch_size
    model = MLP(s["width"], s["depth"], s["classes"])
    x0 = jnp.zeros((1, s["features"]))
    params = model.init(jax.random.key(s["base_seed"]), x0)["params"]
    teacher = np.random.default_rng(s["base_seed"]).normal(size=(s["features"], s["classes"]))

    def batch(seed: int, step: int) -> dict:
        x = _rng(seed, step).normal(size=(batch_size, s["features"])).astype(np.float32)
        return {"inputs": x, "labels": (x @ teacher).argmax(-1).astype(np.int32)}

    def eval_batches():
        return [batch(_EVAL_SEED, i) for i in range(s["eval_batches"])]

    source = f"lowrank.train.toy:classifier({', '.join(f'{k}={v}' for k, v in s.items())})"
    return Task(model, params, batch, "classification", eval_batches, source=source)


def lm(config: Any) -> Task:
    """The toy language-modelling task: each sequence counts up from a random token.

    >>> import ml_collections
    >>> task = lm(ml_collections.ConfigDict({"batch_size": 2}))
    >>> b = task.train_batch(0, 0)
    >>> bool((b["targets"][:, :-1] == b["inputs"][:, 1:]).all())
    True
    """
    s = _settings(config)
    batch_size = config.batch_size
    model = TinyLM(s["vocab"], s["width"], s["depth"])
    params = model.init(jax.random.key(s["base_seed"]), jnp.zeros((1, s["length"]), jnp.int32))
    positions = np.arange(s["length"] + 1)

    def batch(seed: int, step: int) -> dict:
        start = _rng(seed, step).integers(0, s["vocab"], size=(batch_size, 1))
        seq = ((start + positions) % s["vocab"]).astype(np.int32)
        return {"inputs": seq[:, :-1], "targets": seq[:, 1:]}

    def eval_batches():
        return [batch(_EVAL_SEED, i) for i in range(s["eval_batches"])]

    source = f"lowrank.train.toy:lm({', '.join(f'{k}={v}' for k, v in s.items())})"
    return Task(model, params["params"], batch, "lm", eval_batches, source=source)
