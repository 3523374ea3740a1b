"""Quantizing the chosen weights of a params tree: `QuantSpec`, `quantize_tree`."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank import paths
from lowrank.frozen import is_frozen
from lowrank.layers import Factorization
from lowrank.quant.array import (
    QuantizedArray,
    check_block_size,
    dequantize,
    is_quantized,
    quantize,
)
from lowrank.quant.formats import get_format


def _check_regex(pattern: str | None, name: str) -> None:
    if pattern is None:
        return
    if not isinstance(pattern, str):
        raise TypeError(f"QuantSpec.{name} must be a regex string or None, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"QuantSpec.{name}: {pattern!r} is not a valid regex ({e})") from None


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Which weights of a tree to quantize, and how.

    Patterns are regexes that must `re.fullmatch` a '/'-joined parameter path.

    Attributes:
      fmt: one of `FORMATS` ("nf4", "fp4", "int4", "int8").
      block_size: values per block.
      double_quant: quantize the block scales too (8 bits, blocks of 256, mean offset).
      targets: regex of the Dense-like kernels (leaves named `kernel`, 2+ axes) to quantize.
      exclude: regex of kernels left in full precision (an output head, say).
      extra: regex of other leaves to quantize as they are stored (embeddings, ...): by
        default biases, norms and embeddings stay as they are.
      stacked: regex of kernels that carry one leading stack axis (`nn.scan`-ned layers,
        `[L, in, out]`), quantized per layer.
      compute_dtype: dtype name `dequantize` returns (None: float32 on CPU, else bfloat16).
      allow_nonfinite: quantize NaN / inf weights anyway (by default refused, naming the path).

    Example:
      >>> QuantSpec("nf4", block_size=64, double_quant=True).fmt
      'nf4'
    """

    fmt: str = "nf4"
    block_size: int = 64
    double_quant: bool = False
    targets: str = r".*"
    exclude: str | None = None
    extra: str | None = None
    stacked: str | None = None
    compute_dtype: str | None = None
    allow_nonfinite: bool = False

    def __post_init__(self):
        get_format(self.fmt)
        check_block_size(self.block_size)
        for name in ("targets", "exclude", "extra", "stacked"):
            _check_regex(getattr(self, name), name)
        if self.compute_dtype is not None:
            try:
                dtype = jnp.dtype(self.compute_dtype)
            except TypeError:
                dtype = None
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"QuantSpec.compute_dtype must name a float dtype (float32, "
                                 f"bfloat16, float16), got {self.compute_dtype!r}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one weight is laid out for quantization: leading stack axes, then a permutation.

    Each slice is stored as `slice.transpose(perm)` (None: as it is), flattened row-major,
    so a `perm` that puts the contracted axes last makes blocks run along the contraction.
    """

    stack_axes: int = 0
    perm: tuple[int, ...] | None = None


def layout_from_factorization(ndim: int, factorization: Factorization) -> Layout:
    """The layout putting a kernel's contracted axes last (batch, out, then contract).

    Example:
      >>> from lowrank.layers import MATRIX
      >>> layout_from_factorization(3, MATRIX)  # a scanned Dense kernel [L, in, out]
      Layout(stack_axes=1, perm=(1, 0))
    """
    f = factorization
    return Layout(ndim - f.ndim, f.batch + f.out + f.contract)


def default_layout(path: str, ndim: int, spec: QuantSpec) -> Layout | None:
    """The layout of the leaf at `path`, or None to leave it unquantized.

    Kernels (leaves named `kernel` with 2+ axes, matching `spec.targets`, not
    `spec.exclude`) are read as `[*in_axes, out]` (a Dense `[in, out]`, a conv kernel),
    after one leading stack axis when `path` matches `spec.stacked`; they are stored with
    the output axis first, so blocks run along the contraction and a Dense kernel is stored
    as its torch-layout transpose `[out, in]`. Leaves matching `spec.extra` are stored as
    they are.

    Example:
      >>> default_layout("layer/kernel", 2, QuantSpec())
      Layout(stack_axes=0, perm=(1, 0))
      >>> default_layout("layer/bias", 1, QuantSpec()) is None
      True
    """
    name = path.rsplit(paths.SEP, 1)[-1]
    if name == "kernel" and ndim >= 2 and paths.select([path], spec.targets):
        if paths.select([path], spec.exclude):
            return None
        stack = 1 if paths.select([path], spec.stacked) else 0
        k = ndim - stack
        if k < 2:
            raise ValueError(f"kernel {path!r} matches QuantSpec.stacked {spec.stacked!r} but "
                             f"has {ndim} axes: a stacked kernel needs [L, in..., out]")
        return Layout(stack, (k - 1, *range(k - 1)))
    if paths.select([path], spec.extra):
        return Layout()
    return None


LayoutFn = Callable[[str, int, QuantSpec], Layout | None]


def quantize_tree(params: Mapping, spec: QuantSpec | None = None, *,
                  layouts: Mapping[str, Factorization] | None = None,
                  layout_fn: LayoutFn = default_layout) -> dict:
    """Quantizes the chosen weights of a params tree; everything else is kept as it is.

    Args:
      params: a nested-dict params tree (or `{"params": ...}` variables, returned wrapped).
      spec: what to quantize and how (default `QuantSpec()`: nf4, blocks of 64, every
        Dense-like kernel).
      layouts: `{path: Factorization}` from `lowrank.discover_layouts`: *how* a leaf is
        laid out, never *whether* it is quantized. A selected leaf found there is stored
        with its contracted axes last, after its leading stack axes, instead of the layout
        `layout_fn` gives it. (discover_layouts also names Embed tables: they stay float
        unless `spec` selects them.)
      layout_fn: `(path, ndim, spec) -> Layout | None`: which leaves are quantized (None:
        left as they are) and, for those not in `layouts`, how they are laid out.

    Example:
      >>> params = {"dense": {"kernel": jnp.ones((64, 8)), "bias": jnp.zeros(8)}}
      >>> frozen = quantize_tree(params, QuantSpec("nf4", double_quant=True))
      >>> is_quantized(frozen["dense"]["kernel"]), is_quantized(frozen["dense"]["bias"])
      (True, False)
    """
    spec = QuantSpec() if spec is None else spec
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    inner = paths.params_of(params)
    out: dict[str, Any] = {}
    for path, leaf in paths.flatten(inner).items():
        # A frozen leaf (already quantized, or low-rank factors) is kept as it is.
        layout = None if is_frozen(leaf) else layout_for(path, leaf, spec, layouts, layout_fn)
        out[path] = leaf if layout is None else quantize_leaf(path, leaf, spec, layout)
    tree = paths.unflatten(out)
    return {"params": tree} if inner is not params else tree


def layout_for(path: str, leaf: Any, spec: QuantSpec,
               layouts: Mapping[str, Factorization] | None = None,
               layout_fn: LayoutFn = default_layout) -> Layout | None:
    """The layout `quantize_tree` gives the leaf at `path` (None: left unquantized).

    `layout_fn` (from `spec`) decides whether the leaf is quantized; `layouts` only changes
    how a selected leaf is laid out.

    Example:
      >>> layout_for("fc/kernel", jnp.ones((3, 8, 4)), QuantSpec(stacked="fc/.*"))
      Layout(stack_axes=1, perm=(1, 0))
      >>> from lowrank.layers import MATRIX
      >>> layout_for("emb/embedding", jnp.ones((50, 8)), QuantSpec(),
      ...            {"emb/embedding": MATRIX}) is None
      True
    """
    ndim = np.ndim(leaf)
    layout = layout_fn(path, ndim, spec)
    if layout is None or layouts is None or path not in layouts:
        return layout
    return layout_from_factorization(ndim, layouts[path])


def quantize_leaf(path: str, leaf: jax.Array, spec: QuantSpec, layout: Layout) -> QuantizedArray:
    """Quantizes one leaf of a tree as `spec` and `layout` say (`path` names it in errors).

    Example:
      >>> quantize_leaf("fc/kernel", jnp.ones((64, 4)), QuantSpec(), Layout(0, (1, 0))).shape
      (64, 4)
    """
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        raise TypeError(f"cannot quantize {path!r}: dtype {jnp.result_type(leaf)} is not a "
                        "float dtype; exclude it from QuantSpec.targets / extra")
    return quantize(leaf, spec.fmt, spec.block_size, spec.double_quant, perm=layout.perm,
                    stack_axes=layout.stack_axes, compute_dtype=spec.compute_dtype,
                    allow_nonfinite=spec.allow_nonfinite, name=path)


def dequantize_tree(tree: Any, dtype: Any = None) -> Any:
    """Replaces every `QuantizedArray` in `tree` by its dequantized array.

    Args:
      tree: any pytree.
      dtype: result dtype; None means each array's `compute_dtype`.

    Example:
      >>> frozen = quantize_tree({"d": {"kernel": jnp.ones((64, 4))}})
      >>> dequantize_tree(frozen, jnp.float32)["d"]["kernel"].shape
      (64, 4)
    """
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, tree,
                        is_leaf=is_quantized)

