"""DoRA: weight-decomposed low-rank adaptation, as PEFT computes it (QDoRA over a 4-bit base).

The adapted weight is ``m * (W + s A B) / ||W + s A B||``: a trainable magnitude ``m`` per
output unit (initialised to the norm of W over its input axes, so training starts at W) times
the LoRA-updated direction. The norm is detached from the gradient (the paper's section 4.3)
and computed from ``W``, ``A^T W`` and ``A^T A`` (PEFT forms ``W + s B A``; the value is the
same, without a second kernel-sized temporary), and the output is computed in factored form,
never as ``x (W + s A B)``:

    y = x W + b + (g - 1) * (x W) + g * s (x A) B,     g = m / ||W + s A B||

which is PEFT's ``DoraLinearLayer`` (with adapter dropout on, PEFT's ``(g - 1)`` term runs on
the dropped-out input, and so does this one). Over a quantized base the weight is dequantized
for the norm as well as for ``x W`` (QDoRA).

>>> import jax, jax.numpy as jnp, flax.linen as nn, lowrank as lr
>>> model = nn.Dense(3)
>>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
>>> adapters = lr.init_adapters(jax.random.key(1), params, lr.LoraSpec(rank=2, method="dora"))
>>> adapters["kernel"].magnitude.shape
(3,)

References:
  Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024,
  https://arxiv.org/abs/2402.09353
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from lowrank import frozen
from lowrank.layer_call import LayerCall
from lowrank.layers import RANK_LABEL
from lowrank.lora import LoRA, LoraPair
from lowrank.method import Method, Target, register


def _contract_axes(leaf: LoraPair, weight_ndim: int) -> tuple[int, ...]:
    f = leaf.factorization
    n_lead = weight_ndim - f.ndim
    return tuple(n_lead + i for i in f.contract)


def updated_norm(weight: jax.Array, leaf: LoraPair) -> jax.Array:
    """``||W + s A B||`` over the kernel's input axes, one value per output unit (the other
    axes in kernel order, after any leading stack axes), in float32, never forming ``A B``:

        ||W + s A B||^2 = ||W||^2 + 2 s <A^T W, B> + s^2 <B, (A^T A) B>

    per output unit, so the only kernel-sized array is ``W`` itself (dequantized, for QDoRA).

    >>> w = jnp.array([[3.0, 0.0], [4.0, 1.0]])
    >>> leaf = LoraPair(jnp.ones((2, 1)), jnp.array([[1.0, -1.0]]), scale=1.0)
    >>> [round(v, 4) for v in updated_norm(w, leaf).tolist()]  # columns of [[4, -1], [5, 0]]
    [6.4031, 1.0]
    """
    lhs, kernel = leaf.equation.replace("...", "").split("->")
    a_labels, b_labels = lhs.split(",")
    kept = "".join(c for c in kernel if c in b_labels)  # batch and output axes, kernel order
    pair_labels = "".join(c for c in a_labels if c in b_labels)  # batch axes and the rank
    other = next(c for c in "yxwvu" if c not in kernel + lhs)  # a second rank label
    a2, b2 = a_labels.replace(RANK_LABEL, other), b_labels.replace(RANK_LABEL, other)
    w = weight.astype(jnp.float32)
    a, b = leaf.a.astype(jnp.float32), leaf.b.astype(jnp.float32)
    ww = jnp.einsum(f"...{kernel},...{kernel}->...{kept}", w, w)
    wa = jnp.einsum(f"...{kernel},...{a_labels}->...{b_labels}", w, a)  # A^T W: [.., r, out]
    cross = jnp.einsum(f"...{b_labels},...{b_labels}->...{kept}", wa, b)
    gram = jnp.einsum(f"...{a_labels},...{a2}->...{pair_labels}{other}", a, a)
    bb = jnp.einsum(f"...{b_labels},...{pair_labels}{other},...{b2}->...{kept}", b, gram, b)
    s = leaf.scale
    return jnp.sqrt(jnp.maximum(ww + 2 * s * cross + s * s * bb, 0.0))


def column_norm(weight: jax.Array, contract: tuple[int, ...]) -> jax.Array:
    """The L2 norm of ``weight`` over its ``contract`` (input) axes, in float32: one value
    per output unit, the other axes kept in kernel order.

    >>> column_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]), (0,)).tolist()
    [5.0, 1.0]
    """
    w = weight.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(w * w, axis=contract))


@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
    """LoRA plus a trainable magnitude per output unit (see the module docstring).

    Same fields as :class:`~lowrank.lora.LoRA`.

    >>> DoRA(rank=4, alpha=8).scale
    2.0

    References:
      Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024.
    """

    name: ClassVar[str] = "dora"

    def init(self, key: jax.Array, target: Target) -> DoraPair:
        pair = self.init_pair(key, target)
        weight = target.weight
        if frozen.is_frozen(weight):
            weight = weight.materialize(jnp.float32)
        contract = _contract_axes(pair, len(target.shape))
        magnitude = column_norm(weight.astype(jnp.float32) + pair.delta(jnp.float32), contract)
        return DoraPair(**pair.arrays(), **pair.statics(),
                        magnitude=magnitude.astype(target.dtype))

    @classmethod
    def norm_scale(cls, weight: jax.Array, leaf: DoraPair) -> jax.Array:
        """``m / ||W + s A B||`` per output unit, the norm detached from the gradient."""
        norm = updated_norm(weight, jax.lax.stop_gradient(leaf))
        return leaf.magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm)

    @classmethod
    def apply(cls, call: LayerCall, leaf: DoraPair) -> jax.Array:
        cls.check_layout(call, leaf)
        base = call.base()
        dtype = base.dtype
        x = call.args[0]
        dropped = call.dropout(leaf.dropout)(x) if leaf.dropout else x
        lora = cls.update(call, leaf, dtype, x=dropped)
        g = call.per_output(cls.norm_scale(call.weight(jnp.float32), leaf).astype(dtype))
        # PEFT's form: the base output (bias included) plus (g - 1) x W + g s (x A) B.
        plain = base if dropped is x else call.base(dropped)
        return base + (g - 1) * (plain - call.bias()) + g * lora

    @classmethod
    def merge(cls, weight: jax.Array, leaf: DoraPair) -> jax.Array:
        contract = _contract_axes(leaf, weight.ndim)
        g = jnp.expand_dims(cls.norm_scale(weight.astype(jnp.float32), leaf), contract)
        return (g * (weight.astype(jnp.float32) + leaf.delta(jnp.float32))).astype(weight.dtype)

    @classmethod
    def unmerge(cls, merged: jax.Array, leaf: DoraPair) -> jax.Array:
        raise ValueError("a DoRA update cannot be taken back out of a merged weight: the merged "
                         "weight's column norms are the magnitudes, and the norm of the base "
                         "direction they replaced is not recoverable from it")


@struct.dataclass
class DoraPair(LoraPair):
    """A ``LoraPair`` plus ``magnitude``, one trainable value per output unit (the kernel's
    non-contracted axes, after any leading stack axes).

    >>> leaf = DoraPair(jnp.ones((4, 1)), jnp.zeros((1, 3)), magnitude=jnp.full((3,), 2.0))
    >>> leaf.merge(jnp.ones((4, 3)))[0].tolist()
    [1.0, 1.0, 1.0]
    """

    magnitude: jax.Array = struct.field(kw_only=True)

    method: ClassVar[type[Method]] = DoRA
    kind: ClassVar[str] = "dora"


register(DoRA, DoraPair)
