"""Input second moments of the kernels to compress, from a few calibration batches (for
activation-aware truncation, as ASVD and SVD-LLM whiten by them)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
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

    The model runs eagerly (no jit), once per batch, on plain ``params`` (float, unadapted).
    Supported: ``nn.Dense`` and ``nn.DenseGeneral`` over the last axis, outside ``nn.scan``
    and other transforms that trace their body (an error names the kernel otherwise).

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
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        rule = layers.rule_for(module)
        if rule is None or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = paths.SEP.join((*module.path, rule.weight))
        if not paths.select([path], targets):
            return next_fun(*args, **kwargs)
        x = args[0]
        if not _contracts_last_axis(module):
            raise layers.UnsupportedLayer(
                f"activation-aware compression of {path!r}: {type(module).__name__} is not "
                "supported (nn.Dense, nn.DenseGeneral over the last axis are); exclude it "
                "from the targets or compress it without stats")
        if isinstance(x, jax.core.Tracer):
            raise ValueError(
                f"activation_stats: the input of {path!r} is traced (the layer runs under "
                "nn.scan, nn.remat or jit), so it cannot be measured eagerly; exclude it or "
                "measure an unscanned copy of the model")
        rows = np.asarray(jax.device_get(x), np.float64).reshape(-1, x.shape[-1])
        sums[path] = sums.get(path, 0.0) + rows.T @ rows
        counts[path] = counts.get(path, 0) + rows.shape[0]
        return next_fun(*args, **kwargs)

    variables = {"params": paths.params_of(params)}
    kwargs = {} if method is None else {"method": method}
    with nn.intercept_methods(interceptor):
        for batch in batches:
            args = batch if isinstance(batch, tuple) else (batch,)
            model.apply(variables, *args, **kwargs)
    if not sums:
        raise ValueError(f"activation_stats: no call of a layer whose kernel matches "
                         f"{targets!r} ran over the batches")
    return {p: sums[p] / counts[p] for p in sorted(sums)}
