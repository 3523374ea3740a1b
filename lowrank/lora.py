"""LoRA as a method: the ``LoraPair`` leaf and the ``LoRA`` method that makes and runs it.

``y = x W + s (dropout(x) A) B`` in factored form (Hu et al., 2021); merging adds ``s A B``
to the weight. The tree-level functions (``init_adapters``, ``merge``) are in
:mod:`lowrank.adapters`.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
  https://arxiv.org/abs/2106.09685
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrank.layer_call import LayerCall
from lowrank.layers import MATRIX, Factorization
from lowrank.method import Adapter, Method, Target, register
from lowrank.spec import INITS


@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """Low-rank adaptation: a trainable ``A`` (kernel's input axes x r) and ``B`` (r x
    output axes) per weight, scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

    Attributes:
      rank, alpha, dropout, rslora: as the ``LoraSpec`` fields of the same names.
      a_init: "kaiming" or "gaussian" (PEFT's inits of ``A``; ``B`` starts at zero).
        "pissa" and "loftq" also change the frozen base: use ``lowrank.init``.

    >>> import lowrank as lr
    >>> spec = lr.LoraSpec(rules=[(r".*mlp.*", LoRA(rank=4, alpha=8))])

    References:
      Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    a_init: str = "kaiming"
    rslora: bool = False

    name: ClassVar[str] = "lora"

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"{type(self).__name__}.rank must be an integer >= 1, got "
                             f"{self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"{type(self).__name__}.alpha must be a number > 0, got "
                             f"{self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{type(self).__name__}.dropout must be in [0, 1), got "
                             f"{self.dropout!r}")
        if self.a_init not in INITS:
            raise ValueError(f"{type(self).__name__}.a_init {self.a_init!r} is not one of "
                             f"{INITS}")

    @classmethod
    def from_spec(cls, spec: Any, path: str) -> LoRA:
        return cls(rank=spec.rank_for(path), alpha=spec.alpha_for(path), dropout=spec.dropout,
                   a_init=spec.init, rslora=spec.rslora)

    @property
    def scale(self) -> float:
        return float(self.alpha) / (math.sqrt(self.rank) if self.rslora else self.rank)

    def init_pair(self, key: jax.Array, target: Target) -> LoraPair:
        """The ``LoraPair`` of ``target`` (``A`` random, ``B`` zero)."""
        f, rank = target.factorization, self.rank
        fan_in, fan_out = f.fan_in(target.slice_shape), f.fan_out(target.slice_shape)
        if rank > min(fan_in, fan_out):
            raise ValueError(
                f"rank {rank} for {target.path!r} exceeds min(fan_in={fan_in}, "
                f"fan_out={fan_out}) = {min(fan_in, fan_out)}; accepted ranks are "
                f"1..{min(fan_in, fan_out)}"
            )
        a_shape, b_shape = f.adapter_shapes(target.slice_shape, rank)
        lead, dtype = target.shape[: target.n_lead], target.dtype
        if self.a_init == "kaiming":  # PEFT's kaiming_uniform_(a=sqrt(5)): 1 / sqrt(fan_in)
            bound = 1.0 / np.sqrt(fan_in)
            a = jax.random.uniform(key, lead + a_shape, dtype, -bound, bound)
        elif self.a_init == "gaussian":  # PEFT's normal_(std=1/r)
            a = jax.random.normal(key, lead + a_shape, dtype) / rank
        else:
            raise ValueError(
                f"LoraSpec.init={self.a_init!r} also changes the frozen base: use "
                "lowrank.init(...), which returns (frozen, adapters)"
            )
        b = jnp.zeros(lead + b_shape, dtype)
        return LoraPair(a, b, scale=self.scale, equation=f.equation, dropout=self.dropout)

    def init(self, key: jax.Array, target: Target) -> LoraPair:
        return self.init_pair(key, target)

    @classmethod
    def check_layout(cls, call: LayerCall, leaf: LoraPair) -> None:
        """Raises unless the leaf's layout is the one this layer call contracts with."""
        expected = call.factorization
        if expected.equation != leaf.equation or leaf.a.ndim != expected.ndim - len(
                expected.out) + 1:
            raise ValueError(
                f"adapter at {call.where!r} has layout {leaf.equation} and A "
                f"{tuple(leaf.a.shape)}, but {type(call.module).__name__} here needs "
                f"{expected.equation} with no leading axes; initialise it with "
                "layouts=lowrank.discover_layouts(model, params, *example_inputs)"
            )

    @classmethod
    def update(cls, call: LayerCall, leaf: LoraPair, dtype: Any,
               x: jax.Array | None = None) -> jax.Array:
        """``s (dropout(x) A) B``, the low-rank term in the output's layout and ``dtype``."""
        delta = call.low_rank(leaf.a.astype(dtype), leaf.b.astype(dtype), leaf.scale,
                              dropout=leaf.dropout, x=x)
        return delta.astype(dtype)

    @classmethod
    def apply(cls, call: LayerCall, leaf: LoraPair) -> jax.Array:
        cls.check_layout(call, leaf)
        base = call.base()
        return base + cls.update(call, leaf, base.dtype)


@struct.dataclass
class LoraPair(Adapter):
    """A low-rank update ``scale * einsum(equation, a, b)`` of one weight.

    ``a`` spans the kernel's contracted axes and the rank, ``b`` the rank and the output axes
    (for a Dense kernel ``[in, out]``: ``a`` is ``[in, r]``, ``b`` is ``[r, out]``); both may
    carry leading stack axes (one slice per layer of an ``nn.scan``). ``scale``, ``equation`` and
    ``dropout`` are static, so gradients and optimizer state exist for ``a`` and ``b`` only.

    >>> pair = LoraPair(jnp.ones((4, 2)), jnp.zeros((2, 3)), scale=2.0)
    >>> pair.rank, pair.delta().shape
    (2, (4, 3))
    """

    a: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False, default=1.0)
    equation: str = struct.field(pytree_node=False, default=MATRIX.equation)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    method: ClassVar[type[Method]] = LoRA
    kind: ClassVar[str] = "lora"

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def factorization(self) -> Factorization:
        return Factorization.from_equation(self.equation)

    def delta(self, dtype: Any = jnp.float32) -> jax.Array:
        """The dense update ``scale * A B`` in the kernel's layout (for merging and export)."""
        ab = jnp.einsum(self.equation, self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        return (self.scale * ab).astype(dtype or jnp.float32)

    def statics(self) -> dict[str, Any]:
        return {"scale": self.scale, "equation": self.equation, "dropout": self.dropout}


register(LoRA, LoraPair)
