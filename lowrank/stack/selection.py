"""Model selection on validation for a stack: each member keeps its own best point.

What ``lowrank.train.selection.Selector`` does for one run, for K members at once: after each
evaluation of the validation split (one stacked pass), every member whose
``config.eval.select`` metric improved is scored on the test split (metrics and per-example
scores, one stacked pass for all of them) and keeps that as its best point. The points travel
in the stack's checkpoint (``progress["best"]``), so a resumed stack ends with the points an
uninterrupted one finds.

>>> better_members("accuracy", [{"accuracy": 0.9}, {"accuracy": 0.5}],
...                [BestPoint(1, {"accuracy": 0.8}), BestPoint(1, {"accuracy": 0.6})])
[0]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lowrank.stack.step import with_multipliers
from lowrank.train.evaluate import evaluate
from lowrank.train.selection import BestPoint, better, check_select, make_score_step
from lowrank.train.task import Task


def better_members(metric: str, validation: Sequence[Mapping[str, float]],
                   best: Sequence[BestPoint | None]) -> list[int]:
    """The members whose ``validation[k][metric]`` beats their best point (ties keep the
    earlier point, as for one run)."""
    return [k for k, (new, old) in enumerate(zip(validation, best, strict=True))
            if better(metric, new, old.validation if old is not None else None)]


def make_stacked_score_step(score_step: Callable) -> Callable:
    """``score_step(stacked, frozen, batch) -> {name: [K, B]}``: each member's per-example
    scores (``lowrank.train.selection.make_score_step``) on the same batch.

    >>> step = make_stacked_score_step(lambda t, f, b: {"x": t["w"] * b["x"]})
    """

    def member(trainable, multipliers, frozen, batch):
        return score_step(with_multipliers(trainable, multipliers), frozen, batch)

    def step(stacked, frozen, batch):
        return jax.vmap(member, in_axes=(0, 0, None, None))(
            stacked.train.trainable, stacked.multipliers, frozen, batch)

    return step


def _member_scores(score_step: Callable, stacked: Any, frozen: Any, batches) -> list[dict]:
    """Each member's scores of every real example of ``batches`` (padding rows left out)."""
    parts: dict[str, list] = {}
    for batch in batches:
        scores = jax.device_get(score_step(stacked, frozen, batch))
        keep = np.asarray(batch["valid"], bool) if "valid" in batch else slice(None)
        for name, value in scores.items():
            parts.setdefault(name, []).append(np.asarray(value)[:, keep])
    joined = {name: np.concatenate(values, axis=1) for name, values in parts.items()}
    members = stacked.size
    return [{name: value[k].tolist() for name, value in joined.items()} for k in range(members)]


class StackSelector:
    """The best validation point of every member of a stack (see the module docstring).

    Args:
      metric: the members' (shared) ``config.eval.select``.
      task: the stack's task (its ``test_batches`` are scored at each improvement).
      evaluate_members: ``(stacked, batches) -> [metrics of member k]``.
      score_step: a stacked score step (:func:`make_stacked_score_step`, jitted), or None.
      best: the points restored from a checkpoint (None each: none yet).
    """

    def __init__(self, metric: str, task: Task,
                 evaluate_members: Callable[[Any, Any], list[dict[str, float]]],
                 score_step: Callable | None, best: Sequence[dict | None]):
        check_select(metric)
        self.metric, self.task = metric, task
        self.evaluate_members, self.score_step = evaluate_members, score_step
        self.best = [BestPoint(**b) if b is not None else None for b in best]

    def observe(self, step: int, stacked: Any, frozen: Any,
                validation: Sequence[Mapping[str, float]]) -> list[int]:
        """Records each member whose ``validation`` metrics (those of ``step``) beat its best,
        scoring the test split for them; returns those members."""
        if self.metric not in validation[0]:
            raise ValueError(f"config.eval.select {self.metric!r} is not among the evaluation "
                             f"metrics {sorted(validation[0])}")
        improved = better_members(self.metric, validation, self.best)
        if not improved:
            return improved
        test = scores = None
        if self.task.test_batches is not None:
            test = self.evaluate_members(stacked, self.task.test_batches())
            if self.score_step is not None:
                scores = _member_scores(self.score_step, stacked, frozen,
                                        self.task.test_batches())
        for k in improved:
            self.best[k] = BestPoint(step, dict(validation[k]),
                                     test[k] if test is not None else None,
                                     scores[k] if scores is not None else None)
        return improved

    def to_json(self) -> list[dict | None]:
        """The points as the stack's checkpoint stores them."""
        return [b.to_json() if b is not None else None for b in self.best]


def stack_selector(configs: Sequence[Any], task: Task, evaluate_members, compute_dtype,
                   best: Sequence[dict | None] | None) -> StackSelector | None:
    """A :class:`StackSelector` when the members select on validation (None otherwise).

    >>> stack_selector([{"eval": {"select": None}}], None, None, None, None) is None
    True
    """
    metric = configs[0]["eval"].get("select", None)
    if metric is None or task.eval_batches is None:
        return None
    step = make_score_step(task.model, task.forward, task.loss, compute_dtype=compute_dtype)
    score_step = jax.jit(make_stacked_score_step(step)) if step is not None else None
    return StackSelector(metric, task, evaluate_members, score_step,
                         best if best is not None else [None] * len(configs))


def member_metrics(eval_step: Callable, stacked: Any, frozen: Any,
                   batches) -> list[dict[str, float]]:
    """Each member's evaluation metrics from one stacked pass over ``batches``
    (``eval_step``: ``lowrank.stack.step.make_stacked_eval_step``, jitted)."""
    per_batch = [jax.device_get(eval_step(stacked, frozen, b)) for b in batches]

    def member(k: int) -> list[Mapping[str, float]]:
        return [{name: v[k] for name, v in m.items()} for m in per_batch]

    # ``evaluate`` combines batches by their weights; here each "batch" is already the
    # member's metrics of that batch, so the step hands it back.
    return [evaluate(lambda _t, _f, metrics: metrics, None, None, member(k))
            for k in range(stacked.size)]
