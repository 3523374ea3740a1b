"""Model selection on a validation split: the best evaluation point, scored on the test split.

With ``config.eval.select`` set to a metric ("accuracy", "loss" or "perplexity"), each
evaluation of ``task.eval_batches`` (the validation split) that improves on the best so far is
followed by one pass over ``task.test_batches``: the test metrics and the per-example scores
(predictions and correctness, or each sequence's loss) *at the best validation point* are what
the run reports, as a paper's protocol asks, without keeping a copy of the weights.

The best point is written to ``<workdir>/best.json`` whenever it changes, so a resumed run
keeps it (a point found after the checkpoint it resumes from is found again, identically).

>>> better("accuracy", {"accuracy": 0.9}, {"accuracy": 0.8}), better("loss", {"loss": 2}, None)
(True, True)
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lowrank.train.evaluate import evaluate
from lowrank.train.losses import SCORES
from lowrank.train.precision import cast_floating

DIRECTIONS = {"accuracy": "max", "loss": "min", "perplexity": "min"}
"""The metrics a run can select on, and which way is better."""

BEST_FILE = "best.json"


@dataclasses.dataclass
class BestPoint:
    """The evaluation with the best validation metric so far.

    Attributes:
      step: the optimizer step it was taken after.
      validation: its validation metrics.
      test: the test metrics at that step (None without ``task.test_batches``).
      scores: per-example test scores ``{name: list}`` (``prediction``/``correct`` for
        classification, ``nll``/``tokens`` per sequence for LM; None for other losses).
    """

    step: int
    validation: dict[str, float]
    test: dict[str, float] | None = None
    scores: dict[str, list] | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def better(metric: str, new: Mapping[str, float], best: Mapping[str, float] | None) -> bool:
    """Whether ``new[metric]`` beats ``best[metric]`` (strictly: ties keep the earlier point).

    >>> better("perplexity", {"perplexity": 5.0}, {"perplexity": 5.0})
    False
    """
    if best is None:
        return True
    if DIRECTIONS[metric] == "max":
        return new[metric] > best[metric]
    return new[metric] < best[metric]


def check_select(select: str | None) -> None:
    """A ValueError naming a ``config.eval.select`` that is not a selectable metric.

    >>> check_select("f1")
    Traceback (most recent call last):
    ...
    ValueError: config.eval.select 'f1' is not one of ('accuracy', 'loss', 'perplexity') or None
    """
    if select is not None and select not in DIRECTIONS:
        raise ValueError(f"config.eval.select {select!r} is not one of {tuple(DIRECTIONS)} "
                         "or None")


def make_score_step(model: Any, forward: Callable, loss: Any, *,
                    compute_dtype: Any = None) -> Callable | None:
    """``score_step(trainable, frozen, batch) -> {name: [B] array}``: per-example scores of a
    named loss (see ``lowrank.train.losses.SCORES``), no dropout; None for a custom loss.

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> from lowrank.train.task import default_forward
    >>> model = nn.Dense(2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> step = make_score_step(model, default_forward, "classification")
    >>> sorted(step({}, params, {"inputs": jnp.ones((4, 3)), "labels": jnp.zeros(4, int)}))
    ['correct', 'prediction']
    """
    if not isinstance(loss, str) or loss not in SCORES:
        return None
    scores_of = SCORES[loss]

    def score_step(trainable, frozen, batch):
        if compute_dtype is not None:
            trainable, frozen, batch = cast_floating((trainable, frozen, batch), compute_dtype)
        return scores_of(forward(model, frozen, trainable, batch, None), batch)

    return score_step


def per_example_scores(score_step: Callable, trainable: Any, frozen: Any,
                       batches: Iterable[Mapping[str, Any]]) -> dict[str, list]:
    """The scores of every real example of ``batches`` in order (rows whose ``valid`` is
    False, the padding of ``lowrank.data.eval_batches``, left out), as lists.

    >>> step = lambda t, f, b: {"x": b["x"] * 2}
    >>> per_example_scores(step, {}, {}, [{"x": np.array([1, 2]), "valid": np.array([1, 0])}])
    {'x': [2]}
    """
    parts: dict[str, list] = {}
    for batch in batches:
        scores = jax.device_get(score_step(trainable, frozen, batch))
        keep = np.asarray(batch["valid"], bool) if "valid" in batch else slice(None)
        for name, value in scores.items():
            parts.setdefault(name, []).append(np.asarray(value)[keep])
    return {name: np.concatenate(values).tolist() for name, values in parts.items()}


class Selector:
    """Keeps the best validation point of one run (see the module docstring).

    Args:
      metric: the ``config.eval.select`` metric.
      test_batches: ``() -> iterable of batches`` of the test split, or None.
      score_step: from :func:`make_score_step` (jitted), or None.
      workdir: where ``best.json`` is kept, or None.
      start: the step the run starts (or resumes) from: a stored point after it is dropped.
    """

    def __init__(self, metric: str, test_batches: Callable[[], Iterable] | None,
                 score_step: Callable | None, workdir: str | Path | None, start: int = 0):
        check_select(metric)
        self.metric, self.test_batches, self.score_step = metric, test_batches, score_step
        self.file = Path(workdir) / BEST_FILE if workdir is not None else None
        self.best: BestPoint | None = None
        if self.file is not None and self.file.is_file() and start > 0:
            stored = BestPoint(**json.loads(self.file.read_text()))
            self.best = stored if stored.step <= start else None

    def observe(self, step: int, validation: dict[str, float], eval_step: Callable,
                trainable: Any, frozen: Any) -> bool:
        """Records ``validation`` (the metrics of ``step``) if it is the best so far, scoring
        the test split at it; returns whether it was."""
        if self.metric not in validation:
            raise ValueError(f"config.eval.select {self.metric!r} is not among the evaluation "
                             f"metrics {sorted(validation)}")
        if not better(self.metric, validation,
                      self.best.validation if self.best is not None else None):
            return False
        test = scores = None
        if self.test_batches is not None:
            test = evaluate(eval_step, trainable, frozen, self.test_batches())
            if self.score_step is not None:
                scores = per_example_scores(self.score_step, trainable, frozen,
                                            self.test_batches())
        self.best = BestPoint(step, dict(validation), test, scores)
        if self.file is not None:
            _write_json_atomically(self.file, self.best.to_json())
        return True


def _write_json_atomically(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)
