"""Analysing learnt adapters as the LoRA paper does (Hu et al. 2021, section 7): how much two
adapters' subspaces overlap, how strongly an update amplifies directions of the base weight,
and how many directions an update really uses.

Matrices follow lowrank's ``x @ W`` orientation: a kernel is ``[in, out]`` and an adapter's
``a`` is ``[in, r]``, so the subspace an adapter reads from is spanned by the *columns* of
``a`` (the paper's ``A`` is ``[r, in]`` and it takes right-singular vectors: the same space).

>>> import jax.numpy as jnp
>>> a = jnp.eye(6)[:, :3]
>>> float(subspace_similarity(a, a, 3, 3))
1.0
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array


def _left_singular(m: Array) -> Array:
    if m.ndim != 2:
        raise ValueError(f"expected a matrix [dim, r], got shape {m.shape}")
    u, _, _ = jnp.linalg.svd(jnp.asarray(m, jnp.float32), full_matrices=False)
    return u


def subspace_similarity(a1: Array, a2: Array, i: int, j: int) -> Array:
    """The LoRA paper's normalised subspace similarity

        phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)

    where ``U1``, ``U2`` are the left-singular vectors of ``a1`` ``[d, r1]`` and ``a2``
    ``[d, r2]`` (their top directions first). 1 when the top-``i`` directions of one span
    contain the top-``j`` of the other (or vice versa), 0 when they are orthogonal.

    Args:
      a1, a2: matrices with the same number of rows (an adapter's ``a``; for ``b [r, out]``
        pass ``b.T``).
      i, j: how many top directions of each to compare, ``1 <= i <= r1``, ``1 <= j <= r2``.

    >>> import jax
    >>> a = jax.random.normal(jax.random.key(0), (16, 4))
    >>> round(float(subspace_similarity(a, a @ jnp.diag(jnp.arange(1.0, 5.0)), 4, 4)), 5)
    1.0
    """
    if a1.ndim != 2 or a2.ndim != 2 or a1.shape[0] != a2.shape[0]:
        raise ValueError(f"a1 {a1.shape} and a2 {a2.shape} must be matrices with the same "
                         "number of rows (the dimension their columns live in)")
    r1, r2 = min(a1.shape), min(a2.shape)
    if not (1 <= i <= r1 and 1 <= j <= r2):
        raise ValueError(f"i={i} and j={j} must lie in 1..{r1} and 1..{r2} (the ranks of a1 "
                         "and a2)")
    u1, u2 = _left_singular(a1)[:, :i], _left_singular(a2)[:, :j]
    return jnp.sum((u1.T @ u2) ** 2) / min(i, j)


def subspace_similarity_grid(a1: Array, a2: Array) -> Array:
    """``phi(a1, a2, i, j)`` for every ``i`` in ``1..r1`` and ``j`` in ``1..r2``: the
    ``[r1, r2]`` grid the paper draws as a heatmap (Figure 3).

    >>> grid = subspace_similarity_grid(jnp.eye(5)[:, :2], jnp.eye(5)[:, :3])
    >>> grid.shape, float(grid[1, 2])
    ((2, 3), 1.0)
    """
    if a1.ndim != 2 or a2.ndim != 2 or a1.shape[0] != a2.shape[0]:
        raise ValueError(f"a1 {a1.shape} and a2 {a2.shape} must be matrices with the same "
                         "number of rows")
    u1, u2 = _left_singular(a1), _left_singular(a2)
    overlap = (u1.T @ u2) ** 2  # [r1, r2]
    # ||U1[:, :i]^T U2[:, :j]||_F^2 is the sum of the top-left i x j block.
    cumulative = jnp.cumsum(jnp.cumsum(overlap, axis=0), axis=1)
    i = jnp.arange(1, overlap.shape[0] + 1)[:, None]
    j = jnp.arange(1, overlap.shape[1] + 1)[None, :]
    return cumulative / jnp.minimum(i, j)


def amplification_factor(delta_w: Array, w: Array, rank: int | None = None) -> Array:
    """How much ``delta_w`` amplifies the directions of ``w`` it works on (LoRA paper, 7.3):

        ||delta_w||_F / ||U^T w V||_F

    with ``U`` ``[in, r]`` and ``V`` ``[out, r]`` the top-``rank`` left and right singular
    vectors of ``delta_w`` (``rank``: its numerical rank by default). Large when the update
    strengthens directions that ``w`` barely uses.

    Args:
      delta_w: the update ``[in, out]`` (``s * a @ b`` of an adapter).
      w: the base weight, same shape.
      rank: how many singular directions of ``delta_w`` to project on.

    >>> w = jnp.diag(jnp.array([4.0, 1.0, 1.0]))
    >>> dw = 2.0 * jnp.outer(jnp.array([0.0, 1.0, 0.0]), jnp.array([0.0, 1.0, 0.0]))
    >>> float(amplification_factor(dw, w))  # ||dw|| = 2, w along that direction = 1
    2.0
    """
    if delta_w.shape != w.shape or delta_w.ndim != 2:
        raise ValueError(f"delta_w {delta_w.shape} and w {w.shape} must be matrices of the "
                         "same shape")
    u, s, vt = jnp.linalg.svd(jnp.asarray(delta_w, jnp.float32), full_matrices=False)
    if rank is None:
        rank = int(jnp.sum(s > s[0] * max(delta_w.shape) * jnp.finfo(jnp.float32).eps))
    if not 1 <= rank <= s.shape[0]:
        raise ValueError(f"rank must lie in 1..{s.shape[0]}, got {rank}")
    projected = u[:, :rank].T @ jnp.asarray(w, jnp.float32) @ vt[:rank].T
    return jnp.linalg.norm(delta_w) / jnp.linalg.norm(projected)


def effective_rank(m: Array) -> Array:
    """Roy & Vetterli's effective rank: ``exp`` of the entropy of the normalised singular
    values ``p_k = s_k / sum(s)``. Between 1 (one direction) and ``min(m.shape)`` (all
    singular values equal).

    >>> float(effective_rank(jnp.eye(4)))
    4.0
    >>> round(float(effective_rank(jnp.diag(jnp.array([1.0, 0.0, 0.0])))), 6)
    1.0
    """
    if m.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {m.shape}")
    s = jnp.linalg.svd(jnp.asarray(m, jnp.float32), compute_uv=False)
    total = jnp.sum(s)
    if float(total) == 0.0:
        raise ValueError("the effective rank of a zero matrix is undefined")
    p = s / total
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy)
