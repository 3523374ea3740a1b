"""The models' attention (hand-written backward) and exact GELU against plain autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from lowrank.models.common import dot_product_attention, gelu_exact


def _reference(query, key, value, mask=None, dropout=None):
    # Repeat k/v per query head, softmax by jax.nn, differentiate by autodiff.
    group = query.shape[2] // key.shape[2]
    key, value = jnp.repeat(key, group, axis=2), jnp.repeat(value, group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", query, key) / np.sqrt(query.shape[-1])
    if mask is not None:
        scores = jnp.where(jnp.asarray(mask)[:, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("bhts,bshd->bthd", probs, value)


def _inputs(heads, kv_heads, b=2, t=5, d=8):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t, heads, d))
    k = jax.random.normal(ks[1], (b, t, kv_heads, d))
    v = jax.random.normal(ks[2], (b, t, kv_heads, d))
    cotangent = jax.random.normal(ks[3], (b, t, heads, d))
    return q, k, v, cotangent


PADDING = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:, None, :]  # [b, 1, s]
CAUSAL = jnp.tril(jnp.ones((5, 5), bool))[None]  # [1, t, s]


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("mask", [None, PADDING, CAUSAL, CAUSAL & PADDING], ids=[
    "none", "padding", "causal", "causal+padding"])
def test_attention_and_its_gradients_match_autodiff(heads, kv_heads, mask):
    q, k, v, cot = _inputs(heads, kv_heads)
    out, vjp = jax.vjp(lambda *a: dot_product_attention(*a, mask), q, k, v)
    ref, ref_vjp = jax.vjp(lambda *a: _reference(*a, mask), q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    for got, want, name in zip(vjp(cot), ref_vjp(cot), "qkv", strict=True):
        np.testing.assert_allclose(got, want, atol=5e-6, err_msg=f"d{name}")
    assert float(jnp.abs(vjp(cot)[1]).max()) > 1e-2  # not trivially zero


def test_dropout_scales_the_probabilities_in_both_passes():
    q, k, v, cot = _inputs(4, 2)
    keep = jax.random.bernoulli(jax.random.key(9), 0.7, (2, 2, 10, 5)) / 0.7

    def ours(*a):  # the callable sees ours as [b, kv_heads, group * t, s]
        return dot_product_attention(*a, PADDING, dropout=lambda p: p * keep)

    def ref(*a):  # the same mask in the reference's [b, heads, t, s] layout
        return _reference(*a, PADDING, dropout=lambda p: p * keep.reshape(2, 4, 5, 5))

    out, vjp = jax.vjp(ours, q, k, v)
    want, ref_vjp = jax.vjp(ref, q, k, v)
    np.testing.assert_allclose(out, want, atol=2e-6)
    for got, exp in zip(vjp(cot), ref_vjp(cot), strict=True):
        np.testing.assert_allclose(got, exp, atol=5e-6)
    without, _ = jax.vjp(lambda *a: dot_product_attention(*a, PADDING), q, k, v)
    assert float(jnp.abs(out - without).max()) > 1e-2


def test_attention_gradients_against_finite_differences():
    q, k, v, _ = _inputs(2, 1, b=1, t=3, d=4)
    jax.test_util.check_grads(lambda *a: dot_product_attention(*a, CAUSAL[:, :3, :3]),
                              (q, k, v), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
    q, k, v, cot = _inputs(4, 2)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out, vjp = jax.vjp(lambda *a: dot_product_attention(*a, PADDING), *low)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16
                                             for g in vjp(cot.astype(jnp.bfloat16)))
    np.testing.assert_allclose(out.astype(jnp.float32), _reference(q, k, v, PADDING), atol=3e-2)


def test_grouping_errors_name_the_head_counts():
    q, k, v, _ = _inputs(4, 3)
    with pytest.raises(ValueError, match="4 query heads cannot be grouped over 3"):
        dot_product_attention(q, k, v)


def test_gelu_exact_matches_the_erf_definition_and_its_derivative():
    x = jnp.linspace(-8.0, 8.0, 4001)
    np.testing.assert_allclose(gelu_exact(x), nn.gelu(x, approximate=False), atol=1e-6)
    slope = jax.vmap(jax.grad(gelu_exact))(x)
    pdf = jnp.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)
    cdf = nn.gelu(x, approximate=False) / jnp.where(x == 0, 1.0, x)
    np.testing.assert_allclose(slope, jnp.where(x == 0, 0.5, cdf + x * pdf), atol=2e-6)
