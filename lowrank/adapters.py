"""The adapters tree: creating it from a spec, checking it fits, merging it into the base.

The adapters tree mirrors the params tree but holds only what is trained: an adapter leaf
(:class:`lowrank.method.Adapter`, made by the weight's method) at each adapted weight and a
plain array at each full-rank trainable leaf. Everything here asks the leaves; nothing here
knows a method.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank import frozen, paths, quant
from lowrank.layers import MATRIX, Factorization
from lowrank.method import Target, is_adapter, is_shared
from lowrank.spec import LoraSpec


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
    for pattern, _ in spec.rank_pattern + spec.alpha_pattern + spec.rules:
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


def _factorization(path: str, shape: tuple, layouts: Mapping | None) -> Factorization:
    """The factorization of one slice of the kernel at ``path``."""
    if layouts is not None and path in layouts:
        return layouts[path]
    if len(shape) == 2:
        return MATRIX
    raise ValueError(
        f"target {path!r} has shape {tuple(shape)}: with more than 2 axes its layout (stacked "
        "layers, several input axes, a conv kernel) depends on the layer. Pass "
        "layouts=lowrank.discover_layouts(model, params, *example_inputs) to init_adapters."
    )


def target_of(path: str, weight: Any, layouts: Mapping | None = None) -> Target:
    """The :class:`~lowrank.method.Target` a method's ``init`` gets for ``weight``.

    >>> target_of("d/kernel", jnp.ones((8, 4))).factorization.contract
    (0,)
    """
    shape = shape_of(weight)
    dtype = jnp.dtype(weight.dtype)
    if quant.is_quantized(weight) or not jnp.issubdtype(dtype, jnp.floating):
        # Over a 4-bit base the adapters train in float32 (PEFT's autocast_adapter_dtype),
        # whatever the dtype the weights had before quantization (bfloat16 when loaded so).
        dtype = jnp.dtype(jnp.float32)
    return Target(path, weight, shape, _factorization(path, shape, layouts), dtype)


def init_adapters(
    key: jax.Array, params: Mapping, spec: LoraSpec, *, layouts: Mapping | None = None
) -> dict:
    """Creates the trainable tree: each target's leaf from its method (``spec.method_for``),
    a copy of each trainable leaf.

    Args:
      key: PRNG key.
      params: the model's params (or ``{"params": ...}`` variables).
      spec: what to adapt, and with which method (``spec.method``, ``spec.rules``).
      layouts: ``{path: Factorization}`` from :func:`lowrank.discover_layouts`, needed only
        for kernels with more than two axes (scanned layers, DenseGeneral, Einsum, Conv).

    >>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    >>> adapters = init_adapters(jax.random.key(0), params, LoraSpec(rank=2))
    >>> adapters["dense"]["kernel"].a.shape, adapters["dense"]["kernel"].b.shape
    ((8, 2), (2, 4))
    """
    flat = paths.flatten(paths.params_of(params))
    out: dict[str, Any] = {}
    targets = {p: target_of(p, flat[p], layouts) for p in _validate_targets(flat, spec)}
    methods = {p: spec.method_for(p) for p in targets}
    prepared = {m: m.prepare([targets[p] for p in targets if methods[p] == m])
                for m in dict.fromkeys(methods.values())}
    for p, target in targets.items():
        out[p] = prepared[methods[p]].init(_path_key(key, p), target)
    if spec.trainable is not None:
        extra = [p for p in paths.select(list(flat), spec.trainable) if p not in out]
        if not extra:
            raise ValueError(
                f"LoraSpec.trainable {spec.trainable!r} matches no parameter outside the "
                "targets. Parameter paths: " + paths.candidates_hint(list(flat))
            )
        for p in extra:
            if frozen.is_frozen(flat[p]):
                what = ("quantized" if quant.is_quantized(flat[p])
                        else f"a frozen {type(flat[p]).__name__}")
                raise ValueError(f"trainable leaf {p!r} is {what}; train a float weight")
            out[p] = jnp.array(flat[p])
    return paths.unflatten(out)


def materialize(leaf: Any, dtype: Any | None = None) -> jax.Array:
    """A frozen leaf as a plain array (quantized ones dequantized, low-rank ones multiplied
    out, to their original dtype)."""
    if frozen.is_frozen(leaf):
        return leaf.materialize(dtype or jnp.dtype(leaf.dtype))
    return leaf


def shape_of(leaf: Any) -> tuple[int, ...]:
    """The logical shape of an array or a frozen leaf (leading stack axes included)."""
    return frozen.shape_of(leaf)


def check_fits(frozen_flat: Mapping[str, Any], adapters_flat: Mapping[str, Any]) -> None:
    """Raises a ValueError naming the first adapter that does not fit the frozen tree."""
    for p, leaf in adapters_flat.items():
        if p not in frozen_flat:
            raise ValueError(
                f"adapters tree does not fit the model: {p!r} is not a parameter. Parameters: "
                + paths.candidates_hint(list(frozen_flat))
            )
        base_shape = shape_of(frozen_flat[p])
        if is_adapter(leaf):
            got = leaf.delta_shape()
            if got != base_shape:
                shapes = " times ".join(f"{k.upper()} {tuple(np.shape(v))}"
                                        for k, v in leaf.arrays().items() if k in ("a", "b"))
                raise ValueError(
                    f"adapters tree does not fit the model at {p!r}: {shapes} gives {got}, "
                    f"the weight is {base_shape}"
                )
        elif tuple(np.shape(leaf)) != base_shape:
            raise ValueError(
                f"adapters tree does not fit the model at {p!r}: trainable leaf has shape "
                f"{tuple(np.shape(leaf))}, the weight is {base_shape}"
            )


def merge(frozen: Mapping, adapters: Mapping) -> dict:
    """A plain dense params tree: each adapter's ``leaf.merge(W)``, trained leaves in place.

    Quantized weights are dequantized (to their original dtype), so the result runs on the
    unmodified model with ``model.apply``; a method's shared frozen arrays (paths starting
    with ``@``, VeRA's loaded projections) are read and left out. For export and inference;
    training keeps the factored form.

    >>> params = {"d": {"kernel": jnp.ones((4, 4))}}
    >>> adapters = init_adapters(jax.random.key(0), params, LoraSpec(rank=1))
    >>> bool((merge(params, adapters)["d"]["kernel"] == 1).all())
    True
    """
    flat = paths.flatten(paths.params_of(frozen))
    ad = paths.flatten(adapters)
    check_fits(flat, ad)
    out = {p: materialize(w) for p, w in flat.items() if not is_shared(p)}
    for p, leaf in ad.items():
        out[p] = (leaf.bind(flat).merge(out[p]).astype(out[p].dtype) if is_adapter(leaf)
                  else leaf)
    return paths.unflatten(out)


def unmerge(merged: Mapping, adapters: Mapping) -> dict:
    """Takes the updates back out of a merged tree (``W - s A B`` for LoRA), where the
    method allows it.

    Full-rank trainable leaves keep their trained values (the originals are not in either tree).

    >>> from lowrank.lora import LoraPair
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
        if is_adapter(leaf):
            flat[p] = leaf.bind(flat).unmerge(flat[p]).astype(flat[p].dtype)
    return paths.unflatten(flat)
