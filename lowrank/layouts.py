"""Finding how each weight of a model factorises, by tracing the model once (no FLOPs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from lowrank import layers, paths
from lowrank.layers import Factorization
from lowrank.nnx import run as nnx_run


def discover_layouts(
    model: nn.Module, params: Mapping, *args: Any, method: Any = None, **kwargs: Any
) -> dict[str, Factorization]:
    """``{path: Factorization}`` for every weight of a supported layer the model calls
    (``model`` linen or NNX).

    Runs ``model.apply`` under ``jax.eval_shape`` with an interceptor that asks each
    supported layer how its weight contracts with its input. Needed by
    :func:`lowrank.init_adapters` for kernels with more than two axes: the kernel of
    ``nn.scan``-ned layers ``[L, in, out]`` and a ``DenseGeneral`` kernel ``[in, heads, dim]``
    look alike, but factorise differently.

    >>> import jax.numpy as jnp
    >>> model = nn.DenseGeneral((2, 3))
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> discover_layouts(model, params, jnp.ones((1, 4)))["kernel"].out
    (1, 2)
    """
    if nnx_run.is_nnx(model):  # one entry point for both Flax APIs
        return nnx_run.discover_layouts(model, params, *args, method=method, **kwargs)
    found: dict[str, Factorization] = {}

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        rule = layers.rule_for(module)
        if rule is not None and context.method_name in rule.methods:
            weight = module.variables.get("params", {}).get(rule.weight)
            if weight is not None:
                try:
                    f = rule.factorization(module, len(weight.shape), call_args, call_kwargs)
                except layers.UnsupportedLayer:
                    f = None
                if f is not None:
                    found[paths.SEP.join((*module.path, rule.weight))] = f
        return next_fun(*call_args, **call_kwargs)

    def run(p):
        with nn.intercept_methods(record):
            return model.apply({"params": p}, *args, method=method, **kwargs)

    jax.eval_shape(run, paths.params_of(params))
    return found
