"""Input second moments of the kernels to compress, from a few calibration batches (for
activation-aware truncation, as ASVD and SVD-LLM whiten by them)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import layers, paths

# Layers whose kernel contracts with the input's last axis alone: there the output error of a
# truncated kernel is ||X dW||, X the inputs as rows.
_LAST_AXIS = (nn.Dense,)


def _contracts_last_axis(module: nn.Module) -> bool:
    if type(module) in _LAST_AXIS:
        return True
    if type(module) is nn.DenseGeneral:
        axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
        return tuple(axis) == (-1,) and not module.batch_dims
    return False


def activation_stats(model: nn.Module, params: Mapping, batches: Iterable[Any],
                     targets: str, *, method: Any = None) -> dict[str, np.ndarray]:
    """``{path: E[x x^T]}``: the second moment of the inputs of each kernel matching
    ``targets`` (a regex on '/'-joined paths), over every call in ``batches``.

    The model runs under ``jax.jit`` on plain ``params`` (float, unadapted); each matched
    layer computes ``x^T x`` in the graph and hands it to the host with an ordered
    ``jax.debug.callback``. A layer inside ``nn.scan`` (a stacked kernel ``[L, in, out]``) is
    called once per slice in order, so its moment is ``[L, in, in]``, one per slice. Supported:
    ``nn.Dense``, ``nn.DenseGeneral`` over the last axis, and ``nn.Conv`` (its inputs are the
    patches its kernel contracts with, ``[prod(kernel_size) * in]``); an error names any other
    kernel.

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
        x = args[0]
        if _contracts_last_axis(module):
            rows = jnp.reshape(x, (-1, x.shape[-1]))
        elif type(module) is nn.Conv and module.feature_group_count == 1 and module.mask is None:
            rows = _conv_patches(module, x, probing)
        else:
            raise layers.UnsupportedLayer(
                f"activation-aware compression of {path!r}: {type(module).__name__} is not "
                "supported (nn.Dense, nn.DenseGeneral over the last axis and nn.Conv are); "
                "exclude it from the targets or compress it without stats")
        rows = rows.astype(jnp.float32)
        layer_ndim[path] = len(module.get_variable("params", rule.weight).shape)
        jax.debug.callback(functools.partial(record, path, rows.shape[0]),
                           rows.T @ rows, ordered=True)
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
