"""`init`: the frozen tree and the adapters together, for inits that change the base.

PiSSA (Meng et al., 2024) puts the top-r singular directions of each target into the adapter
and freezes only the residual; LoftQ (Li et al., 2023) alternates quantizing the base and
fitting the adapter to the quantization error, so that `Q + s A B` starts closer to `W` than
the quantized `Q` alone. Both return a new frozen tree as well as the adapters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lowrank import paths
from lowrank.adapters import init_adapters
from lowrank.compression.svd import split_singular, to_matrices
from lowrank.lora import LoraPair
from lowrank.method import is_adapter
from lowrank.quant import dequantize, quantize_tree
from lowrank.quant.array import check_finite
from lowrank.quant.tree import QuantSpec, layout_for, quantize_leaf
from lowrank.spec import LoraSpec


def _matrix(kernel: jax.Array, pair: LoraPair) -> jax.Array:
    """The kernel as matrices `[*lead, *batch, fan_in, fan_out]` (contracted axes as rows)."""
    f = pair.factorization
    return to_matrices(kernel, f, pair.a.ndim - len(f.batch) - len(f.contract) - 1)


def _top_singular_pair(matrix: jax.Array, pair: LoraPair) -> LoraPair:
    """A, B with `scale * A @ B` = the best rank-r approximation of `matrix` (per slice)."""
    a, b = split_singular(*jnp.linalg.svd(matrix.astype(jnp.float32), full_matrices=False),
                          pair.rank, pair.scale)
    return pair.replace(a=a.reshape(pair.a.shape).astype(pair.a.dtype),
                        b=b.reshape(pair.b.shape).astype(pair.b.dtype))


def _loftq(path: str, kernel: jax.Array, pair: LoraPair, quant: QuantSpec, layout,
           iters: int) -> tuple[Any, LoraPair]:
    weight = kernel.astype(jnp.float32)
    delta = jnp.zeros_like(weight)
    for _ in range(iters):
        q = quantize_leaf(path, (weight - delta).astype(kernel.dtype), quant, layout)
        pair = _top_singular_pair(_matrix(weight - dequantize(q, jnp.float32), pair), pair)
        delta = pair.delta(jnp.float32)
    return q, pair


def init(key: jax.Array, params: Mapping, spec: LoraSpec, *, quant: QuantSpec | None = None,
         layouts: Mapping | None = None, allow_nonfinite: bool = False) -> tuple[dict, dict]:
    """Creates `(frozen, adapters)` for any `LoraSpec.init`, quantizing the base if asked.

    - "kaiming" / "gaussian": adapters as `init_adapters`; the frozen tree is `params`
      (quantized with `quant` when given): plain LoRA or QLoRA.
    - "pissa": each target's A, B span its top-r singular directions (`scale * A B` equals
      that rank-r part); the frozen weight is the residual `W - scale * A B` (quantized with
      `quant` when given), so `frozen + scale * A B` is `W` again.
    - "loftq" (needs `quant`): for `spec.loftq_iters` steps, `Q = quant(W - scale * A B)` and
      A, B = the rank-r SVD of `W - Q`; the frozen weight is the last `Q`.

    Args:
      key: PRNG key (used by the random inits).
      params: the model's float params (or `{"params": ...}` variables).
      spec: the adapters; `spec.init` picks the initialisation.
      quant: how to quantize the frozen base (None: keep it in full precision).
      layouts: `{path: Factorization}` from `lowrank.discover_layouts`, for kernels with
        more than two axes (used both for the adapters and the quantization layout).
      allow_nonfinite: let PiSSA / LoftQ decompose a target holding NaN or inf (its adapters
        come out all NaN). By default such a target is a ValueError naming its path and the
        count; quantizing refuses non-finite weights on its own (see `quantize`).

    Returns:
      `(frozen, adapters)`, to be used as `lowrank.apply(model, frozen, adapters, x)`.

    Example:
      >>> params = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (64, 32))}}
      >>> frozen, adapters = init(jax.random.key(1), params, LoraSpec(rank=4, init="pissa"))
      >>> from lowrank.adapters import merge
      >>> merged = merge(frozen, adapters)["fc"]["kernel"]
      >>> bool(jnp.allclose(merged, params["fc"]["kernel"], atol=1e-5))
      True
    """
    if quant is not None and not isinstance(quant, QuantSpec):
        raise TypeError(f"quant must be a QuantSpec or None, got {type(quant).__name__}")
    if allow_nonfinite and quant is not None:
        quant = dataclasses.replace(quant, allow_nonfinite=True)
    if spec.init == "loftq" and quant is None:
        raise ValueError("LoraSpec(init='loftq') fits the adapters to a quantization error: "
                         "pass quant=QuantSpec(...)")
    if spec.init not in ("pissa", "loftq"):
        adapters = init_adapters(key, params, spec, layouts=layouts)
        return (params if quant is None else quantize_tree(params, quant, layouts=layouts),
                adapters)

    inner = paths.params_of(params)
    flat = dict(paths.flatten(inner))
    templates = paths.flatten(init_adapters(key, inner, dataclasses.replace(spec, init="kaiming"),
                                            layouts=layouts))
    adapters: dict[str, Any] = {}
    for path, leaf in templates.items():
        if not is_adapter(leaf):  # a full-rank trainable leaf
            adapters[path] = leaf
            continue
        kernel = jnp.asarray(flat[path])
        if not allow_nonfinite:  # one NaN in W makes every entry of its SVD NaN
            check_finite(kernel, path, why=f"its {spec.init} adapters would be all NaN")
        if spec.init == "pissa":
            pair = _top_singular_pair(_matrix(kernel, leaf), leaf)
            flat[path] = (kernel.astype(jnp.float32) - pair.delta(jnp.float32)).astype(kernel.dtype)
        else:
            layout = layout_for(path, kernel, quant, layouts)
            if layout is None:
                raise ValueError(f"LoftQ target {path!r} is not quantized by {quant}: add it to "
                                 "QuantSpec.targets (or .extra)")
            flat[path], pair = _loftq(path, kernel, leaf, quant, layout, spec.loftq_iters)
        adapters[path] = pair
    frozen = paths.unflatten(flat)
    if quant is not None:
        frozen = quantize_tree(frozen, quant, layouts=layouts)  # skips the LoftQ leaves
    return ({"params": frozen} if inner is not params else frozen), paths.unflatten(adapters)
