"""The eval loop: loss and accuracy (classification) or perplexity (LM) over many batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np


def evaluate(
    eval_step: Callable, trainable: Any, frozen: Any, batches: Iterable[Mapping[str, Any]]
) -> dict[str, float]:
    """Metrics over all ``batches``: each batch's means weighted by its ``weight`` (examples
    or target tokens), so unequal batches combine exactly; perplexity is ``exp`` of the mean
    loss, never a mean of perplexities. ``weight`` in the result is the total.

    >>> def eval_step(trainable, frozen, batch):
    ...     return {"loss": batch["loss"], "weight": batch["n"]}
    >>> evaluate(eval_step, {}, {}, [{"loss": 1.0, "n": 1.0}, {"loss": 4.0, "n": 3.0}])
    {'loss': 3.25, 'weight': 4.0}
    """
    totals: dict[str, float] = {}
    weight_sum = 0.0
    for batch in batches:
        metrics = jax.device_get(eval_step(trainable, frozen, batch))
        if "weight" in metrics:
            weight = float(metrics["weight"])
        else:  # a custom loss without a count: its batch's leading axis
            weight = float(np.shape(next(iter(batch.values())))[0])
        weight_sum += weight
        for name, value in metrics.items():
            if name != "weight":
                totals[name] = totals.get(name, 0.0) + weight * float(value)
    if weight_sum == 0:
        raise ValueError("evaluation got no batches (or only empty ones)")
    out = {name: total / weight_sum for name, total in totals.items()}
    if "perplexity" in out:
        out["perplexity"] = math.exp(out["loss"])
    out["weight"] = weight_sum
    return out
