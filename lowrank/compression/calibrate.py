"""Input second moments of the kernels to compress, from a few calibration batches (for
activation-aware truncation, as ASVD and SVD-LLM whiten by them)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import layers, paths


def _tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _moment(module: nn.Module, x: Any, args: tuple, kwargs: dict, path: str,
            probing: list[bool]) -> tuple[Any, int]:
    """``(x^T x, rows)`` of one call: the second moment (summed, float32) of the inputs the
    kernel contracts with, as rows in the kernel's own row order (``[..., k, k]``, one per
    slice of an Einsum's batch axes), and how many rows each slice saw. There the output
    error of a truncated kernel is ``||X dW||``."""
    kind = type(module)
    if kind is nn.Dense or (kind is nn.DenseGeneral and not _tuple(module.batch_dims)):
        axes = [a % x.ndim for a in _tuple(getattr(module, "axis", -1))]
        moved = jnp.moveaxis(x, axes, list(range(x.ndim - len(axes), x.ndim)))
        rows = jnp.reshape(moved, (-1, math.prod(x.shape[a] for a in axes)))
    elif kind is nn.Conv and module.feature_group_count == 1 and module.mask is None:
        rows = _conv_patches(module, x, probing)
    elif kind is nn.Einsum:
        return _einsum_moment(module, x, args, kwargs, path)
    else:
        raise layers.UnsupportedLayer(
            f"activation-aware compression of {path!r}: {kind.__name__} is not supported "
            "(nn.Dense, nn.DenseGeneral without batch_dims, nn.Conv and nn.Einsum are); "
            "exclude it from the targets or compress it without stats")
    rows = rows.astype(jnp.float32)
    return jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST), rows.shape[0]


def _einsum_moment(module: nn.Einsum, x: Any, args: tuple, kwargs: dict,
                   path: str) -> tuple[Any, int]:
    """An Einsum's moment per slice of its batch labels (in the kernel and the output), over
    the contracted labels in kernel order; the input's other labels index rows."""
    x_labels, k_labels, out = layers.einsum_parts(module, args, kwargs)
    if "." in x_labels + k_labels or any(c not in k_labels and c not in out for c in x_labels):
        raise layers.UnsupportedLayer(
            f"activation-aware compression of {path!r}: nn.Einsum {x_labels},{k_labels}->{out} "
            "has an ellipsis or sums an input axis outside the kernel; not supported")
    batch = [c for c in k_labels if c in x_labels and c in out]
    contract = [c for c in k_labels if c in x_labels and c not in out]
    fresh = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in x_labels + k_labels + out)
    twin = {c: next(fresh) for c in contract}
    x2 = "".join(twin.get(c, c) for c in x_labels)
    spec = (f"{x_labels},{x2}->{''.join(batch)}{''.join(contract)}"
            f"{''.join(twin[c] for c in contract)}")
    xf = x.astype(jnp.float32)
    m = jnp.einsum(spec, xf, xf, precision=jax.lax.Precision.HIGHEST)
    size = dict(zip(x_labels, x.shape, strict=True))
    k = math.prod(size[c] for c in contract)
    rows = math.prod(size[c] for c in x_labels if c not in k_labels)
    return jnp.reshape(m, (*(size[c] for c in batch), k, k)), rows


def activation_stats(model: nn.Module, params: Mapping, batches: Iterable[Any],
                     targets: str, *, method: Any = None) -> dict[str, np.ndarray]:
    """``{path: E[x x^T]}``: the second moment of the inputs of each kernel matching
    ``targets`` (a regex on '/'-joined paths), over every call in ``batches``.

    The model runs under ``jax.jit`` on plain ``params`` (float, unadapted); each matched
    layer computes ``x^T x`` in the graph (float32, highest matmul precision) and hands it to
    the host with a ``jax.debug.callback``, where the sums are float64. A layer inside
    ``nn.scan`` (a stacked kernel ``[L, in, out]``) gets one moment per slice, ``[L, in, in]``:
    each call is credited to the slice whose weights it runs with (found in the graph, so a
    reversed scan or a layer called twice per step is counted right; slices with identical
    weights cannot be told apart and the first takes their calls). Supported:
    ``nn.Dense``; ``nn.DenseGeneral`` without ``batch_dims`` (over all its input axes);
    ``nn.Conv`` (its inputs are the patches its kernel contracts with,
    ``[prod(kernel_size) * in]``); ``nn.Einsum`` without an ellipsis (one moment per slice of
    the labels the kernel shares with input and output, as a per-head projection's heads). An
    error names any other kernel.

    Args:
      model: an unmodified linen module.
      params: its float params (or ``{"params": ...}``).
      batches: iterable of model inputs: an array, or a tuple of positional arguments.
      targets: regex of the kernels to measure (``CompressSpec.targets``).
      method: the module method to run (as ``model.apply(..., method=)``).

    >>> import jax.numpy as jnp
    >>> model = nn.Dense(2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> stats = activation_stats(model, params, [jnp.eye(3)], r".*kernel")
    >>> np.round(stats["kernel"], 3).tolist()
    [[0.333, 0.0, 0.0], [0.0, 0.333, 0.0], [0.0, 0.0, 0.333]]
    """
    inner = paths.params_of(params)
    shapes = {p: np.shape(leaf) for p, leaf in paths.flatten(inner).items()}
    sums: dict[str, np.ndarray] = {}  # per path: [slices, *moment]
    counts: dict[str, np.ndarray] = {}  # per path: rows seen by each slice
    lead: dict[str, tuple[int, ...]] = {}  # per path: its stack axes (nn.scan), if any
    traced: list[Mapping] = [{}]  # the params as traced in the current run
    probing = [False]  # inside _conv_patches' own conv: not a call of the model

    def record(path: str, rows: int, xtx: Any, index: Any) -> None:
        i = int(index)
        sums[path][i] += np.asarray(xtx, np.float64)
        counts[path][i] += rows

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        rule = layers.rule_for(module)
        if probing[0] or rule is None or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = paths.SEP.join((*module.path, rule.weight))
        if not paths.select([path], targets):
            return next_fun(*args, **kwargs)
        xtx, rows = _moment(module, args[0], args, kwargs, path, probing)
        kernel = module.get_variable("params", rule.weight)
        index = _slice_index(traced[0][path], kernel)
        if path not in sums:
            lead[path] = shapes[path][:len(shapes[path]) - kernel.ndim]
            sums[path] = np.zeros((math.prod(lead[path]), *xtx.shape))
            counts[path] = np.zeros(math.prod(lead[path]))
        jax.debug.callback(functools.partial(record, path, rows), xtx, index, ordered=True)
        return next_fun(*args, **kwargs)

    kwargs = {} if method is None else {"method": method}

    @jax.jit
    def run(variables, args):
        traced[0] = paths.flatten(variables["params"])
        with nn.intercept_methods(interceptor):
            model.apply(variables, *args, **kwargs)

    variables = {"params": inner}
    for batch in batches:
        run(variables, batch if isinstance(batch, tuple) else (batch,))
    jax.effects_barrier()
    if not sums:
        raise ValueError(f"activation_stats: no call of a layer whose kernel matches "
                         f"{targets!r} ran over the batches")
    out = {}
    for path in sorted(sums):
        if not counts[path].all():
            raise ValueError(f"activation_stats: slices {np.flatnonzero(counts[path] == 0)} "
                             f"of the stacked kernel {path!r} never ran over the batches")
        moment = sums[path].shape[1:]
        mean = sums[path] / counts[path].reshape(-1, *[1] * len(moment))
        out[path] = mean.reshape(*lead[path], *moment)
    return out


def _slice_index(stacked: Any, kernel: Any) -> Any:
    """Which slice of ``stacked`` (a kernel with leading stack axes, or a plain one) the layer
    running now holds, in the graph: the one equal to ``kernel``. Inside ``nn.scan`` the
    iteration is not otherwise known to the layer, and the slices of a trained or randomly
    initialised stack differ."""
    n_lead = stacked.ndim - kernel.ndim
    if n_lead == 0:
        return jnp.zeros((), jnp.int32)
    flat = jnp.reshape(stacked, (-1, *kernel.shape))
    distance = jnp.sum(jnp.abs(flat - kernel[None]), axis=tuple(range(1, flat.ndim)))
    return jnp.argmin(distance).astype(jnp.int32)


def _conv_patches(module: nn.Conv, x: Any, probing: list[bool]) -> Any:
    """The patches an ``nn.Conv`` contracts its kernel with, as rows ``[n, prod(k) * in]`` in
    the kernel's row order (``x`` convolved by the module's own padding, strides and
    dilations with an identity kernel: output channel j is patch entry j)."""
    kernel = module.get_variable("params", "kernel")
    k = int(np.prod(kernel.shape[:-1]))
    identity = jnp.eye(k, dtype=jnp.float32).reshape(*kernel.shape[:-1], k)
    probe = module.clone(parent=None, features=k, use_bias=False, dtype=jnp.float32,
                         param_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    probing[0] = True
    try:
        patches = probe.apply({"params": {"kernel": identity}}, x.astype(jnp.float32))
    finally:
        probing[0] = False
    return jnp.reshape(patches, (-1, k))
