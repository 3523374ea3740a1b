"""AdaLoRA: an SVD-form low-rank update whose rank budget is reallocated during training.

Each adapted weight gets ``P`` ``[in, r]``, ``lambda`` ``[r]`` and ``Q`` ``[r, out]`` (PEFT's
``lora_A`` ``[r, in]`` transposed, ``lora_E`` ``[r, 1]`` and ``lora_B`` ``[out, r]``
transposed), and the layer computes, in factored form,

    y = x W + s ((dropout(x) P) * lambda) Q,     s = alpha / (r_init + 1e-5)

as PEFT's ``SVDLinear`` does (its ``ranknum`` is the initial rank and stays so). ``lambda``
starts at 0 (training starts at W) and ``P``, ``Q`` at N(0, 0.02^2). Two more parts make it
AdaLoRA, both outside the layer:

* :func:`orthogonality_penalty`, which the training loss adds (times ``orth_reg_weight``):
  the mean over every ``P`` and ``Q`` of ``||P^T P - I||_F`` and ``||Q Q^T - I||_F``;
* :func:`lowrank.adalora_budget.adalora_budget`, an optax transform that keeps the
  sensitivity averages and sets the smallest ``lambda`` entries to zero on the budget schedule
  (shapes never change: a masked rank is a zero in ``lambda``).

>>> import jax, jax.numpy as jnp, flax.linen as nn, lowrank as lr
>>> model = nn.Dense(3)
>>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
>>> spec = lr.LoraSpec(rank=2, alpha=8, method="adalora")
>>> leaf = lr.init_adapters(jax.random.key(1), params, spec)["kernel"]
>>> leaf.a.shape, leaf.e.tolist(), leaf.b.shape
((4, 2), [0.0, 0.0], (2, 3))

References:
  Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (AdaLoRA),
  ICLR 2023, https://arxiv.org/abs/2303.10512
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from lowrank import paths
from lowrank.layer_call import LayerCall
from lowrank.layers import MATRIX
from lowrank.lora import LoRA, LoraPair
from lowrank.method import Method, Target, is_adapter, register

# PEFT's SVDLinear divides by ranknum + 1e-5.
RANKNUM_EPS = 1e-5
INIT_STD = 0.02  # PEFT's reset_lora_parameters: P and Q ~ N(0, 0.02^2), lambda = 0


def scale_of(alpha: float, init_rank: int) -> float:
    """PEFT's ``scaling / (ranknum + 1e-5)``: ``alpha / (r_init + 1e-5)``, ``alpha = 0``
    meaning ``r_init`` as in PEFT.

    >>> round(scale_of(8, 4), 4)
    2.0
    """
    alpha = alpha if alpha > 0 else float(init_rank)
    return float(alpha) / (init_rank + RANKNUM_EPS)


@dataclasses.dataclass(frozen=True)
class AdaLoRA(LoRA):
    """An SVD-form update per weight (see the module docstring); Dense-like kernels only (a
    2-D slice, after any ``nn.scan`` axes).

    Attributes:
      rank: the initial rank (PEFT's ``init_r``); the budget transform masks ranks, never
        removes them.
      alpha: PEFT's ``lora_alpha`` (its default is 8); the scale is ``alpha / r_init``.
      dropout: on the adapter's input, as LoRA's.

    >>> AdaLoRA(rank=12, alpha=8).scale == 8 / (12 + 1e-5)
    True

    References:
      Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
      ICLR 2023.
    """

    rank: int = 12
    alpha: float = 8.0

    name: ClassVar[str] = "adalora"

    @classmethod
    def from_spec(cls, spec: Any, path: str) -> AdaLoRA:
        if spec.rslora:
            raise ValueError("LoraSpec(method='adalora') has its own scale, alpha / r_init; "
                             "rslora=True does not apply to it")
        return cls(rank=spec.rank_for(path), alpha=spec.alpha_for(path), dropout=spec.dropout)

    @property
    def scale(self) -> float:
        return scale_of(self.alpha, self.rank)

    def prepare(self, targets: list[Target]) -> AdaLoRA:
        for t in targets:
            if t.factorization != MATRIX:
                raise ValueError(f"AdaLoRA adapts Dense-like kernels ([in, out] per layer); "
                                 f"{t.path!r} has layout {t.factorization.equation}")
        return self

    def init(self, key: jax.Array, target: Target) -> AdaLoraTriplet:
        self.prepare([target])
        pair = self.init_pair(key, target)  # checks the rank against the weight
        key_a, key_b = jax.random.split(key)
        dtype = pair.a.dtype
        return AdaLoraTriplet(
            a=INIT_STD * jax.random.normal(key_a, pair.a.shape, dtype),
            b=INIT_STD * jax.random.normal(key_b, pair.b.shape, dtype),
            e=jnp.zeros(pair.a.shape[:-2] + (self.rank,), dtype),
            scale=self.scale, equation=pair.equation, dropout=self.dropout,
            init_rank=self.rank)

    @classmethod
    def apply(cls, call: LayerCall, leaf: AdaLoraTriplet) -> jax.Array:
        cls.check_layout(call, leaf)
        base = call.base()
        return base + cls.update(call, leaf.as_pair(), base.dtype)


@struct.dataclass
class AdaLoraTriplet(LoraPair):
    """AdaLoRA's ``P`` (``a``, ``[in, r]``), ``lambda`` (``e``, ``[r]``) and ``Q`` (``b``,
    ``[r, out]``) at one weight, any leading stack axes first; ``init_rank`` is PEFT's
    ``init_r`` (the scale's denominator), which stays when a file holds fewer ranks.

    >>> leaf = AdaLoraTriplet(jnp.ones((4, 2)), jnp.ones((2, 3)), e=jnp.array([1.0, 0.0]),
    ...                       scale=0.5, init_rank=2)
    >>> leaf.delta()[0].tolist(), leaf.active_ranks().tolist()
    ([0.5, 0.5, 0.5], 1)
    """

    e: jax.Array = struct.field(kw_only=True)
    init_rank: int = struct.field(pytree_node=False, kw_only=True)

    method: ClassVar[type[Method]] = AdaLoRA
    kind: ClassVar[str] = "adalora"

    def as_pair(self) -> LoraPair:
        """The LoRA pair ``(P * lambda, Q)`` with this leaf's scale: the same update."""
        return LoraPair(self.a * self.e[..., None, :].astype(self.a.dtype), self.b,
                        scale=self.scale, equation=self.equation, dropout=self.dropout)

    def delta(self, dtype: Any = jnp.float32) -> jax.Array:
        """``s P diag(lambda) Q`` in the kernel's layout."""
        return self.as_pair().delta(dtype)

    def active_ranks(self) -> jax.Array:
        """The number of nonzero ``lambda`` entries (per layer of a stack): the rank in use."""
        return jnp.sum(self.e != 0, axis=-1)

    def statics(self) -> dict[str, Any]:
        return {**super().statics(), "init_rank": self.init_rank}


register(AdaLoRA, AdaLoraTriplet)


def is_triplet(x: Any) -> bool:
    """Whether ``x`` is an AdaLoRA leaf."""
    return is_adapter(x) and isinstance(x, AdaLoraTriplet)


def triplets(adapters: Any) -> dict[str, AdaLoraTriplet]:
    """The AdaLoRA leaves of an adapters tree by path.

    >>> triplets({"d": {"kernel": jnp.ones(2)}})
    {}
    """
    return {p: v for p, v in paths.flatten(adapters).items() if is_triplet(v)}


def orthogonality_penalty(adapters: Any) -> jax.Array:
    """PEFT's AdaLoRA regulariser: the mean, over every ``P`` and every ``Q`` (each layer of
    a stack counted on its own), of ``||P^T P - I||_F`` and ``||Q Q^T - I||_F``; 0 without
    AdaLoRA leaves. The training loss adds it times ``orth_reg_weight`` (PEFT's 0.5).

    >>> eye = jnp.eye(3)
    >>> leaf = AdaLoraTriplet(eye[:, :2], 2 * eye[:2], e=jnp.ones(2), init_rank=2)
    >>> float(orthogonality_penalty({"k": leaf}))  # P orthonormal (0), Q = 2 I (sqrt(18))
    2.1213202476501465
    """
    total, count = jnp.zeros((), jnp.float32), 0
    for leaf in triplets(adapters).values():
        a, b = leaf.a.astype(jnp.float32), leaf.b.astype(jnp.float32)
        eye = jnp.eye(leaf.rank, dtype=jnp.float32)
        for gram in (jnp.einsum("...ir,...is->...rs", a, a),
                     jnp.einsum("...ro,...so->...rs", b, b)):
            norms = jnp.sqrt(jnp.sum((gram - eye) ** 2, axis=(-2, -1)))
            total, count = total + jnp.sum(norms), count + norms.size
    return total / max(count, 1)


def with_orthogonality_penalty(loss_fn: Any, weight: float) -> Any:
    """``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)`` with ``weight *``
    :func:`orthogonality_penalty` added to the loss (the train step's; evaluate without it).

    >>> f = with_orthogonality_penalty(lambda t, *_: (jnp.float32(1), {}), 0.5)
    >>> float(f({}, None, None, None)[0])
    1.0
    """
    if not weight >= 0:
        raise ValueError(f"orth_reg_weight must be >= 0, got {weight!r}")

    def penalized(trainable, frozen, batch, rng):
        loss, metrics = loss_fn(trainable, frozen, batch, rng)
        if weight == 0:
            return loss, metrics
        return loss + weight * orthogonality_penalty(trainable), metrics

    return penalized
