"""`QuantizedArray`: a block-wise quantized weight as a plain pytree, with quantize/dequantize."""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank.frozen import FrozenLeaf
from lowrank.quant import blockwise
from lowrank.quant.formats import get_format


def default_compute_dtype() -> str:
    """float32 on CPU (faster there than bfloat16), bfloat16 on accelerators.

    Example:
      >>> default_compute_dtype() in ("float32", "bfloat16")
      True
    """
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class QuantizedArray(FrozenLeaf):
    """A block-wise quantized array: packed codes, block scales and static metadata.

    A frozen leaf (:mod:`lowrank.frozen`): it has no matmul of its own, so a layer runs on
    its dequantized weight (``materialize``).

    Every array leaf carries the same leading "stack" axes `lead` (none for a single
    weight; `[L]` for the kernel of L scanned layers), so that slicing all leaves along
    axis 0 (as `nn.scan` and `jax.vmap` do) gives a valid QuantizedArray of one layer.

    Array leaves:
      codes: uint8 `[*lead, nbytes]`: 4-bit codes two per byte (first in the high nibble),
        or one int8 code per byte.
      absmax: the block scales `[*lead, nblocks]`: float32, or with double quantization
        their uint8 codes in the dynamic map.
      absmax_scale: float32 `[*lead, ceil(nblocks / 256)]`, double quantization only.
      absmax_offset: float32 `[*lead]`, the mean subtracted before double quantization.

    Static metadata:
      shape: logical shape of one slice (the array `dequantize` returns, without `lead`).
      dtype: name of the original dtype.
      fmt, block_size, double_quant: how it was quantized.
      perm: the slice was stored as `slice.transpose(perm)` (flattened row-major), or None.
      compute_dtype: name of the dtype `dequantize` returns by default.
    """

    codes: jax.Array
    absmax: jax.Array
    absmax_scale: jax.Array | None
    absmax_offset: jax.Array | None
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    fmt: str = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    double_quant: bool = dataclasses.field(metadata=dict(static=True))
    perm: tuple[int, ...] | None = dataclasses.field(metadata=dict(static=True))
    compute_dtype: str = dataclasses.field(metadata=dict(static=True))

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """The leading stack axes, read from the leaves (empty for a single weight)."""
        return tuple(self.codes.shape[:-1])

    @property
    def ndim(self) -> int:
        """Rank of the full logical array: lead axes plus the slice's axes."""
        return len(self.lead_shape) + len(self.shape)

    @property
    def size(self) -> int:
        """Logical element count, lead axes included (the number of parameters held)."""
        return math.prod(self.lead_shape) * math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of all array leaves."""
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(self))

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The full logical shape: leading stack axes, then one slice's shape."""
        return self.lead_shape + self.shape

    def materialize(self, dtype: Any = None) -> jax.Array:
        """``dequantize(self, dtype)``."""
        return dequantize(self, dtype)


jax.tree_util.register_dataclass(QuantizedArray)


def logical_shape(q: QuantizedArray) -> tuple[int, ...]:
    """The full logical shape of `q`: its leading stack axes, then one slice's shape.

    Example:
      >>> logical_shape(quantize(jnp.ones((3, 64, 8)), stack_axes=1))
      (3, 64, 8)
    """
    return q.lead_shape + q.shape


def is_quantized(x: Any) -> bool:
    """Whether `x` is a `QuantizedArray` (use as `is_leaf` when walking a frozen tree).

    Example:
      >>> is_quantized(quantize(jnp.ones((64, 64)))), is_quantized(jnp.ones(3))
      (True, False)
    """
    return isinstance(x, QuantizedArray)


def check_block_size(block_size: Any) -> None:
    """Raises unless `block_size` is a positive int."""
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
        raise TypeError(f"block_size must be a positive int, got {block_size!r}")
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size}")


def _check_float(x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize expects a floating-point array (float16, bfloat16, float32, "
                        f"float64), got dtype {x.dtype}")


def check_finite(x: Any, name: str | None = None, *,
                 why: str = "quantized, an inf makes its block NaN and a NaN becomes a "
                            "number") -> None:
    """Raises ValueError naming `name` (else the shape), how many of `x`'s values are NaN or
    infinite, and the first one's index; a traced `x` (under `jax.jit`) is not checked.

    Quantizing them corrupts without a word: an inf makes its block's absmax infinite, so
    the whole block (with double quantization, the whole array) dequantizes to NaN, and a NaN
    is stored as an ordinary code. So they are refused where they enter.

    Example:
      >>> check_finite(jnp.ones(3))
      >>> check_finite(jnp.array([1.0, jnp.nan, jnp.inf]), "fc/kernel")
      Traceback (most recent call last):
      ...
      ValueError: fc/kernel has 2 non-finite values of 3 (1 NaN, 1 inf; the first at index \
(1,)): quantized, an inf makes its block NaN and a NaN becomes a number; fix \
the weights, or pass allow_nonfinite=True
    """
    if isinstance(x, jax.core.Tracer):
        return
    if bool(jnp.isfinite(x).all()):  # on the device: nothing copied unless one is bad
        return
    values = np.asarray(jax.device_get(x))
    finite = np.isfinite(values)
    nan = int(np.isnan(values).sum())
    bad = int(values.size - finite.sum())
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    what = name if name is not None else f"an array of shape {tuple(values.shape)}"
    raise ValueError(f"{what} has {bad} non-finite values of {values.size} ({nan} NaN, "
                     f"{bad - nan} inf; the first at index {first}): {why}; fix the weights, "
                     "or pass allow_nonfinite=True")


def _check_perm(perm: tuple[int, ...] | None, slice_ndim: int) -> None:
    if perm is not None and sorted(perm) != list(range(slice_ndim)):
        raise ValueError(f"perm must be a permutation of range({slice_ndim}) (the axes of one "
                         f"slice), got {perm}")


def quantize(x: jax.Array, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False,
             *, perm: tuple[int, ...] | None = None, stack_axes: int = 0,
             compute_dtype: str | None = None, allow_nonfinite: bool = False,
             name: str | None = None) -> QuantizedArray:
    """Quantizes `x` block-wise over its flattened row-major values.

    For nf4 and fp4 the codes, absmax (and with `double_quant` the nested codes, scales and
    offset) equal bitsandbytes' `quantize_4bit(x, blocksize, compress_statistics=double_quant,
    quant_type=fmt)` of the same array, so a torch-layout `[out, in]` weight quantizes
    exactly as bitsandbytes does. int4 and int8 are symmetric absmax formats.

    Args:
      x: a floating-point array.
      fmt: one of `FORMATS`.
      block_size: values per block (bitsandbytes' default 64).
      double_quant: also quantize the block scales (8 bits, blocks of 256, mean offset).
      perm: store each slice as `slice.transpose(perm)`; `dequantize` undoes it. Lets
        blocks run along a chosen axis (e.g. `(1, 0)` stores a Dense `[in, out]` kernel as
        its torch layout).
      stack_axes: how many leading axes of `x` are independent slices, each quantized on
        its own (e.g. 1 for the `[L, in, out]` kernel of scanned layers).
      compute_dtype: dtype name `dequantize` returns by default (default: float32 on CPU,
        bfloat16 elsewhere).
      allow_nonfinite: quantize NaN / inf values anyway. By default they are refused (a
        ValueError with their count): an inf makes its whole block NaN when dequantized
        (with `double_quant` the whole array), and a NaN comes back as a number.
      name: what to call `x` in errors (its path in a params tree).

    Example:
      >>> w = jax.random.normal(jax.random.key(0), (128, 64))
      >>> q = quantize(w, "nf4", 64, double_quant=True)
      >>> q.codes.shape, q.absmax.dtype, dequantize(q).shape
      ((4096,), dtype('uint8'), (128, 64))
    """
    get_format(fmt)  # validates the name
    check_block_size(block_size)
    x = jnp.asarray(x)
    _check_float(x)
    if not allow_nonfinite:
        check_finite(x, name)
    if not isinstance(stack_axes, int) or not 0 <= stack_axes <= x.ndim:
        raise ValueError(f"stack_axes must be an int in [0, {x.ndim}] for an array of shape "
                         f"{x.shape}, got {stack_axes!r}")
    slice_shape = x.shape[stack_axes:]
    if math.prod(slice_shape) == 0:
        raise ValueError(f"cannot quantize an empty array (slice shape {slice_shape})")
    if perm is not None:
        perm = tuple(int(p) for p in perm)
        _check_perm(perm, len(slice_shape))
    codes, absmax, scale, offset = _quantize_leaves(x, fmt, int(block_size), bool(double_quant),
                                                    perm, stack_axes)
    return QuantizedArray(
        codes=codes, absmax=absmax, absmax_scale=scale, absmax_offset=offset,
        shape=tuple(slice_shape), dtype=jnp.dtype(x.dtype).name, fmt=fmt,
        block_size=int(block_size), double_quant=bool(double_quant), perm=perm,
        compute_dtype=compute_dtype or default_compute_dtype())


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize_leaves(x, fmt, block_size, double_quant, perm, stack_axes):
    # Jitted as a whole: eagerly, the many small ops of the double quantization's exact
    # summation order would each be dispatched on their own.
    if perm is not None:
        x = jnp.transpose(x, tuple(range(stack_axes)) + tuple(stack_axes + p for p in perm))
    flat = x.reshape(*x.shape[:stack_axes], -1)
    codes, absmax = blockwise.quantize_blocks(flat, get_format(fmt), block_size)
    scale = offset = None
    if double_quant:
        lead = absmax.shape[:-1]
        if lead:
            # One slice at a time: batched, XLA computes the mean's division differently and
            # some slices' offsets came out 1 ulp off the per-slice (bitsandbytes) value.
            flat_absmax = absmax.reshape(-1, absmax.shape[-1])
            absmax, scale, offset = jax.lax.map(blockwise.double_quantize, flat_absmax)
            absmax, scale = absmax.reshape(*lead, -1), scale.reshape(*lead, -1)
            offset = offset.reshape(lead)
        else:
            absmax, scale, offset = blockwise.double_quantize(absmax)
    return codes, absmax, scale, offset


def dequantize(q: QuantizedArray, dtype: Any = None) -> jax.Array:
    """The logical array `[*lead, *q.shape]` of `q`, computed in float32, cast to `dtype`.

    Pure jnp and jit-able; works for any number of leading stack axes (read from the
    leaves) and under `jax.vmap`. For nf4 and fp4 the float32 result equals bitsandbytes'
    `dequantize_4bit` bit for bit.

    Args:
      q: the quantized array.
      dtype: result dtype; None means `q.compute_dtype`.

    Example:
      >>> w = jnp.linspace(-1.0, 1.0, 64 * 32).reshape(64, 32)
      >>> float(jnp.abs(dequantize(quantize(w, "int8"), jnp.float32) - w).max()) < 0.01
      True
    """
    if not is_quantized(q):
        raise TypeError(f"dequantize expects a QuantizedArray, got {type(q).__name__}")
    form = get_format(q.fmt)
    lead = q.lead_shape
    n = math.prod(q.shape)
    absmax = q.absmax
    if q.double_quant:
        absmax = blockwise.double_dequantize(q.absmax, q.absmax_scale, q.absmax_offset)
    flat = blockwise.dequantize_blocks(q.codes, absmax, form, q.block_size, n)
    if q.perm is None:
        values = flat.reshape(*lead, *q.shape)
    else:
        stored_shape = tuple(q.shape[p] for p in q.perm)
        inverse = tuple(int(i) for i in np.argsort(q.perm))
        values = jnp.transpose(flat.reshape(*lead, *stored_shape),
                               tuple(range(len(lead))) + tuple(len(lead) + i for i in inverse))
    return values.astype(dtype if dtype is not None else q.compute_dtype)


def quantize_leaves(x: jax.Array, fmt: str = "nf4", block_size: int = 64,
                    double_quant: bool = False) -> tuple[jax.Array, ...]:
    """The array leaves of ``quantize(x, fmt, block_size, double_quant)``, traceable.

    ``(codes, absmax, absmax_scale, absmax_offset)`` (the last two None without double
    quantization), for code that quantizes inside its own ``jax.jit`` (a loader fusing the
    conversion of a tensor with its quantization) and builds the ``QuantizedArray`` after.
    No argument checks: ``quantize`` is the checked entry point.

    Example:
      >>> codes, absmax, scale, offset = jax.jit(quantize_leaves)(jnp.ones(128))
      >>> codes.shape, absmax.shape, scale is None
      ((64,), (2,), True)
    """
    return _quantize_leaves(x, fmt, int(block_size), bool(double_quant), None, 0)
