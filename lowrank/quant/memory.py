"""Exact memory of a tree of arrays and quantized arrays, read from the arrays themselves."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from lowrank import paths
from lowrank.frozen import is_frozen
from lowrank.quant.array import is_quantized


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes held and parameters represented by a tree (optionally per group of paths).

    Attributes:
      bytes: bytes of every array leaf (for a frozen leaf such as a QuantizedArray: its codes
        and scales; a low-rank kernel: its factors).
      params: parameter count (for a frozen leaf: the logical element count of the weight it
        stands for).
      groups: `{group: MemoryReport}` when asked for by `memory_report(group_depth=...)`.
      quantized: the same for the frozen leaves alone (QuantizedArrays, low-rank kernels;
        None when there are none), so a frozen base's bits per parameter can be said apart:
        over all leaves (embeddings, norms and heads in float included) and over the
        quantized or compressed kernels.
      label: how `str` names the frozen leaves: "quantized" when all are QuantizedArrays,
        else "compressed".
    """

    bytes: int
    params: int
    groups: dict[str, MemoryReport] | None = None
    quantized: MemoryReport | None = None
    label: str = dataclasses.field(default="quantized", repr=False)

    @property
    def bits_per_param(self) -> float:
        """8 * bytes / params (nan for an empty tree)."""
        return 8.0 * self.bytes / self.params if self.params else float("nan")

    def __str__(self) -> str:
        text = (f"{self.params:,} params, {self.bytes:,} bytes, "
                f"{self.bits_per_param:.3f} bits/param")
        q = self.quantized
        if q is not None and q.params != self.params:
            text += (f" ({q.label} leaves: {q.params:,} params, {q.bytes:,} bytes, "
                     f"{q.bits_per_param:.3f} bits/param)")
        return text


def _leaf_size(leaf: Any) -> tuple[int, int]:
    """(bytes, params) of one leaf: an array, a ShapeDtypeStruct or a frozen leaf."""
    if is_frozen(leaf):
        return leaf.nbytes, leaf.size
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        raise TypeError(f"memory_report counts arrays and frozen leaves, got "
                        f"{type(leaf).__name__}")
    size = math.prod(leaf.shape)
    return size * np.dtype(leaf.dtype).itemsize, size


def memory_report(tree: Any, group_depth: int = 0) -> MemoryReport:
    """Exact bytes, parameter count and bits per parameter of a pytree.

    Works on any pytree of arrays, `jax.ShapeDtypeStruct`s (so a quantized tree can be
    measured through `jax.eval_shape` without computing it) and frozen leaves
    (QuantizedArrays, low-rank kernels; see `lowrank.frozen`).

    Args:
      tree: the pytree.
      group_depth: when > 0, also report per group of leaves sharing their first
        `group_depth` path components (1: per top-level entry).

    Example:
      >>> from lowrank.quant.array import quantize
      >>> import jax.numpy as jnp
      >>> report = memory_report({"w": quantize(jnp.ones((64, 64))), "b": jnp.zeros(64)})
      >>> report.params, report.bytes
      (4160, 2560)
      >>> round(report.bits_per_param, 3), report.quantized.bits_per_param
      (4.923, 4.5)
    """
    if not isinstance(group_depth, int) or group_depth < 0:
        raise ValueError(f"group_depth must be an int >= 0, got {group_depth!r}")
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_frozen)[0]
    total_bytes = total_params = quant_bytes = quant_params = 0
    only_quantized = True
    groups: dict[str, list[int]] = {}
    for key_path, leaf in leaves:
        nbytes, params = _leaf_size(leaf)
        total_bytes += nbytes
        total_params += params
        if is_frozen(leaf):
            quant_bytes += nbytes
            quant_params += params
            only_quantized = only_quantized and is_quantized(leaf)
        if group_depth:
            group = paths.SEP.join(paths.key_name(k) for k in key_path[:group_depth])
            acc = groups.setdefault(group, [0, 0])
            acc[0] += nbytes
            acc[1] += params
    by_group = {g: MemoryReport(b, p) for g, (b, p) in groups.items()} if group_depth else None
    label = "quantized" if only_quantized else "compressed"
    quantized = MemoryReport(quant_bytes, quant_params, label=label) if quant_params else None
    return MemoryReport(total_bytes, total_params, by_group, quantized)
