"""lowrank.analysis on constructed matrices whose answers are known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank import analysis


def _orthonormal(d, k, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q[:, :k]


def test_identical_subspaces_give_one():
    basis = _orthonormal(32, 8)
    mixed = basis @ np.random.default_rng(1).normal(size=(8, 8))  # same span, other basis
    for i, j in [(8, 8), (3, 8), (8, 5)]:
        # i <= 8 directions of one lie in the other's full 8-dim span
        assert float(analysis.subspace_similarity(basis, mixed, 8, j)) == pytest.approx(1.0,
                                                                                       abs=1e-5)
        assert float(analysis.subspace_similarity(basis, mixed, i, 8)) == pytest.approx(1.0,
                                                                                       abs=1e-5)


def test_orthogonal_subspaces_give_zero():
    q = _orthonormal(32, 12)
    a1, a2 = q[:, :4] * 3.0, q[:, 4:12]
    grid = analysis.subspace_similarity_grid(a1, a2)
    assert grid.shape == (4, 8)
    np.testing.assert_allclose(np.asarray(grid), 0.0, atol=1e-6)


def test_partial_overlap_matches_hand_computation():
    e = np.eye(6)
    # a1 spans e0 (strongest), e1; a2 spans e0, e2: overlap of the top-2 spans is 1 direction.
    a1 = np.stack([2 * e[0], e[1]], axis=1)
    a2 = np.stack([3 * e[0], e[2]], axis=1)
    assert float(analysis.subspace_similarity(a1, a2, 2, 2)) == pytest.approx(0.5, abs=1e-6)
    assert float(analysis.subspace_similarity(a1, a2, 1, 1)) == pytest.approx(1.0, abs=1e-6)
    grid = np.asarray(analysis.subspace_similarity_grid(a1, a2))
    np.testing.assert_allclose(grid, [[1.0, 1.0], [1.0, 0.5]], atol=1e-6)


def test_grid_equals_pointwise_definition():
    k1, k2 = jax.random.split(jax.random.key(0))
    a1, a2 = jax.random.normal(k1, (20, 4)), jax.random.normal(k2, (20, 6))
    grid = analysis.subspace_similarity_grid(a1, a2)
    for i in (1, 3, 4):
        for j in (1, 2, 6):
            assert float(grid[i - 1, j - 1]) == pytest.approx(
                float(analysis.subspace_similarity(a1, a2, i, j)), abs=1e-5)


def test_amplification_factor_known_value():
    # w has singular values 10 (e0 -> f0) and 0.5 (e1 -> f1); the update scales the weak
    # direction by 4: ||dW|| = 4 * 0.5 = 2, and w along it is 0.5, so the factor is 4.
    u, v = _orthonormal(5, 5, seed=2), _orthonormal(3, 3, seed=3)
    w = 10.0 * np.outer(u[:, 0], v[:, 0]) + 0.5 * np.outer(u[:, 1], v[:, 1])
    dw = 2.0 * np.outer(u[:, 1], v[:, 1])
    assert float(analysis.amplification_factor(jnp.asarray(dw), jnp.asarray(w))) == \
        pytest.approx(4.0, rel=1e-4)
    # An update along w's strongest direction amplifies little: 2 / 10.
    dw_strong = 2.0 * np.outer(u[:, 0], v[:, 0])
    assert float(analysis.amplification_factor(dw_strong, w)) == pytest.approx(0.2, rel=1e-4)


def test_effective_rank_known_values():
    assert float(analysis.effective_rank(jnp.eye(5))) == pytest.approx(5.0, rel=1e-5)
    # singular values 3, 1: p = (0.75, 0.25), entropy = -(.75 ln .75 + .25 ln .25)
    m = jnp.diag(jnp.array([3.0, 1.0, 0.0]))
    expected = np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert float(analysis.effective_rank(m)) == pytest.approx(expected, rel=1e-5)
    low = _orthonormal(16, 2) @ _orthonormal(8, 2, seed=5).T  # rank 2, equal singular values
    assert float(analysis.effective_rank(low)) == pytest.approx(2.0, rel=1e-4)


def test_bad_input_is_named():
    a = jnp.ones((6, 2))
    with pytest.raises(ValueError, match="i=3 and j=1 must lie in 1..2"):
        analysis.subspace_similarity(a, a, 3, 1)
    with pytest.raises(ValueError, match="same number of rows"):
        analysis.subspace_similarity(a, jnp.ones((5, 2)), 1, 1)
    with pytest.raises(ValueError, match="same shape"):
        analysis.amplification_factor(jnp.ones((2, 3)), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="zero matrix"):
        analysis.effective_rank(jnp.zeros((3, 3)))
