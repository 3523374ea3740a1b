"""optax optimizers over the adapters tree: AdamW with a decay mask, LoRA+, clipping.

Freezing is done by not differentiating the frozen tree at all, never with ``optax.masked``
(which passes masked-out gradients through unchanged as updates).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from lowrank import paths

Schedule = float | Callable[[Any], Any]


def lora_labels(adapters: Any) -> Any:
    """Labels each leaf ``"lora_b"`` (the B of a LoraPair) or ``"rest"``.

    >>> import jax.numpy as jnp
    >>> from lowrank.lora import LoraPair
    >>> lora_labels({"k": LoraPair(jnp.ones((2, 1)), jnp.ones((1, 2)))})["k"].b
    'lora_b'
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "lora_b" if paths.key_name(path[-1]) == "b" else "rest", adapters
    )


def group_labels(adapters: Any, lr_multipliers: Sequence[tuple[str, float]],
                 loraplus: bool) -> Any:
    """Labels each leaf by the first ``lr_multipliers`` regex that fullmatches its '/'-joined
    path (``"group<i>"``), else ``"lora_b"`` (a B factor, under LoRA+) or ``"rest"``.

    >>> import jax.numpy as jnp
    >>> tree = {"classifier": {"kernel": jnp.ones((2, 2))}, "body": {"kernel": jnp.ones(2)}}
    >>> group_labels(tree, [("classifier/.*", 10.0)], loraplus=False)
    {'body': {'kernel': 'rest'}, 'classifier': {'kernel': 'group0'}}
    """
    patterns = [re.compile(pattern) for pattern, _ in lr_multipliers]

    def label(path, _):
        name = paths.path_str(path)
        for i, pattern in enumerate(patterns):
            if pattern.fullmatch(name):
                return f"group{i}"
        return "lora_b" if loraplus and paths.key_name(path[-1]) == "b" else "rest"

    return jax.tree_util.tree_map_with_path(label, adapters)


def decay_mask(adapters: Any) -> Any:
    """True for leaves that get weight decay: matrices (LoRA factors, kernels), not biases
    or norm scales.

    >>> import jax.numpy as jnp
    >>> decay_mask({"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)})
    {'bias': False, 'kernel': True}
    """
    return jax.tree.map(lambda x: np.ndim(x) >= 2, adapters)


def _scaled(learning_rate: Schedule, ratio: float) -> Schedule:
    if callable(learning_rate):
        return lambda step: ratio * learning_rate(step)
    return ratio * learning_rate


def adamw(
    learning_rate: Schedule,
    *,
    weight_decay: float = 0.0,
    mask: Any = decay_mask,
    loraplus_ratio: float = 1.0,
    lr_multipliers: Sequence[tuple[str, float]] = (),
    clip_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """AdamW for the adapters tree.

    Args:
      learning_rate: a float or an optax schedule.
      weight_decay: decoupled weight decay, applied where ``mask`` is True.
      mask: a tree of bools or a function of the params giving one (default: matrices only).
      loraplus_ratio: LoRA+ (Hayou et al., 2024): every ``B`` factor learns at
        ``loraplus_ratio`` times the learning rate of the rest (ratio 16 is their default).
      lr_multipliers: ``(regex, multiplier)`` pairs: leaves whose '/'-joined path fullmatches
        a regex (first match wins) learn at ``multiplier`` times the learning rate, e.g.
        ``[("classifier/.*", 100.0)]`` to train a new head faster than the body it sits on.
      clip_norm: clip the global gradient norm to this before the update.

    >>> import jax.numpy as jnp
    >>> tx = adamw(1e-3, weight_decay=0.01, loraplus_ratio=16.0, clip_norm=1.0)
    >>> state = tx.init({"w": jnp.ones((2, 2))})
    """
    if loraplus_ratio <= 0:
        raise ValueError(f"loraplus_ratio must be > 0, got {loraplus_ratio!r}")

    def make(lr):
        return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)

    for pattern, multiplier in lr_multipliers:
        if not multiplier > 0:
            raise ValueError(f"lr_multipliers: the multiplier of {pattern!r} must be > 0, got "
                             f"{multiplier!r}")
        re.compile(pattern)
    if loraplus_ratio == 1.0 and not lr_multipliers:
        tx = make(learning_rate)
    else:
        transforms = {"rest": make(learning_rate),
                      "lora_b": make(_scaled(learning_rate, loraplus_ratio))}
        transforms.update({f"group{i}": make(_scaled(learning_rate, float(m)))
                           for i, (_, m) in enumerate(lr_multipliers)})
        tx = optax.multi_transform(
            transforms,
            lambda tree: group_labels(tree, lr_multipliers, loraplus_ratio != 1.0),
        )
    if clip_norm is not None:
        if clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}")
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx
