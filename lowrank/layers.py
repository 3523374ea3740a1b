"""What each supported linen layer computes, so that an adapter can be added from outside.

For every supported layer type this module knows three things, and nothing about methods:

* how its weight factorises: which kernel axes the input contracts with (``contract``),
  which appear in the output (``out``), and which are shared by both (``batch``, as a head axis
  of an ``nn.Einsum``). ``A`` spans ``batch + contract + (r,)`` and ``B`` spans
  ``batch + (r,) + out``, so that ``W ~ einsum(A, B)`` in the kernel's own axis order;
* how to compute a factored product ``s * (x A) B`` in the layer's output layout without
  ever forming ``A B``;
* how a value per output unit (a bias, a magnitude over the kernel's output axes) lines up
  with the layer's output.

:class:`lowrank.layer_call.LayerCall` hands that math to a method's ``apply`` for one call
of one layer.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowrank.autodiff import custom_backward

_LABELS = string.ascii_lowercase.replace("z", "")
RANK_LABEL = "z"


@dataclasses.dataclass(frozen=True)
class Factorization:
    """Which kernel axes an adapter's ``A`` and ``B`` span (axis positions of one slice).

    >>> f = Factorization(batch=(), contract=(0,), out=(1,))
    >>> f.equation
    '...az,...zb->...ab'
    >>> f.adapter_shapes((16, 32), rank=4)
    ((16, 4), (4, 32))
    """

    batch: tuple[int, ...]
    contract: tuple[int, ...]
    out: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.batch) + len(self.contract) + len(self.out)

    @property
    def equation(self) -> str:
        lab = _LABELS[: self.ndim]
        a = "".join(lab[i] for i in self.batch + self.contract) + RANK_LABEL
        b = "".join(lab[i] for i in self.batch) + RANK_LABEL + "".join(lab[i] for i in self.out)
        return f"...{a},...{b}->...{lab}"

    @classmethod
    def from_equation(cls, eq: str) -> Factorization:
        """Inverse of :attr:`equation`.

        >>> Factorization.from_equation('...az,...zb->...ab')
        Factorization(batch=(), contract=(0,), out=(1,))
        """
        lhs, kernel = eq.replace("...", "").split("->")
        a, b = lhs.split(",")
        pos = {c: i for i, c in enumerate(kernel)}
        batch = tuple(pos[c] for c in a if c in b and c != RANK_LABEL)
        contract = tuple(pos[c] for c in a if c not in b)
        out = tuple(pos[c] for c in b if c not in a)
        return cls(batch, contract, out)

    def fan_in(self, kernel_shape: tuple[int, ...]) -> int:
        return int(np.prod([kernel_shape[i] for i in self.contract]))

    def fan_out(self, kernel_shape: tuple[int, ...]) -> int:
        return int(np.prod([kernel_shape[i] for i in self.out]))

    def adapter_shapes(self, kernel_shape: tuple[int, ...], rank: int):
        """Shapes of ``A`` and ``B`` for one slice of a kernel."""
        dims = lambda axes: tuple(kernel_shape[i] for i in axes)  # noqa: E731
        return (
            dims(self.batch) + dims(self.contract) + (rank,),
            dims(self.batch) + (rank,) + dims(self.out),
        )


MATRIX = Factorization(batch=(), contract=(0,), out=(1,))


class UnsupportedLayer(ValueError):
    """A low-rank target sits on a layer this library cannot adapt."""


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def einsum_parts(module: nn.Einsum, args, kwargs) -> tuple[str, str, str]:
    """An ``nn.Einsum`` call's (input, kernel, output) labels (the call's equation, else the
    module's)."""
    eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
    lhs, out = eq.replace(" ", "").split("->")
    x_labels, k_labels = lhs.split(",")
    return x_labels, k_labels, out


def _dense_factorization(module, ndim, args, kwargs):
    return MATRIX


def _dense_general_factorization(module, ndim, args, kwargs):
    if _tuple(module.batch_dims):
        raise UnsupportedLayer("nn.DenseGeneral with batch_dims is not supported")
    n_in = len(_tuple(module.axis))
    return Factorization((), tuple(range(n_in)), tuple(range(n_in, ndim)))


def _einsum_factorization(module, ndim, args, kwargs):
    x_labels, k_labels, out = einsum_parts(module, args, kwargs)
    if "." in x_labels + k_labels:
        raise UnsupportedLayer("nn.Einsum with an ellipsis in the equation is not supported")
    batch, contract, outs = [], [], []
    for i, c in enumerate(k_labels):
        in_x, in_out = c in x_labels, c in out
        if in_x and in_out:
            batch.append(i)
        elif in_x:
            contract.append(i)
        elif in_out:
            outs.append(i)
        else:
            raise UnsupportedLayer(f"nn.Einsum kernel axis {c!r} is summed over alone")
    return Factorization(tuple(batch), tuple(contract), tuple(outs))


def _conv_factorization(module, ndim, args, kwargs):
    if module.feature_group_count != 1:
        raise UnsupportedLayer("nn.Conv with feature_group_count != 1 is not supported")
    if module.mask is not None:
        raise UnsupportedLayer("nn.Conv with a kernel mask is not supported")
    return Factorization((), tuple(range(ndim - 1)), (ndim - 1,))


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """How one linen layer type is adapted.

    ``per_output(module, args, kwargs, v, ndim, order)`` lines ``v`` up with the output:
    ``v`` spans the kernel's non-contracted axes, in kernel order (``order="kernel"``) or in
    the output's order (``"output"``, as a bias is stored); None for layers whose output
    units are not the kernel's (an ``nn.Embed`` lookup).
    """

    weight: str  # the name of the adapted parameter
    methods: tuple[str, ...]  # the methods that use it
    factorization: Callable[..., Factorization]
    delta: Callable[..., jax.Array]
    per_output: Callable[..., jax.Array] | None = None


def low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * (x @ a) @ b`` over the last axis of ``x``, never forming ``a @ b``.

    Differentiable in ``x``, ``a`` and ``b`` with a hand-written backward pass (see
    ``_low_rank_bwd``); in reverse mode only, unless traced inside
    ``lowrank.autodiff.forward_mode()``.

    >>> low_rank(jnp.ones((2, 3)), jnp.ones((3, 1)), jnp.ones((1, 4)), 0.5).shape
    (2, 4)
    """
    if not custom_backward():  # forward-mode autodiff: the same product, JAX's derivatives
        return _low_rank_fwd(x, a, b, float(scale))[0]
    return _low_rank(x, a, b, float(scale))


def _contract_tokens(small: jax.Array, big: jax.Array) -> jax.Array:
    """``small^T @ big`` over the token axis, as ``[r, n]``.

    XLA's CPU matmul is fast when the rank-sized operand is the left one and the output is
    ``[r, n]``; the same product laid out as ``[n, r]`` (what autodiff asks for, ``x^T g``)
    runs ~10x slower. Callers that need ``[n, r]`` transpose the result, which costs nothing at
    this size; the barrier stops XLA from folding that transpose back into the matmul.
    """
    return jax.lax.optimization_barrier(jax.lax.dot_general(small, big, (((0,), (0,)), ((), ()))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_rank(x, a, b, scale):
    return _low_rank_fwd(x, a, b, scale)[0]


def _low_rank_fwd(x, a, b, scale):
    u = jnp.dot(x, a) * jnp.asarray(scale, x.dtype)
    return jnp.dot(u, b), (x, a, b, u)


def _low_rank_bwd(scale, res, g):
    x, a, b, u = res
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    u2 = u.reshape(-1, u.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    gb = jnp.dot(g2, b.T) * jnp.asarray(scale, g.dtype)  # d(loss)/d(x a), [tokens, r]
    dx = jnp.dot(gb, a.T).reshape(*lead, a.shape[0])
    da = _contract_tokens(gb, x2).T
    db = _contract_tokens(u2, g2)
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def _dense_delta(module, method, args, kwargs, a, b, scale, dropout):
    return low_rank(dropout(args[0]), a, b, scale)


def _dense_general_delta(module, method, args, kwargs, a, b, scale, dropout):
    x = dropout(args[0])
    axis = tuple(ax % x.ndim for ax in _tuple(module.axis))
    x = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
    lead = x.shape[: x.ndim - len(axis)]
    rank = a.shape[-1]
    y = low_rank(x.reshape(*lead, -1), a.reshape(-1, rank), b.reshape(rank, -1), scale)
    return y.reshape(*lead, *b.shape[1:])


def _einsum_delta(module, method, args, kwargs, a, b, scale, dropout):
    x_labels, k_labels, out = einsum_parts(module, args, kwargs)
    f = _einsum_factorization(module, len(k_labels), args, kwargs)
    r = next(c for c in string.ascii_letters if c not in x_labels + k_labels + out)
    a_labels = "".join(k_labels[i] for i in f.batch + f.contract) + r
    b_labels = "".join(k_labels[i] for i in f.batch) + r + "".join(k_labels[i] for i in f.out)
    contracted = {k_labels[i] for i in f.contract}
    u_labels = "".join(c for c in x_labels if c not in contracted) + r
    x = dropout(args[0])
    u = jnp.einsum(f"{x_labels},{a_labels}->{u_labels}", x, a) * jnp.asarray(scale, x.dtype)
    return jnp.einsum(f"{u_labels},{b_labels}->{out}", u, b)


def _embed_delta(module, method, args, kwargs, a, b, scale, dropout):
    if method == "attend":  # query @ (a b)^T, computed as (query b^T) a^T
        return low_rank(args[0], b.T, a.T, scale)
    return jnp.dot(jnp.take(a, args[0], axis=0) * jnp.asarray(scale, a.dtype), b)


def _conv_delta(module, method, args, kwargs, a, b, scale, dropout):
    # x * A is the same convolution with r output channels (PEFT's conv LoRA); then a 1x1 map.
    down = module.clone(parent=None, features=a.shape[-1], use_bias=False, dtype=a.dtype)
    u = down.apply({"params": {"kernel": a}}, dropout(args[0]))
    return jnp.dot(u * jnp.asarray(scale, u.dtype), b)


def _trailing_per_output(module, args, kwargs, v, ndim, order):
    # Output units are the output's trailing axes, in kernel order (Dense, DenseGeneral, Conv).
    return v


def _einsum_per_output(module, args, kwargs, v, ndim, order):
    x_labels, k_labels, out = einsum_parts(module, args, kwargs)
    kept = [c for c in k_labels if c in out]  # the kernel's batch and output axes
    if order == "kernel":  # into the output's order
        v = jnp.transpose(v, [kept.index(c) for c in out if c in kept])
    sizes = dict(zip([c for c in out if c in kept], v.shape, strict=True))
    return v.reshape([sizes.get(c, 1) for c in out])


RULES: dict[type, LayerRule] = {
    nn.Dense: LayerRule("kernel", ("__call__",), _dense_factorization, _dense_delta,
                        _trailing_per_output),
    nn.DenseGeneral: LayerRule(
        "kernel", ("__call__",), _dense_general_factorization, _dense_general_delta,
        _trailing_per_output,
    ),
    nn.Einsum: LayerRule("kernel", ("__call__",), _einsum_factorization, _einsum_delta,
                         _einsum_per_output),
    nn.Embed: LayerRule("embedding", ("__call__", "attend"), lambda *_: MATRIX, _embed_delta),
    nn.Conv: LayerRule("kernel", ("__call__",), _conv_factorization, _conv_delta,
                       _trailing_per_output),
}

SUPPORTED = ", ".join(f"nn.{t.__name__}" for t in RULES)


def unsupported(where: str, module: Any, supported: str = SUPPORTED) -> UnsupportedLayer:
    """The error for a weight at ``where`` (adapted or quantized) on a layer with no rule.

    >>> str(unsupported("w", object()))[:45]
    "'w' is a weight of object, which lowrank cann"
    """
    return UnsupportedLayer(
        f"{where!r} is a weight of {type(module).__name__}, which lowrank cannot adapt or "
        f"dequantize; supported layers: {supported}"
    )


def rule_for(module: Any) -> LayerRule | None:
    """The rule for a module's exact type (subclasses may change the math, so they don't match).

    >>> rule_for(nn.Dense(3)).weight
    'kernel'
    """
    return RULES.get(type(module))

