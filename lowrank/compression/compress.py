"""``compress``: replace chosen kernels of a params tree by frozen low-rank factors."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lowrank import paths
from lowrank.adapters import target_of
from lowrank.compression.kernel import LowRankKernel, is_low_rank
from lowrank.compression.svd import (
    budget_ranks,
    energy_rank,
    split_singular,
    to_matrices,
    whitener,
)
from lowrank.frozen import is_frozen
from lowrank.quant import QuantSpec


@dataclasses.dataclass(frozen=True)
class CompressSpec:
    """Which kernels to compress, and how their ranks are chosen (exactly one of ``rank``,
    ``energy``, ``budget``).

    Attributes:
      targets: regex that must fullmatch a kernel's '/'-joined path (2+ axes).
      exclude: regex of kernels left dense.
      rank: one rank for every target.
      energy: per kernel, the smallest rank keeping this fraction (0, 1] of the squared
        singular values (pooled over the slices of a stacked kernel; of the whitened kernel
        when activation-aware).
      budget: a global budget of factor parameters: an int, or a float in (0, 1) as a
        fraction of the targets' dense parameters; ranks go where they keep the most relative
        energy per parameter (see :func:`~lowrank.compression.svd.budget_ranks`).
      only_saving: take only ranks that save memory, ``r * (in + out) < in * out``; a
        target whose rank would not is left dense (with ``budget``, ranks are capped there).
        ``False`` allows any rank up to ``min(in, out)``.
      damping: activation-aware only: the second moment's eigenvalues are floored at this
        fraction of their mean before whitening.

    >>> CompressSpec(energy=0.9).energy
    0.9
    """

    targets: str = r".*kernel"
    exclude: str | None = None
    rank: int | None = None
    energy: float | None = None
    budget: int | float | None = None
    only_saving: bool = True
    damping: float = 1e-4

    def __post_init__(self):
        for name in ("targets", "exclude"):
            pattern = getattr(self, name)
            if pattern is None and name == "exclude":
                continue
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(f"CompressSpec.{name}: {pattern!r} is not a regex ({e})") from None
        given = [n for n in ("rank", "energy", "budget") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"CompressSpec needs exactly one of rank, energy, budget; got "
                             f"{given or 'none'}")
        r = self.rank
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"CompressSpec.rank must be an int >= 1, got {r!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"CompressSpec.energy must be in (0, 1], got {self.energy!r}")
        b = self.budget
        if b is not None and (isinstance(b, bool) or not (
                (isinstance(b, int) and b > 0) or (isinstance(b, float) and 0.0 < b < 1.0))):
            raise ValueError(f"CompressSpec.budget must be an int > 0 (parameters) or a float "
                             f"in (0, 1) (a fraction of the targets'), got {b!r}")
        if not self.damping > 0:
            raise ValueError(f"CompressSpec.damping must be > 0, got {self.damping!r}")


def _saving_cap(fan_in: int, fan_out: int) -> int:
    """The largest rank with ``r * (fan_in + fan_out) < fan_in * fan_out``."""
    return (fan_in * fan_out - 1) // (fan_in + fan_out)


@dataclasses.dataclass
class _Decomposed:
    path: str
    kernel: Any
    equation: str
    a_shape: tuple[int, ...]  # u's shape at rank 1 (the rank axis last)
    b_shape: tuple[int, ...]
    b_rank_axis: int
    u: Any
    s: Any
    vt: Any
    unwhiten: np.ndarray | None
    unit_cost: int
    max_rank: int
    cap: int


def _decompose(path: str, kernel: Any, spec: CompressSpec, layouts: Mapping | None,
               stats: Mapping | None) -> _Decomposed:
    target = target_of(path, kernel, layouts)
    f, n_lead = target.factorization, target.n_lead
    matrix = to_matrices(jnp.asarray(kernel, jnp.float32), f, n_lead)
    fan_in, fan_out = matrix.shape[-2:]
    slices = int(np.prod(matrix.shape[:-2]))
    unwhiten = None
    if stats is not None:
        if path not in stats:
            raise ValueError(f"compress: no activation stats for target {path!r}; stats hold "
                             + paths.candidates_hint(list(stats)))
        moment = np.asarray(stats[path])
        lead = matrix.shape[:-2]
        if moment.shape[-2:] != (fan_in, fan_in) or moment.shape[:-2] not in (lead, ()):
            raise ValueError(
                f"compress: the activation stats of {path!r} have shape {moment.shape}; its "
                f"kernel as matrices is {tuple(matrix.shape)}, so accepted are "
                f"{(fan_in, fan_in)} or {(*lead, fan_in, fan_in)} (one per slice)")
        white, unwhiten = whitener(moment, spec.damping)
        matrix = jnp.asarray(white, jnp.float32) @ matrix
    u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    a_shape, b_shape = f.adapter_shapes(target.slice_shape, 1)
    lead = target.shape[:n_lead]
    cap = _saving_cap(fan_in, fan_out)
    return _Decomposed(path, kernel, f.equation, lead + a_shape, lead + b_shape,
                       n_lead + len(f.batch), u, s, vt,
                       unwhiten, slices * (fan_in + fan_out), min(fan_in, fan_out), cap)


def _kernel(d: _Decomposed, rank: int) -> LowRankKernel:
    a, b = split_singular(d.u, d.s, d.vt, rank)
    if d.unwhiten is not None:
        a = d.unwhiten @ a
    dtype = jnp.dtype(d.kernel.dtype)
    b_shape = list(d.b_shape)
    b_shape[d.b_rank_axis] = rank
    return LowRankKernel(jnp.asarray(np.reshape(a, d.a_shape[:-1] + (rank,)), dtype),
                         jnp.asarray(np.reshape(b, b_shape), dtype),
                         equation=d.equation, dtype=dtype.name)


def compress(params: Mapping, spec: CompressSpec, *, stats: Mapping | None = None,
             layouts: Mapping | None = None, quant: QuantSpec | None = None) -> dict:
    """Replaces the kernels ``spec`` selects by frozen low-rank factors ``W ~ U V`` from a
    truncated SVD, leaving every other leaf as it is.

    Args:
      params: float params (or ``{"params": ...}``, returned wrapped).
      spec: the targets and the rank rule.
      stats: ``{path: E[x x^T]}`` from :func:`~lowrank.compression.activation_stats`: each
        target is truncated in the norm of its outputs on those inputs (``||X (W - U V)||``,
        SVD of ``S W`` with ``S^2 = E[x x^T]``, as SVD-LLM) instead of its weights'. A moment
        is ``[in, in]`` for the whole kernel, or one per slice of a stacked or per-head kernel
        (``[*slices, in, in]``, the kernel's leading and batch axes).
      layouts: ``{path: Factorization}`` from :func:`lowrank.discover_layouts`, for kernels
        with more than two axes (stacked layers, DenseGeneral, Einsum, Conv).
      quant: also quantize both factors of every compressed kernel (bits and rank combined).

    Returns:
      the frozen tree, with a :class:`~lowrank.compression.LowRankKernel` at each compressed
      kernel; run it with :func:`lowrank.apply` (adapters on top or ``{}``), export it with
      :func:`lowrank.merge`.

    >>> import jax
    >>> w = jax.random.normal(jax.random.key(0), (32, 16))
    >>> frozen = compress({"fc": {"kernel": w}}, CompressSpec(rank=4))
    >>> frozen["fc"]["kernel"].rank, frozen["fc"]["kernel"].kept
    (4, 192)
    """
    if not isinstance(spec, CompressSpec):
        raise TypeError(f"spec must be a CompressSpec, got {type(spec).__name__}")
    if quant is not None and not isinstance(quant, QuantSpec):
        raise TypeError(f"quant must be a QuantSpec or None, got {type(quant).__name__}")
    inner = paths.params_of(params)
    flat = dict(paths.flatten(inner))
    targets = [p for p in paths.select(list(flat), spec.targets)
               if not paths.select([p], spec.exclude)]
    if not targets:
        raise ValueError(f"CompressSpec.targets {spec.targets!r} (minus exclude) matches no "
                         "parameter. Parameter paths: " + paths.candidates_hint(list(flat)))
    for p in targets:
        if is_frozen(flat[p]):
            raise ValueError(f"compress: {p!r} is already a {type(flat[p]).__name__}; "
                             "compress the float weights, then quantize (quant=...)")
        if np.ndim(flat[p]) < 2 or not jnp.issubdtype(jnp.result_type(flat[p]), jnp.floating):
            raise ValueError(f"compress: target {p!r} has shape {np.shape(flat[p])} and dtype "
                             f"{jnp.result_type(flat[p])}: only float kernels with 2+ axes")
    decomposed = {p: _decompose(p, flat[p], spec, layouts, stats) for p in targets}
    ranks = _choose_ranks(decomposed, spec, flat)
    for p, rank in ranks.items():
        if rank is None:
            continue
        kernel = _kernel(decomposed[p], rank)
        flat[p] = kernel if quant is None else kernel.quantize(quant, p)
    tree = paths.unflatten(flat)
    return {"params": tree} if inner is not params else tree


def _choose_ranks(decomposed: Mapping[str, _Decomposed], spec: CompressSpec,
                  flat: Mapping) -> dict[str, int | None]:
    """``{path: rank}``, None for a target left dense."""
    limit = {p: (d.cap if spec.only_saving else d.max_rank) for p, d in decomposed.items()}
    if spec.budget is not None:
        budget = spec.budget
        if isinstance(budget, float):
            budget = int(budget * sum(int(np.size(flat[p])) for p in decomposed))
        usable = {p: d for p, d in decomposed.items() if limit[p] >= 1}
        return budget_ranks({p: d.s for p, d in usable.items()},
                            {p: d.unit_cost for p, d in usable.items()},
                            {p: limit[p] for p in usable}, budget)
    ranks: dict[str, int | None] = {}
    for p, d in decomposed.items():
        if spec.rank is not None:
            if spec.rank > d.max_rank:
                raise ValueError(f"CompressSpec.rank {spec.rank} exceeds min(fan_in, fan_out) "
                                 f"= {d.max_rank} of {p!r}; accepted ranks are 1..{d.max_rank}")
            rank = spec.rank
        else:
            rank = energy_rank(d.s, spec.energy)
        ranks[p] = rank if rank <= limit[p] else None
    return ranks


def compression_summary(frozen: Mapping) -> dict[str, dict[str, int]]:
    """``{path: {"rank", "kept", "dense"}}`` for each compressed kernel of a frozen tree:
    its rank, the parameters its factors hold, the parameters of the kernel it replaces.

    >>> import jax
    >>> w = jax.random.normal(jax.random.key(0), (32, 16))
    >>> compression_summary(compress({"fc": {"kernel": w}}, CompressSpec(rank=4)))
    {'fc/kernel': {'rank': 4, 'kept': 192, 'dense': 512}}
    """
    return {p: {"rank": k.rank, "kept": k.kept, "dense": k.size}
            for p, k in paths.flatten(paths.params_of(frozen)).items() if is_low_rank(k)}
