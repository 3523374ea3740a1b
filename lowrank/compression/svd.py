"""Truncated SVDs of kernels, per slice, optionally whitened by input second moments, and the
rank rules (fixed, energy threshold, global parameter budget)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lowrank.layers import Factorization


def to_matrices(kernel: jax.Array, f: Factorization, n_lead: int) -> jax.Array:
    """The kernel as matrices ``[*lead, *batch, fan_in, fan_out]`` (contracted axes as rows),
    the layout whose truncated SVD gives factors shaped as ``A`` and ``B``.

    >>> from lowrank.layers import MATRIX
    >>> to_matrices(jnp.ones((3, 8, 4)), MATRIX, n_lead=1).shape
    (3, 8, 4)
    """
    axes = tuple(range(n_lead)) + tuple(n_lead + i for i in f.batch + f.contract + f.out)
    moved = jnp.transpose(kernel, axes)
    n_slices = n_lead + len(f.batch)
    fan_in = math.prod(moved.shape[n_slices: n_slices + len(f.contract)])
    return moved.reshape(*moved.shape[:n_slices], fan_in, -1)


def split_singular(u: jax.Array, s: jax.Array, vt: jax.Array, rank: int,
                   scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """``A, B`` with ``scale * A @ B`` the rank-``rank`` truncation ``U_r S_r V_r^T``, the
    singular values split evenly (``A = U sqrt(S / scale)``, ``B = sqrt(S / scale) V^T``) so
    both factors have the same scale (what quantizing them wants).

    >>> m = jnp.diag(jnp.array([4.0, 1.0]))
    >>> a, b = split_singular(*jnp.linalg.svd(m), rank=1)
    >>> (a @ b).tolist()
    [[4.0, 0.0], [0.0, 0.0]]
    """
    root = jnp.sqrt(s[..., :rank] / scale)
    return u[..., :, :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


def whitener(second_moment: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """``(S, S^-1)``, ``S`` the symmetric square root of the input second moment ``C`` (so
    ``||X dW||_F^2 = n ||S dW||_F^2``), its eigenvalues floored at ``damping`` times their
    mean so ``S^-1`` exists; a stack ``[..., n, n]`` gives one pair per matrix.

    >>> s, s_inv = whitener(np.diag([4.0, 1.0]), damping=1e-3)
    >>> np.round(s, 6).tolist(), np.round(s @ s_inv, 6).tolist()
    ([[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
    """
    c = np.asarray(second_moment, np.float64)
    c = 0.5 * (c + np.swapaxes(c, -1, -2))
    lam, q = np.linalg.eigh(c)  # per matrix of a stack [..., n, n]
    floor = damping * np.maximum(np.mean(np.abs(lam), axis=-1, keepdims=True),
                                 np.finfo(np.float64).tiny)
    root = np.sqrt(np.maximum(lam, floor))[..., None, :]
    qt = np.swapaxes(q, -1, -2)
    return (q * root) @ qt, (q / root) @ qt


def energy_rank(s: np.ndarray, fraction: float) -> int:
    """The smallest rank whose squared singular values keep ``fraction`` of the total.

    ``s`` is ``[..., k]``: the squared values are pooled over the leading axes (the slices of
    a stacked kernel share one rank).

    >>> energy_rank(np.array([3.0, 2.0, 1.0]), 0.9)  # 9/14 < 0.9 <= 13/14
    2
    """
    e = np.sum(np.reshape(np.asarray(s, np.float64) ** 2, (-1, np.shape(s)[-1])), axis=0)
    kept = np.cumsum(e) / e.sum()
    # A tiny tolerance: a fraction met exactly (1.0, or a sum that rounds below) counts.
    return int(min(np.searchsorted(kept, fraction - 1e-12) + 1, e.size))


def budget_ranks(spectra: Mapping[str, np.ndarray], unit_cost: Mapping[str, int],
                 max_rank: Mapping[str, int], budget: int) -> dict[str, int]:
    """Ranks under a global parameter budget: each kernel starts at rank 1, then one rank at a
    time goes to the kernel whose next singular direction keeps the most of its own energy
    per parameter, until no kernel's next rank fits; the ranks cost
    ``sum(rank * unit_cost) <= budget`` and no kernel can take one more.

    Args:
      spectra: ``{path: singular values [..., k]}`` (pooled over leading axes).
      unit_cost: ``{path: parameters one rank costs}`` (``slices * (fan_in + fan_out)``).
      max_rank: ``{path: largest rank allowed}``.
      budget: parameters the factors may hold in all.

    >>> budget_ranks({"a": np.array([4.0, 3.0, 1.0]), "b": np.array([1.0, 1.0, 1.0])},
    ...              {"a": 10, "b": 10}, {"a": 3, "b": 3}, budget=40)
    {'a': 2, 'b': 2}
    """
    ranks = {p: 1 for p in spectra}
    spent = sum(unit_cost.values())
    if spent > budget:
        raise ValueError(f"budget {budget} is below the {spent} parameters of rank 1 on every "
                         f"target ({len(spectra)} kernels); raise it or target fewer kernels")
    gains = {}
    for p, s in spectra.items():
        e = np.sum(np.reshape(np.asarray(s, np.float64) ** 2, (-1, np.shape(s)[-1])), axis=0)
        gains[p] = e / e.sum()
    heap = [(-gains[p][1] / unit_cost[p], p) for p in spectra if max_rank[p] > 1]
    heapq.heapify(heap)
    while heap:
        _, p = heapq.heappop(heap)
        if spent + unit_cost[p] > budget:
            continue  # this kernel cannot grow; cheaper ones still may
        ranks[p] += 1
        spent += unit_cost[p]
        if ranks[p] < max_rank[p]:
            heapq.heappush(heap, (-gains[p][ranks[p]] / unit_cost[p], p))
    return ranks
