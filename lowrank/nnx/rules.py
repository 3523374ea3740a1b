"""The layer rules of :mod:`lowrank.layers`, for Flax NNX layers.

An NNX layer computes what the linen layer of the same kind computes (``nnx.Linear`` is
``nn.Dense``, ``nnx.LinearGeneral`` is ``nn.DenseGeneral``, ...), with the hyper-parameters
held as attributes under a few other names. So each NNX rule is the linen rule, called on a
linen *twin* of the NNX layer: an unbound linen module with the same hyper-parameters, built
for the call (it holds no weights and runs nothing but the rule's math). One copy of the math
serves both APIs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax import nnx

from lowrank import layers
from lowrank.layers import LayerRule


def _dense(m: nnx.Linear) -> nn.Dense:
    return nn.Dense(m.out_features, use_bias=m.use_bias, dtype=m.dtype, precision=m.precision,
                    parent=None)


def _dense_general(m: nnx.LinearGeneral) -> nn.DenseGeneral:
    return nn.DenseGeneral(m.out_features, axis=m.axis, batch_dims=tuple(m.batch_axis),
                           use_bias=m.use_bias, dtype=m.dtype, precision=m.precision,
                           parent=None)


def _einsum(m: nnx.Einsum) -> nn.Einsum:
    return nn.Einsum(m.kernel_shape, m.einsum_str, use_bias=m.bias is not None, dtype=m.dtype,
                     precision=m.precision, parent=None)


def _embed(m: nnx.Embed) -> nn.Embed:
    return nn.Embed(m.num_embeddings, m.features, dtype=m.dtype, parent=None)


def _conv(m: nnx.Conv) -> nn.Conv:
    return nn.Conv(
        m.out_features, m.kernel_size, strides=m.strides, padding=m.padding,
        input_dilation=m.input_dilation, kernel_dilation=m.kernel_dilation,
        feature_group_count=m.feature_group_count, use_bias=m.use_bias, mask=m.mask,
        dtype=m.dtype, precision=m.precision, parent=None,
    )


TWINS: dict[type, Callable[[Any], nn.Module]] = {
    nnx.Linear: _dense,
    nnx.LinearGeneral: _dense_general,
    nnx.Einsum: _einsum,
    nnx.Embed: _embed,
    nnx.Conv: _conv,
}


def twin(module: nnx.Module) -> nn.Module:
    """The linen layer that computes what the NNX ``module`` computes (no weights).

    >>> layer = nnx.LinearGeneral(4, (2, 3), rngs=nnx.Rngs(0))
    >>> type(twin(layer)).__name__, twin(layer).features
    ('DenseGeneral', (2, 3))
    """
    return TWINS[type(module)](module)


def _on_twin(fn: Callable[..., Any]) -> Callable[..., Any]:
    def on_twin(module, *args, **kwargs):
        return fn(twin(module), *args, **kwargs)

    return on_twin


def _nnx_rule(linen: type) -> LayerRule:
    rule = layers.RULES[linen]
    per_output = rule.per_output and _on_twin(rule.per_output)
    return dataclasses.replace(rule, factorization=_on_twin(rule.factorization),
                               delta=_on_twin(rule.delta), per_output=per_output)


RULES: dict[type, LayerRule] = {
    nnx.Linear: _nnx_rule(nn.Dense),
    nnx.LinearGeneral: _nnx_rule(nn.DenseGeneral),
    nnx.Einsum: _nnx_rule(nn.Einsum),
    nnx.Embed: _nnx_rule(nn.Embed),
    nnx.Conv: _nnx_rule(nn.Conv),
}

SUPPORTED = ", ".join(f"nnx.{t.__name__}" for t in RULES)

_KERNEL_NDIM: dict[type, Callable[[Any], int]] = {
    nnx.Linear: lambda m: 2,
    nnx.Embed: lambda m: 2,
    nnx.LinearGeneral: lambda m: len(m.batch_axis) + len(m.in_features) + len(m.out_features),
    nnx.Einsum: lambda m: len(m.kernel_shape),
    nnx.Conv: lambda m: len(m.kernel_shape),
}


def kernel_ndim(module: Any) -> int:
    """The number of axes of one layer's weight; a weight with more has leading stack axes
    (a layer built under ``nnx.vmap``).

    >>> kernel_ndim(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)))
    4
    """
    return _KERNEL_NDIM[type(module)](module)


def rule_for(module: Any) -> LayerRule | None:
    """The rule for an NNX layer's exact type (subclasses may change the math, so they don't
    match).

    >>> rule_for(nnx.Embed(10, 4, rngs=nnx.Rngs(0))).methods
    ('__call__', 'attend')
    """
    return RULES.get(type(module))
