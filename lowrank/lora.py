"""The adapters tree: creating it, merging it into the base, and taking it back out.

The adapters tree mirrors the params tree but holds only what is trained: a ``LoraPair`` at
each adapted weight and a plain array at each full-rank trainable leaf.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrank import paths, quant
from lowrank.layers import MATRIX, Factorization
from lowrank.spec import LoraSpec


@struct.dataclass
class LoraPair:
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

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def factorization(self) -> Factorization:
        return Factorization.from_equation(self.equation)

    def delta(self, dtype: Any = jnp.float32) -> jax.Array:
        """The dense update ``scale * A B`` in the kernel's layout (for merging and export)."""
        ab = jnp.einsum(self.equation, self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        return (self.scale * ab).astype(dtype)


def is_pair(x: Any) -> bool:
    return isinstance(x, LoraPair)


def _path_key(key: jax.Array, path: str) -> jax.Array:
    # A stable per-path key: adding a target elsewhere does not change this adapter's init.
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _validate_targets(flat: Mapping[str, Any], spec: LoraSpec) -> list[str]:
    if spec.targets is None:  # full-rank training only (a head, or full fine-tuning)
        return []
    all_paths = list(flat)
    targets = paths.select(all_paths, spec.targets)
    if not targets:
        raise ValueError(
            f"LoraSpec.targets {spec.targets!r} matches no parameter. Parameter paths: "
            + paths.candidates_hint(all_paths)
        )
    excluded = set(paths.select(targets, spec.exclude))
    targets = [p for p in targets if p not in excluded]
    if not targets:
        raise ValueError(f"LoraSpec.exclude {spec.exclude!r} removes every target")
    for pattern, _ in spec.rank_pattern + spec.alpha_pattern:
        if not paths.select(targets, pattern):
            raise ValueError(
                f"LoraSpec pattern {pattern!r} matches no target. Targets: "
                + paths.candidates_hint(targets)
            )
    for p in targets:
        if len(shape_of(flat[p])) < 2:
            raise ValueError(
                f"target {p!r} has shape {shape_of(flat[p])}: only weights with 2 or more axes "
                "get a low-rank adapter; train 1-D leaves through LoraSpec.trainable"
            )
    return targets


def _factorization(path: str, shape: tuple, layouts: Mapping | None) -> tuple[int, Factorization]:
    """(number of leading stack axes, factorization) of the kernel at ``path``."""
    if layouts is not None and path in layouts:
        f = layouts[path]
        return len(shape) - f.ndim, f
    if len(shape) == 2:
        return 0, MATRIX
    raise ValueError(
        f"target {path!r} has shape {tuple(shape)}: with more than 2 axes its layout (stacked "
        "layers, several input axes, a conv kernel) depends on the layer. Pass "
        "layouts=lowrank.discover_layouts(model, params, *example_inputs) to init_adapters."
    )


def _init_pair(key, path, kernel, spec, layouts) -> LoraPair:
    shape = shape_of(kernel)
    n_lead, f = _factorization(path, shape, layouts)
    slice_shape = shape[n_lead:]
    rank = spec.rank_for(path)
    fan_in, fan_out = f.fan_in(slice_shape), f.fan_out(slice_shape)
    if rank > min(fan_in, fan_out):
        raise ValueError(
            f"rank {rank} for {path!r} exceeds min(fan_in={fan_in}, fan_out={fan_out}) = "
            f"{min(fan_in, fan_out)}; accepted ranks are 1..{min(fan_in, fan_out)}"
        )
    a_shape, b_shape = f.adapter_shapes(slice_shape, rank)
    lead = shape[:n_lead]
    dtype = jnp.dtype(kernel.dtype)  # a QuantizedArray names its original dtype
    dtype = dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32
    if spec.init == "kaiming":  # PEFT's kaiming_uniform_(a=sqrt(5)): bound = 1 / sqrt(fan_in)
        bound = 1.0 / np.sqrt(fan_in)
        a = jax.random.uniform(key, lead + a_shape, dtype, -bound, bound)
    elif spec.init == "gaussian":  # PEFT's normal_(std=1/r)
        a = jax.random.normal(key, lead + a_shape, dtype) / rank
    else:
        raise ValueError(
            f"LoraSpec.init={spec.init!r} also changes the frozen base: use lowrank.init(...), "
            "which returns (frozen, adapters)"
        )
    b = jnp.zeros(lead + b_shape, dtype)
    scale = spec.scale_for(rank, spec.alpha_for(path))
    return LoraPair(a, b, scale=scale, equation=f.equation, dropout=spec.dropout)


def init_adapters(
    key: jax.Array, params: Mapping, spec: LoraSpec, *, layouts: Mapping | None = None
) -> dict:
    """Creates the trainable tree: a ``LoraPair`` per target, a copy of each trainable leaf.

    Args:
      key: PRNG key.
      params: the model's params (or ``{"params": ...}`` variables).
      spec: what to adapt.
      layouts: ``{path: Factorization}`` from :func:`lowrank.discover_layouts`, needed only
        for kernels with more than two axes (scanned layers, DenseGeneral, Einsum, Conv).

    >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    >>> adapters = init_adapters(jax.random.key(0), params, LoraSpec(rank=2))
    >>> adapters["dense"]["kernel"].a.shape, adapters["dense"]["kernel"].b.shape
    ((8, 2), (2, 4))
    """
    flat = paths.flatten(paths.params_of(params))
    out: dict[str, Any] = {}
    for p in _validate_targets(flat, spec):
        out[p] = _init_pair(_path_key(key, p), p, flat[p], spec, layouts)
    if spec.trainable is not None:
        extra = [p for p in paths.select(list(flat), spec.trainable) if p not in out]
        if not extra:
            raise ValueError(
                f"LoraSpec.trainable {spec.trainable!r} matches no parameter outside the "
                "targets. Parameter paths: " + paths.candidates_hint(list(flat))
            )
        for p in extra:
            if quant.is_quantized(flat[p]):
                raise ValueError(f"trainable leaf {p!r} is quantized; train a float weight")
            out[p] = jnp.array(flat[p])
    return paths.unflatten(out)


def _materialize(leaf: Any, dtype: Any | None = None) -> jax.Array:
    if quant.is_quantized(leaf):
        return quant.dequantize(leaf, dtype or jnp.dtype(leaf.dtype))
    return leaf


def shape_of(leaf: Any) -> tuple[int, ...]:
    """The logical shape of an array or a QuantizedArray (leading stack axes included)."""
    return quant.logical_shape(leaf) if quant.is_quantized(leaf) else tuple(np.shape(leaf))


def check_fits(frozen_flat: Mapping[str, Any], adapters_flat: Mapping[str, Any]) -> None:
    """Raises a ValueError naming the first adapter that does not fit the frozen tree."""
    for p, leaf in adapters_flat.items():
        if p not in frozen_flat:
            raise ValueError(
                f"adapters tree does not fit the model: {p!r} is not a parameter. Parameters: "
                + paths.candidates_hint(list(frozen_flat))
            )
        base_shape = shape_of(frozen_flat[p])
        if is_pair(leaf):
            got = jax.eval_shape(lambda pr: pr.delta(), leaf).shape
            if got != base_shape:
                raise ValueError(
                    f"adapters tree does not fit the model at {p!r}: A {tuple(leaf.a.shape)} "
                    f"times B {tuple(leaf.b.shape)} gives {got}, the weight is {base_shape}"
                )
        elif tuple(np.shape(leaf)) != base_shape:
            raise ValueError(
                f"adapters tree does not fit the model at {p!r}: trainable leaf has shape "
                f"{tuple(np.shape(leaf))}, the weight is {base_shape}"
            )


def merge(frozen: Mapping, adapters: Mapping) -> dict:
    """A plain dense params tree: ``W + s A B`` at each adapter, trained leaves in place.

    Quantized weights are dequantized (to their original dtype), so the result runs on the
    unmodified model with ``model.apply``. For export and inference; training keeps the
    factored form.

    >>> params = {"d": {"kernel": jnp.ones((4, 4))}}
    >>> adapters = init_adapters(jax.random.key(0), params, LoraSpec(rank=1))
    >>> bool((merge(params, adapters)["d"]["kernel"] == 1).all())
    True
    """
    flat = paths.flatten(paths.params_of(frozen))
    ad = paths.flatten(adapters)
    check_fits(flat, ad)
    out = {p: _materialize(w) for p, w in flat.items()}
    for p, leaf in ad.items():
        out[p] = out[p] + leaf.delta(out[p].dtype) if is_pair(leaf) else leaf
    return paths.unflatten(out)


def unmerge(merged: Mapping, adapters: Mapping) -> dict:
    """Takes the low-rank updates back out of a merged tree: ``W - s A B``.

    Full-rank trainable leaves keep their trained values (the originals are not in either tree).

    >>> params = {"d": {"kernel": jnp.ones((4, 4))}}
    >>> pair = LoraPair(jnp.ones((4, 1)), jnp.ones((1, 4)), scale=0.5)
    >>> back = unmerge(merge(params, {"d": {"kernel": pair}}), {"d": {"kernel": pair}})
    >>> bool(jnp.allclose(back["d"]["kernel"], 1.0))
    True
    """
    flat = dict(paths.flatten(paths.params_of(merged)))
    ad = paths.flatten(adapters)
    check_fits(flat, ad)
    for p, leaf in ad.items():
        if is_pair(leaf):
            flat[p] = flat[p] - leaf.delta(flat[p].dtype)
    return paths.unflatten(flat)
