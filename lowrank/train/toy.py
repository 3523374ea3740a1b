"""Tiny synthetic tasks for tests, benchmarks and examples: they run in seconds on a CPU.

``classifier``: an MLP labels Gaussian features by a fixed random teacher (learnable).
``lm``: an embedding-MLP language model on sequences that count up modulo the vocabulary.
Both read optional settings from ``config.toy`` (width, depth, features, classes, vocab,
length, base_seed, examples, eval_examples, test_examples). Batches come from
``lowrank.data``: training batch ``step`` is ``batch_at(dataset, step, batch_size, seed)``, a
function of (seed, step).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import data
from lowrank.train.task import Task

_DEFAULTS = dict(
    width=32, depth=2, features=16, classes=8, vocab=32, length=8, base_seed=0, examples=512,
    eval_examples=64, test_examples=64,
)


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


def _task(config, model, params, make_dataset, loss, source) -> Task:
    s = _settings(config)
    rng = np.random.default_rng(s["base_seed"])
    train_set, eval_set = make_dataset(rng, s["examples"]), make_dataset(rng, s["eval_examples"])
    test_set = make_dataset(rng, s["test_examples"])  # drawn last: the other two stay as they were
    batch_size = config.batch_size

    train_batch, train_rows = data.sampler(train_set, batch_size)

    def eval_batches():
        return data.eval_batches(eval_set, batch_size)

    def test_batches():
        return data.eval_batches(test_set, batch_size)

    settings = ", ".join(f"{k}={v}" for k, v in s.items() if k != "test_examples")
    return Task(model, params, train_batch, loss, eval_batches, source=f"{source}({settings})",
                test_batches=test_batches, train_rows=train_rows)


def classifier(config: Any) -> Task:
    """The toy classification task for ``config.batch_size`` examples per step.

    >>> import ml_collections
    >>> task = classifier(ml_collections.ConfigDict({"batch_size": 8}))
    >>> b = task.train_batch(0, 3)
    >>> b["inputs"].shape, bool((b["labels"] == task.train_batch(0, 3)["labels"]).all())
    ((8, 16), True)
    """
    s = _settings(config)
    model = MLP(s["width"], s["depth"], s["classes"])
    params = jax.jit(model.init)(jax.random.key(s["base_seed"]), jnp.zeros((1, s["features"])))
    params = params["params"]
    teacher = np.random.default_rng(s["base_seed"] + 1).normal(size=(s["features"], s["classes"]))

    def dataset(rng, n):
        x = rng.normal(size=(n, s["features"])).astype(np.float32)
        return {"inputs": x, "labels": (x @ teacher).argmax(-1).astype(np.int32)}

    return _task(config, model, params, dataset, "classification", "lowrank.train.toy:classifier")


def lm(config: Any) -> Task:
    """The toy language-modelling task: each sequence counts up from a random token.

    >>> import ml_collections
    >>> task = lm(ml_collections.ConfigDict({"batch_size": 2}))
    >>> b = task.train_batch(0, 0)
    >>> bool((b["targets"][:, :-1] == b["inputs"][:, 1:]).all())
    True
    """
    s = _settings(config)
    model = TinyLM(s["vocab"], s["width"], s["depth"])
    tokens = jnp.zeros((1, s["length"]), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(s["base_seed"]), tokens)["params"]
    positions = np.arange(s["length"] + 1)

    def dataset(rng, n):
        seq = ((rng.integers(0, s["vocab"], size=(n, 1)) + positions) % s["vocab"])
        return {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32)}

    return _task(config, model, params, dataset, "lm", "lowrank.train.toy:lm")
