"""VeRA: vector-based random matrix adaptation, as PEFT computes it.

One pair of frozen random projections is shared by every adapted weight: ``A`` ``[r, max_in]``
and ``B`` ``[max_out, r]``, sized to the largest adapted layer and sliced per layer
(``A[:, :in]``, ``B[:out]``), kaiming-uniform as in PEFT (bounds ``1/sqrt(max_in)`` and
``1/sqrt(r)``). Only two vectors per weight train: ``lambda_d`` ``[r]`` (initialised to
``d_initial``, 0.1) and ``lambda_b`` ``[out]`` (initialised to 0, so training starts at W):

    y = x W + lambda_b * ((lambda_d * (dropout(x) A^T)) B^T)

with no alpha. The projections come from one of two places:

* regenerated inside the step from ``projection_seed`` (JAX's PRNG, so their values differ
  from PEFT's torch generator): nothing but the two vectors is stored or trained, and under
  ``jit`` they are computed once per step. This is what :func:`lowrank.init_adapters` makes.
* stored as arrays in the **frozen tree**, under ``"@vera"`` (:func:`with_projections`), for
  projections that cannot be regenerated (PEFT's, loaded by
  :func:`lowrank.interop.peft_vera.load`); the leaf says so (``stored=True``). The frozen tree
  is their place because they are frozen: the gradient is taken of the trainable tree only,
  so they get no gradient and no optimizer state (in the trainable tree an optimizer would
  decay or move them), and a shared pair is held once, not per weight. ``lowrank.apply`` and
  ``lowrank.merge`` hand them to each leaf (``Adapter.bind``); the model never sees them.

>>> import jax, jax.numpy as jnp, flax.linen as nn, lowrank as lr
>>> model = nn.Dense(3)
>>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
>>> adapters = lr.init_adapters(jax.random.key(1), params, lr.LoraSpec(rank=2, method="vera"))
>>> adapters["kernel"].lambda_d.tolist(), adapters["kernel"].lambda_b.shape
([0.10000000149011612, 0.10000000149011612], (3,))

References:
  Kopiczko, Blankevoort and Asano, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024,
  https://arxiv.org/abs/2310.11454
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrank import paths
from lowrank.layer_call import LayerCall
from lowrank.layers import MATRIX
from lowrank.method import SHARED, Adapter, Method, Target, register

# The frozen tree's entry for stored projections: {"a": [max_in, r], "b": [r, max_out]}.
PROJECTIONS = SHARED + "vera"


def with_projections(frozen: Any, a: jax.Array, b: jax.Array) -> dict:
    """``frozen`` with the shared projections ``a`` ``[max_in, r]`` and ``b`` ``[r, max_out]``
    (our kernel layout: PEFT's ``vera_A`` and ``vera_B`` transposed) stored under
    ``"@vera"``, for VeRA leaves made with ``stored=True``.

    >>> sorted(with_projections({"d": {}}, jnp.ones((4, 2)), jnp.ones((2, 3))))
    ['@vera', 'd']
    """
    frozen = dict(paths.params_of(frozen))
    frozen[PROJECTIONS] = {"a": a, "b": b}
    return frozen


def projections(seed: int, rank: int, max_in: int, max_out: int,
                dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The shared ``(A [max_in, r], B [r, max_out])`` in our kernel layout (PEFT's ``vera_A``
    transposed and ``vera_B`` transposed), kaiming-uniform as PEFT draws them.

    >>> a, b = projections(0, 2, 5, 3)
    >>> a.shape, b.shape, bool(jnp.abs(a).max() <= 1 / 5 ** 0.5)
    ((5, 2), (2, 3), True)
    """
    key_a, key_b = jax.random.split(jax.random.key(seed))
    bound_a, bound_b = 1.0 / np.sqrt(max_in), 1.0 / np.sqrt(rank)  # fan_in of [r, in], [out, r]
    a = jax.random.uniform(key_a, (rank, max_in), dtype, -bound_a, bound_a).T
    b = jax.random.uniform(key_b, (max_out, rank), dtype, -bound_b, bound_b).T
    return a, b


@dataclasses.dataclass(frozen=True)
class VeRA(Method):
    """Shared frozen random projections, two trainable vectors per weight (see the module
    docstring). Dense-like kernels only (a 2-D slice, after any ``nn.scan`` axes).

    Attributes:
      rank: r, the projections' rank (PEFT's default is 256; VeRA's ranks are large, its
        trainable count is ``r + out`` per weight).
      d_initial: the initial value of ``lambda_d``.
      dropout: dropout on the adapter's input, as LoRA's.
      projection_seed: seeds the shared projections.
      max_in, max_out: the projections' size, set by :meth:`prepare` to the largest adapted
        layer's.

    >>> VeRA(rank=4).prepare([]).max_in is None
    True

    References:
      Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024.
    """

    rank: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    projection_seed: int = 0
    max_in: int | None = None
    max_out: int | None = None

    name: ClassVar[str] = "vera"

    @classmethod
    def from_spec(cls, spec: Any, path: str) -> VeRA:
        # VeRA has no alpha (PEFT's neither); rank, dropout and the seed come from the spec.
        return cls(rank=spec.rank_for(path), dropout=spec.dropout)

    def prepare(self, targets: list[Target]) -> VeRA:
        for t in targets:
            if t.factorization != MATRIX:
                raise ValueError(f"VeRA adapts Dense-like kernels ([in, out] per layer); "
                                 f"{t.path!r} has layout {t.factorization.equation}")
        if not targets:
            return self
        return dataclasses.replace(self, max_in=max(t.slice_shape[0] for t in targets),
                                   max_out=max(t.slice_shape[1] for t in targets))

    def init(self, key: jax.Array, target: Target) -> VeraAdapter:
        del key  # deterministic: the projections come from projection_seed
        sized = self if self.max_in is not None else self.prepare([target])  # a lone target
        fan_in, fan_out = target.slice_shape
        lead, dtype = target.shape[: target.n_lead], target.dtype
        return VeraAdapter(
            lambda_d=jnp.full(lead + (self.rank,), self.d_initial, dtype),
            lambda_b=jnp.zeros(lead + (fan_out,), dtype),
            fan_in=fan_in, max_in=sized.max_in, max_out=sized.max_out,
            seed=self.projection_seed, dropout=self.dropout)

    @classmethod
    def factors(cls, leaf: VeraAdapter, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
        """``(A * lambda_d, lambda_b * B)`` for this weight: a LoRA pair with scale 1."""
        if leaf.proj_a is not None:
            a, b = leaf.proj_a.astype(dtype), leaf.proj_b.astype(dtype)
        elif leaf.stored:
            raise ValueError(
                f"this VeRA adapter reads its projections from the frozen tree's "
                f"{PROJECTIONS!r} entry, which is missing: run it over the frozen tree that "
                "lowrank.interop.peft_vera.load returned (or lowrank.vera.with_projections)")
        else:
            a, b = projections(leaf.seed, leaf.rank, leaf.max_in, leaf.max_out, dtype)
        a = a[..., : leaf.fan_in, :] * leaf.lambda_d.astype(dtype)[..., None, :]
        b = b[..., : leaf.lambda_b.shape[-1]] * leaf.lambda_b.astype(dtype)[..., None, :]
        return a, b

    @classmethod
    def apply(cls, call: LayerCall, leaf: VeraAdapter) -> jax.Array:
        if call.factorization != MATRIX or leaf.lambda_d.ndim != 1:
            raise ValueError(f"VeRA adapter at {call.where!r} needs a Dense-like layer with "
                             "no leading axes (initialise it with layouts= for nn.scan)")
        base = call.base()
        a, b = cls.factors(leaf, base.dtype)
        return base + call.low_rank(a, b, 1.0, dropout=leaf.dropout).astype(base.dtype)


@struct.dataclass
class VeraAdapter(Adapter):
    """VeRA's trainable vectors at one weight, and the static facts that regenerate its
    slices of the shared projections.

    >>> leaf = VeraAdapter(jnp.ones(2), jnp.ones(3), fan_in=4, max_in=4, max_out=3)
    >>> leaf.rank, leaf.delta().shape
    (2, (4, 3))
    """

    lambda_d: jax.Array
    lambda_b: jax.Array
    fan_in: int = struct.field(pytree_node=False, kw_only=True)
    max_in: int = struct.field(pytree_node=False, kw_only=True)
    max_out: int = struct.field(pytree_node=False, kw_only=True)
    seed: int = struct.field(pytree_node=False, default=0, kw_only=True)
    dropout: float = struct.field(pytree_node=False, default=0.0, kw_only=True)
    stored: bool = struct.field(pytree_node=False, default=False, kw_only=True)
    # Set only on a leaf bound to the frozen tree (inside apply/merge), never trained.
    proj_a: jax.Array | None = struct.field(default=None, kw_only=True)
    proj_b: jax.Array | None = struct.field(default=None, kw_only=True)

    method: ClassVar[type[Method]] = VeRA
    kind: ClassVar[str] = "vera"

    def arrays(self) -> dict[str, jax.Array]:
        """The trainable vectors (a bound leaf's projections belong to the frozen tree)."""
        return {"lambda_d": self.lambda_d, "lambda_b": self.lambda_b}

    def delta_shape(self) -> tuple[int, ...]:
        return (*self.lambda_d.shape[:-1], self.fan_in, self.lambda_b.shape[-1])

    def bind(self, frozen_flat: Any) -> VeraAdapter:
        """With ``stored=True``: this leaf carrying the frozen tree's ``"@vera"`` projections
        (when the frozen tree has them); otherwise itself."""
        a = frozen_flat.get(f"{PROJECTIONS}/a")
        if not self.stored or a is None:
            return self
        b = frozen_flat[f"{PROJECTIONS}/b"]
        if a.shape != (self.max_in, self.rank) or b.shape != (self.rank, self.max_out):
            raise ValueError(f"the frozen tree's {PROJECTIONS!r} projections are A "
                             f"{tuple(a.shape)} and B {tuple(b.shape)}; this VeRA adapter "
                             f"needs A ({self.max_in}, {self.rank}) and B ({self.rank}, "
                             f"{self.max_out})")
        # One copy per layer of a stack: nn.scan slices every array of the leaf.
        lead = self.lambda_d.shape[:-1]
        return self.replace(proj_a=jnp.broadcast_to(a, lead + a.shape),
                            proj_b=jnp.broadcast_to(b, lead + b.shape))

    @property
    def rank(self) -> int:
        return self.lambda_d.shape[-1]

    def delta(self, dtype: Any = jnp.float32) -> jax.Array:
        """``(A * lambda_d) (lambda_b * B)`` in the kernel's layout."""
        a, b = VeRA.factors(self, jnp.float32)
        return jnp.matmul(a, b).astype(dtype or jnp.float32)

    def statics(self) -> dict[str, Any]:
        return {"fan_in": self.fan_in, "max_in": self.max_in, "max_out": self.max_out,
                "seed": self.seed, "dropout": self.dropout, "stored": self.stored}


register(VeRA, VeraAdapter)
