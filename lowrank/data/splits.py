"""Deterministic splits that depend on names and a seed only (not on numpy, OS or file order)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def hash_order(names: Iterable[str], seed: int) -> list[str]:
    """``names`` in a pseudo-random order fixed by ``seed``: sorted by SHA-256 of seed and name.

    The same on every machine and numpy version, and adding a name leaves the relative order
    of the others unchanged.

    >>> hash_order(["a", "b", "c"], seed=0) == hash_order(["c", "b", "a"], seed=0)
    True
    """
    key = lambda name: hashlib.sha256(f"{seed}/{name}".encode()).hexdigest()  # noqa: E731
    return sorted(names, key=key)


def split_sizes(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Sizes of the parts of ``n`` items: rounded shares for all but the first part, the rest
    to the first.

    >>> split_sizes(10, (0.8, 0.1, 0.1))
    [8, 1, 1]
    """
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions}")
    rest = [round(n * f) for f in fractions[1:]]
    if sum(rest) > n:
        raise ValueError(f"cannot split {n} items by {fractions}")
    return [n - sum(rest), *rest]
