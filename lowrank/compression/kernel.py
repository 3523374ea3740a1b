"""``LowRankKernel``: a frozen kernel stored as two factors, ``W ~ U V``, run as ``(x U) V``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lowrank.frozen import FrozenLeaf, is_frozen, materialize, shape_of
from lowrank.layers import Factorization
from lowrank.quant import QuantSpec, is_quantized, layout_from_factorization
from lowrank.quant.tree import quantize_leaf


def _identity(x: jax.Array) -> jax.Array:
    return x


@dataclasses.dataclass(frozen=True)
class LowRankKernel(FrozenLeaf):
    """A frozen kernel replaced by low-rank factors, ``W ~ einsum(equation, u, v)``.

    The factors span the same axes as a LoRA pair's ``A`` and ``B`` (see
    :class:`lowrank.Factorization`): for a Dense ``[in, out]`` kernel ``u`` is
    ``[in, r]`` and ``v`` is ``[r, out]``; both may carry leading stack axes (``nn.scan``).
    Either may be a :class:`lowrank.quant.QuantizedArray` (bits and rank combined).

    A frozen leaf (:mod:`lowrank.frozen`): inside :func:`lowrank.apply` its layer computes
    ``(x U) V`` (plus the bias) through the layer's own factored product, never ``U V``;
    :func:`lowrank.merge` materialises ``U V`` for export.

    Attributes:
      u, v: the factors (arrays or quantized arrays).
      equation: ``einsum`` equation of ``W = einsum(equation, u, v)`` (static).
      dtype: name of the original kernel's dtype (static); ``materialize`` and
        :func:`lowrank.merge` return it.

    >>> k = LowRankKernel(jnp.ones((8, 2)), jnp.ones((2, 4)))
    >>> k.logical_shape, k.rank, k.size, k.kept, k.materialize()[0, 0].tolist()
    ((8, 4), 2, 32, 24, 2.0)
    """

    u: Any
    v: Any
    equation: str = dataclasses.field(default="...az,...zb->...ab", metadata=dict(static=True))
    dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

    @property
    def factorization(self) -> Factorization:
        return Factorization.from_equation(self.equation)

    @property
    def rank(self) -> int:
        return shape_of(self.u)[-1]

    @property
    def logical_shape(self) -> tuple[int, ...]:
        u = jax.ShapeDtypeStruct(shape_of(self.u), jnp.float32)
        v = jax.ShapeDtypeStruct(shape_of(self.v), jnp.float32)
        return tuple(jax.eval_shape(lambda a, b: jnp.einsum(self.equation, a, b), u, v).shape)

    @property
    def size(self) -> int:
        """Parameters of the weight it stands for (the dense kernel's element count)."""
        return math.prod(self.logical_shape)

    @property
    def kept(self) -> int:
        """Parameters stored: the factors' element count."""
        return math.prod(shape_of(self.u)) + math.prod(shape_of(self.v))

    @property
    def nbytes(self) -> int:
        """Bytes of the factors (codes and scales when quantized)."""
        return sum(f.nbytes if is_frozen(f) else f.size * f.dtype.itemsize
                   for f in (self.u, self.v))

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype the factors compute in (a quantized factor's ``compute_dtype``)."""
        u = self.u
        return jnp.dtype(u.compute_dtype if is_quantized(u) else u.dtype)

    def factors(self, dtype: Any = None) -> tuple[jax.Array, jax.Array]:
        """``(u, v)`` as plain arrays in ``dtype`` (None: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        return materialize(self.u, dtype), materialize(self.v, dtype)

    def materialize(self, dtype: Any = None) -> jax.Array:
        """The dense kernel ``U V`` (computed in float32), in ``dtype`` (None: the compute
        dtype)."""
        u, v = self.factors(jnp.float32)
        return jnp.einsum(self.equation, u, v).astype(dtype or self.compute_dtype)

    def layer_call(self, module: Any, rule: Any, method_name: str, args: tuple, kwargs: dict,
                   params: dict) -> jax.Array:
        """``(x U) V`` (plus the layer's bias) in the layer's output layout, through the layer
        rule's factored product (the same one LoRA's update uses)."""
        x = args[0]
        floating = jnp.issubdtype(jnp.result_type(x), jnp.inexact)
        dtype = getattr(module, "dtype", None)
        if dtype is None:
            dtype = jnp.result_type(x, self.compute_dtype) if floating else self.compute_dtype
        u, v = self.factors(dtype)
        call_args = ((x.astype(dtype), *args[1:]) if floating else args)
        y = rule.delta(module, method_name, call_args, kwargs, u, v, 1.0, _identity)
        bias = params.get("bias")
        if bias is not None and rule.per_output is not None and method_name == "__call__":
            y = y + rule.per_output(module, args, kwargs, materialize(bias, dtype), None,
                                    "output")
        return y

    def quantize(self, spec: QuantSpec, name: str = "kernel") -> LowRankKernel:
        """Both factors quantized as ``spec`` says (format, block size, double quantization;
        its path patterns are not consulted), blocks running along each factor's contraction
        (``u``'s input axes, ``v``'s rank axis). ``name`` names the kernel in errors.

        >>> k = LowRankKernel(jnp.ones((64, 4)), jnp.ones((4, 64)))
        >>> q = k.quantize(QuantSpec("int8"))
        >>> q.nbytes < k.nbytes, float(jnp.abs(q.materialize() - 4.0).max()) < 0.05
        (True, True)
        """
        f = self.factorization
        nb, nc, no = len(f.batch), len(f.contract), len(f.out)
        batch = tuple(range(nb))
        u_f = Factorization(batch, tuple(range(nb, nb + nc)), (nb + nc,))
        v_f = Factorization(batch, (nb,), tuple(range(nb + 1, nb + 1 + no)))
        factors = {}
        for key, value, fact in (("u", self.u, u_f), ("v", self.v, v_f)):
            if is_frozen(value):
                raise ValueError(f"{name!r}: factor {key} is already quantized")
            layout = layout_from_factorization(value.ndim, fact)
            factors[key] = quantize_leaf(f"{name}@{key}", value, spec, layout)
        return dataclasses.replace(self, **factors)


jax.tree_util.register_dataclass(LowRankKernel)


def is_low_rank(x: Any) -> bool:
    """Whether ``x`` is a :class:`LowRankKernel`.

    >>> is_low_rank(LowRankKernel(jnp.ones((4, 1)), jnp.ones((1, 4)))), is_low_rank(1.0)
    (True, False)
    """
    return isinstance(x, LowRankKernel)
