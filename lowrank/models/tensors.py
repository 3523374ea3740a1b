"""One checkpoint tensor -> one parameter leaf: transposed, cast, quantized on its device.

Each function takes the host tensor (a numpy array read from a safetensors file), moves it to
the device the parameter will live on and converts it there in one jitted step, so that only
the result stays allocated: the host copy can be freed as soon as it is on the device.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from lowrank.models.architectures import is_kernel
from lowrank.quant.array import QuantizedArray, default_compute_dtype, quantize_leaves
from lowrank.quant.tree import Layout, QuantSpec, default_layout


def release_freed_memory() -> None:
    """Returns the heap pages freed since the last call to the OS (glibc only).

    Each tensor's float copies are freed as soon as it is converted, but glibc keeps freed
    heap pages resident for reuse, and tensors of changing sizes reuse them badly: loading
    a 200M-parameter Llama checkpoint grew the resident set ~100 MiB beyond the tree it
    built without this (measured with tests/load_peak.py).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018  (glibc has it; musl and macOS do not)
except (OSError, AttributeError):
    _LIBC = None


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _convert(tensor: jax.Array, kernel: bool, perm: tuple[int, ...] | None, dtype: Any,
             spec: QuantSpec | None) -> Any:
    # One jitted step per tensor shape: the transposes fold, the cast fuses into the
    # quantization, and only the result is allocated.
    x = tensor.T if kernel else tensor
    x = x if perm is None else jnp.transpose(x, perm)
    x = x.astype(dtype)
    if spec is None:
        return x
    return quantize_leaves(x, spec.fmt, spec.block_size, spec.double_quant)


@jax.jit
def _count_nonfinite(tensor: jax.Array) -> jax.Array:
    # Its own step: inside _convert, a second reader of the tensor costs a float32 copy.
    return jnp.sum(~jnp.isfinite(tensor), dtype=jnp.int32)


def float_leaf(path: str, tensor: Any, dtype: Any, device: Any = None) -> jax.Array:
    """A checkpoint tensor as our parameter at ``path``: kernels transposed, cast to ``dtype``.

    >>> import numpy as np
    >>> float_leaf("fc/kernel", np.ones((3, 2), np.float32), jnp.bfloat16).shape
    (2, 3)
    """
    tensor = jax.device_put(tensor, device)  # the caller's host copy can go now
    kernel, dtype = is_kernel(path), jnp.dtype(dtype)
    if not kernel and tensor.dtype == dtype:
        return tensor  # as stored: no second copy (an embedding table is the largest tensor)
    return _convert(tensor, kernel, None, dtype, None)


def quantized_leaf(path: str, tensor: Any, spec: QuantSpec, layout: Layout, dtype: Any,
                   device: Any = None) -> QuantizedArray:
    """A checkpoint tensor quantized as ``quantize_tree`` quantizes our parameter at ``path``.

    The tensor is moved to ``device``, laid out as ``layout`` says, cast to ``dtype`` and
    quantized there in one jitted step (a Linear weight ``[out, in]`` is already the stored
    layout of its kernel); the result equals ``quantize_leaf(path, float_leaf(path, tensor,
    dtype), spec, layout)``. A tensor with non-finite values is refused (they would spread
    over their whole block, or with double quantization the whole tensor).

    >>> import numpy as np
    >>> q = quantized_leaf("fc/kernel", np.ones((8, 64), np.float32), QuantSpec(),
    ...                    Layout(0, (1, 0)), jnp.float32)
    >>> q.shape, q.perm
    ((64, 8), (1, 0))
    """
    kernel = is_kernel(path)
    shape = tuple(tensor.shape[::-1]) if kernel else tuple(tensor.shape)
    quant_spec = dataclasses.replace(spec, targets=".*", exclude=None, extra=None, stacked=None,
                                     allow_nonfinite=False)
    if kernel and tensor.ndim == 2 and layout.perm == (1, 0):
        # The Linear weight [out, in] is already the stored layout: quantized flat, kernels
        # of one size share one compiled step (gate, up and down projections do).
        tensor, kernel, perm = tensor.reshape(-1), False, None
    else:
        perm = layout.perm
    tensor = jax.device_put(tensor, device)
    nonfinite = 0 if spec.allow_nonfinite else int(_count_nonfinite(tensor))
    if nonfinite:
        raise ValueError(f"cannot quantize {path!r}: {nonfinite} of its "
                         f"{math.prod(shape)} values are not finite (fix the checkpoint, or "
                         "pass QuantSpec(allow_nonfinite=True) to store them anyway)")
    leaves = _convert(tensor, kernel, perm, jnp.dtype(dtype), quant_spec)
    del tensor
    codes, absmax, scale, offset = leaves
    return QuantizedArray(
        codes=codes, absmax=absmax, absmax_scale=scale, absmax_offset=offset, shape=shape,
        dtype=jnp.dtype(dtype).name, fmt=spec.fmt, block_size=spec.block_size,
        double_quant=spec.double_quant, perm=layout.perm,
        compute_dtype=spec.compute_dtype or default_compute_dtype())


def quant_layout(path: str, slice_ndim: int, stacked: bool, spec: QuantSpec
                 ) -> Layout | None:
    """The layout ``quantize_tree`` gives the parameter at ``path``, or None (kept float).

    The stack axis comes from the model (a scanned layer), not from ``spec.stacked``.

    >>> quant_layout("model/layers/mlp/up_proj/kernel", 2, True, QuantSpec())
    Layout(stack_axes=1, perm=(1, 0))
    """
    layout = default_layout(path, slice_ndim, dataclasses.replace(spec, stacked=None))
    return None if layout is None else Layout(int(stacked), layout.perm)


__all__ = ["float_leaf", "quant_layout", "quantized_leaf", "release_freed_memory"]
