"""Losses over model outputs: ``fn(outputs, batch) -> (mean loss, metrics)``.

Metrics are means over the batch, plus ``weight``: how many examples (or target tokens) those
means are over, so that evaluation can combine batches of different sizes exactly. Rows where
an optional ``batch["valid"]`` is False (the padding of ``lowrank.data.eval_batches``) count
for nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[Any, Mapping[str, Any]], tuple[jax.Array, dict[str, jax.Array]]]


def _valid(batch: Mapping[str, Any], shape: tuple[int, ...]) -> jax.Array:
    valid = batch.get("valid")
    return jnp.ones(shape, jnp.float32) if valid is None else valid.astype(jnp.float32)


def classification_loss(logits: jax.Array, batch: Mapping[str, Any]):
    """Softmax cross-entropy against ``batch["labels"]`` (integers ``[B]``), and accuracy.

    >>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0]])
    >>> loss, metrics = classification_loss(logits, {"labels": jnp.array([0, 0])})
    >>> float(metrics["accuracy"]), float(metrics["weight"])
    (0.5, 2.0)
    """
    labels = batch["labels"]
    logits = logits.astype(jnp.float32)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"classification logits {logits.shape} do not fit labels {labels.shape}: "
            "expected logits [batch, classes] for labels [batch]"
        )
    valid = _valid(batch, labels.shape)
    count = valid.sum()
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = (nll * valid).sum() / jnp.maximum(count, 1.0)
    accuracy = ((logits.argmax(-1) == labels) * valid).sum() / jnp.maximum(count, 1.0)
    return loss, {"accuracy": accuracy, "weight": count}


def lm_loss(logits: jax.Array, batch: Mapping[str, Any]):
    """Next-token cross-entropy against ``batch["targets"]`` (``[B, T]``), averaged over the
    tokens where the optional ``batch["mask"]`` (``[B, T]``) is 1 and ``batch["valid"]``
    (``[B]``) is True; perplexity is ``exp`` of it.

    >>> logits = jnp.zeros((1, 3, 4))  # uniform over 4 tokens
    >>> loss, metrics = lm_loss(logits, {"targets": jnp.array([[1, 2, 3]])})
    >>> round(float(metrics["perplexity"]), 4), float(metrics["weight"])
    (4.0, 3.0)
    """
    targets = batch["targets"]
    logits = logits.astype(jnp.float32)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"LM logits {logits.shape} do not fit targets {targets.shape}: expected logits "
            "[batch, time, vocab] for targets [batch, time]"
        )
    mask = _valid(batch, targets.shape[:1])[:, None] * jnp.ones(targets.shape, jnp.float32)
    if batch.get("mask") is not None:
        mask = mask * batch["mask"].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    tokens = mask.sum()
    loss = (nll * mask).sum() / jnp.maximum(tokens, 1.0)
    return loss, {"perplexity": jnp.exp(loss), "weight": tokens}


LOSSES: dict[str, LossFn] = {"classification": classification_loss, "lm": lm_loss}


def classification_scores(logits: jax.Array, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Per example: the predicted class and whether it is right (``[B]`` each), what a paired
    test of two classifiers needs (``lowrank.stats.mcnemar``).

    >>> scores = classification_scores(jnp.array([[2.0, 0.0], [0.0, 2.0]]),
    ...                                {"labels": jnp.array([0, 0])})
    >>> scores["prediction"].tolist(), scores["correct"].tolist()
    ([0, 1], [1, 0])
    """
    prediction = logits.argmax(-1).astype(jnp.int32)
    return {"prediction": prediction,
            "correct": (prediction == batch["labels"]).astype(jnp.int32)}


def lm_scores(logits: jax.Array, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Per sequence: the summed next-token cross-entropy (``nll``) over its counted tokens
    and their number (``tokens``), so a corpus's loss is ``sum(nll) / sum(tokens)`` and a
    paired bootstrap can resample sequences.

    >>> scores = lm_scores(jnp.zeros((1, 3, 4)), {"targets": jnp.array([[1, 2, 3]])})
    >>> round(float(scores["nll"][0]), 4), scores["tokens"].tolist()
    (4.1589, [3.0])
    """
    targets = batch["targets"]
    mask = jnp.ones(targets.shape, jnp.float32)
    if batch.get("mask") is not None:
        mask = batch["mask"].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return {"nll": (nll * mask).sum(-1), "tokens": mask.sum(-1)}


SCORES: dict[str, Callable] = {"classification": classification_scores, "lm": lm_scores}


def get_loss(loss: str | LossFn) -> LossFn:
    """A loss by name ("classification", "lm"), or the callable itself.

    >>> get_loss("lm") is lm_loss
    True
    """
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; accepted: {tuple(LOSSES)} or a callable")
    return LOSSES[loss]
