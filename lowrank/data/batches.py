"""Batches whose order is a pure function of (seed, step), so a resumed run sees the same ones.

Step ``s`` falls in epoch ``s // steps_per_epoch``; each epoch visits the examples in the order
of ``np.random.default_rng([seed, epoch]).permutation(n)``, dropping the incomplete last batch.

>>> data = {"x": np.arange(10)}
>>> batch_at(data, step=7, batch_size=4, seed=0)["x"].shape
(4,)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np


def num_examples(dataset: Mapping[str, np.ndarray]) -> int:
    """The common leading dimension of the dataset's arrays (an error if they disagree).

    >>> num_examples({"x": np.zeros((5, 2)), "y": np.zeros(5)})
    5
    """
    if not dataset:
        raise ValueError("the dataset has no arrays")
    sizes = {k: len(v) for k, v in dataset.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"dataset arrays disagree on the number of examples: {sizes}")
    return next(iter(sizes.values()))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches in one pass over ``n`` examples.

    >>> steps_per_epoch(10, 4)
    2
    """
    if batch_size < 1 or batch_size > n:
        raise ValueError(
            f"batch_size must lie in 1..{n} (the number of examples), got {batch_size}"
        )
    return n // batch_size


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Example indices of batch ``step``.

    >>> batch_indices(10, 0, 4, seed=0).shape
    (4,)
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, i = divmod(step, steps_per_epoch(n, batch_size))
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[i * batch_size:(i + 1) * batch_size]


def batch_at(
    dataset: Mapping[str, np.ndarray], step: int, batch_size: int, seed: int,
    rows: slice | None = None,
) -> dict[str, np.ndarray]:
    """Batch ``step`` of ``dataset`` (a dict of arrays sharing their leading dimension); with
    ``rows``, only those rows of it (gathered alone: a process of a multi-process run loads
    its share).

    >>> batch_at({"x": np.arange(10)}, 0, 2, seed=1)["x"].tolist() == \\
    ...     batch_at({"x": np.arange(10)}, 0, 2, seed=1)["x"].tolist()
    True
    >>> whole = batch_at({"x": np.arange(10)}, 3, 4, seed=0)["x"]
    >>> bool((batch_at({"x": np.arange(10)}, 3, 4, seed=0, rows=slice(2, 4))["x"]
    ...       == whole[2:4]).all())
    True
    """
    idx = batch_indices(num_examples(dataset), step, batch_size, seed)
    if rows is not None:
        idx = idx[rows]
    return {k: np.asarray(v)[idx] for k, v in dataset.items()}


def sampler(dataset: Mapping[str, np.ndarray], batch_size: int) -> tuple[
        Callable[[int, int], dict], Callable[[int, int, slice], dict]]:
    """``(train_batch, train_rows)`` over ``dataset``, as ``lowrank.train.Task`` takes them:
    ``train_batch(seed, step)`` is :func:`batch_at`, ``train_rows(seed, step, rows)`` only
    the rows ``rows`` of that batch.

    >>> train_batch, train_rows = sampler({"x": np.arange(10)}, 4)
    >>> train_batch(0, 3)["x"][1:3].tolist() == train_rows(0, 3, slice(1, 3))["x"].tolist()
    True
    """
    def train_batch(seed: int, step: int) -> dict[str, np.ndarray]:
        return batch_at(dataset, step, batch_size, seed)

    def train_rows(seed: int, step: int, rows: slice) -> dict[str, np.ndarray]:
        return batch_at(dataset, step, batch_size, seed, rows)

    return train_batch, train_rows


class Batches:
    """Training batches: ``.at(step)`` for any step, iteration from ``start_step`` on.

    >>> batches = Batches({"x": np.arange(10)}, batch_size=4, seed=0)
    >>> resumed = iter(Batches({"x": np.arange(10)}, 4, seed=0, start_step=3))
    >>> bool((next(resumed)["x"] == batches.at(3)["x"]).all())
    True
    """

    def __init__(
        self, dataset: Mapping[str, np.ndarray], batch_size: int, seed: int, start_step: int = 0
    ):
        self.dataset = {k: np.asarray(v) for k, v in dataset.items()}
        self.num_examples = num_examples(self.dataset)
        self.steps_per_epoch = steps_per_epoch(self.num_examples, batch_size)
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step

    def at(self, step: int) -> dict[str, np.ndarray]:
        return batch_at(self.dataset, step, self.batch_size, self.seed)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        step = self.start_step
        while True:
            yield self.at(step)
            step += 1


def eval_batches(
    dataset: Mapping[str, np.ndarray], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, in batches of one shape: the last batch is filled up by
    repeating its first example, and ``valid`` (bool) marks the real rows.

    >>> [int(b["valid"].sum()) for b in eval_batches({"x": np.arange(5)}, 2)]
    [2, 2, 1]
    """
    n = num_examples(dataset)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        valid = np.ones(batch_size, bool)
        valid[len(idx):] = False
        idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        yield {**{k: np.asarray(v)[idx] for k, v in dataset.items()}, "valid": valid}
