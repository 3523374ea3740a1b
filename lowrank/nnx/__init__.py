"""Flax NNX models in ``lowrank``: the same two trees, the same calls.

:func:`lowrank.apply` and :func:`lowrank.discover_layouts` take an NNX module as they take a
linen one (they dispatch here); :func:`params` gives the frozen tree of an NNX model, and
:func:`with_params` puts a tree (a merged one, say) back into a new module. Everything else
(``init_adapters``, ``merge``, ``quantize_tree``, optimizers) works on the trees and does not
care which API built the model. How and why: the *NNX models* guide, and the docstring
of ``lowrank/nnx/run.py``.

>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import lowrank as lr
>>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
>>> frozen = lr.nnx.params(model)
>>> adapters = lr.init_adapters(jax.random.key(1), frozen, lr.LoraSpec(rank=2))
>>> lr.apply(model, frozen, adapters, jnp.ones((1, 4))).shape
(1, 3)
"""

from lowrank.nnx.rules import SUPPORTED, rule_for
from lowrank.nnx.run import apply, discover_layouts, is_nnx, params, with_params

__all__ = ["SUPPORTED", "apply", "discover_layouts", "is_nnx", "params", "rule_for",
           "with_params"]
