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
    return rows.T @ rows, rows.shape[0]


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
    m = jnp.einsum(spec, xf, xf)
    size = dict(zip(x_labels, x.shape, strict=True))
    k = math.prod(size[c] for c in contract)
    rows = math.prod(size[c] for c in x_labels if c not in k_labels)
    return jnp.reshape(m, (*(size[c] for c in batch), k, k)), rows


def activation_stats(model: nn.Module, params: Mapping, batches: Iterable[Any],
                     targets: str, *, method: Any = None) -> dict[str, np.ndarray]:
    """``{path: E[x x^T]}``: the second moment of the inputs of each kernel matching
    ``targets`` (a regex on '/'-joined paths), over every call in ``batches``.

    The model runs under ``jax.jit`` on plain ``params`` (float, unadapted); each matched
    layer computes ``x^T x`` in the graph and hands it to the host with an ordered
    ``jax.debug.callback``. A layer inside ``nn.scan`` (a stacked kernel ``[L, in, out]``) is
    called once per slice in order, so its moment is ``[L, in, in]``, one per slice. Supported:
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
    calls: dict[str, list[np.ndarray]] = {}  # this batch's x^T x per call, in call order
    counts: dict[str, int] = {}
    layer_ndim: dict[str, int] = {}

    def record(path: str, rows: int, xtx: Any) -> None:
        calls.setdefault(path, []).append(np.asarray(xtx, np.float64))
        counts[path] = counts.get(path, 0) + rows

    probing = [False]  # inside _conv_patches' own conv: not a call of the model

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        rule = layers.rule_for(module)
        if probing[0] or rule is None or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = paths.SEP.join((*module.path, rule.weight))
        if not paths.select([path], targets):
            return next_fun(*args, **kwargs)
        xtx, rows = _moment(module, args[0], args, kwargs, path, probing)
        layer_ndim[path] = len(module.get_variable("params", rule.weight).shape)
        jax.debug.callback(functools.partial(record, path, rows), xtx, ordered=True)
        return next_fun(*args, **kwargs)

    kwargs = {} if method is None else {"method": method}

    @jax.jit
    def run(variables, args):
        with nn.intercept_methods(interceptor):
            model.apply(variables, *args, **kwargs)

    sums: dict[str, np.ndarray] = {}
    variables = {"params": inner}
    for batch in batches:
        calls.clear()
        run(variables, batch if isinstance(batch, tuple) else (batch,))
        jax.effects_barrier()
        for path, seen in calls.items():
            sums[path] = sums.get(path, 0.0) + _per_slice(path, seen, shapes[path],
                                                           layer_ndim[path])
    if not sums:
        raise ValueError(f"activation_stats: no call of a layer whose kernel matches "
                         f"{targets!r} ran over the batches")
    return {p: sums[p] * (_slices(shapes[p], layer_ndim[p]) / counts[p]) for p in sorted(sums)}


def _conv_patches(module: nn.Conv, x: Any, probing: list[bool]) -> Any:
    """The patches an ``nn.Conv`` contracts its kernel with, as rows ``[n, prod(k) * in]`` in
    the kernel's row order (``x`` convolved by the module's own padding, strides and
    dilations with an identity kernel: output channel j is patch entry j)."""
    kernel = module.get_variable("params", "kernel")
    k = int(np.prod(kernel.shape[:-1]))
    identity = jnp.eye(k, dtype=x.dtype).reshape(*kernel.shape[:-1], k)
    probe = module.clone(parent=None, features=k, use_bias=False)
    probing[0] = True
    try:
        patches = probe.apply({"params": {"kernel": identity}}, x)
    finally:
        probing[0] = False
    return jnp.reshape(patches, (-1, k))


def _slices(shape: tuple[int, ...], ndim: int) -> int:
    return int(np.prod(shape[:len(shape) - ndim]))


def _per_slice(path: str, seen: list[np.ndarray], shape: tuple[int, ...],
               ndim: int) -> np.ndarray:
    """One batch's calls of a kernel summed per slice: a plain kernel pools every call; a
    stacked one (``nn.scan``: the layer sees ``ndim`` of the kernel's axes) takes its calls in
    slice order, round after round."""
    lead = shape[:len(shape) - ndim]
    if not lead:
        return np.sum(seen, axis=0)
    n = int(np.prod(lead))
    if len(seen) % n:
        raise ValueError(f"activation_stats: {path!r} is stacked {lead} but ran {len(seen)} "
                         f"times in one batch, not a multiple of {n}")
    per = np.sum(np.reshape(np.stack(seen), (-1, n, *seen[0].shape)), axis=0)
    return per.reshape(*lead, *seen[0].shape)
