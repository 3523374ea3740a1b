"""Running an unmodified linen model with a frozen tree and an adapters tree.

The adapters ride inside the ``params`` collection, as a sibling entry next to the weight they
adapt (``kernel`` -> ``kernel@lora``). That way every lifted transform of the user's model
(``nn.scan``, ``nn.remat``, ``nn.vmap``) slices and routes them exactly like the weight itself,
and ``flax.linen.intercept_methods`` (the public hook) hands each adapted layer's call to its
leaf's method (``leaf.method.apply``), which knows what to compute; this module knows no
method. Frozen leaves (:mod:`lowrank.frozen`) run where the layer runs, inside whatever jit the
caller traces: a quantized weight is dequantized there (no dequantized copy outlives the step),
a low-rank kernel computes ``(x U) V`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from lowrank import frozen, layers, paths
from lowrank.adapters import check_fits
from lowrank.layer_call import DROPOUT_STREAM, LayerCall
from lowrank.method import is_adapter
from lowrank.nnx import run as nnx_run

LORA_SUFFIX = "@lora"


def combine(frozen: Mapping, adapters: Mapping) -> dict:
    """The params tree the intercepted model runs on: frozen weights, trained leaves swapped
    in, and each adapter leaf placed beside its weight under ``<name>@lora``.

    >>> import jax.numpy as jnp
    >>> from lowrank.lora import LoraPair
    >>> pair = LoraPair(jnp.ones((2, 1)), jnp.zeros((1, 2)))
    >>> sorted(combine({"d": {"kernel": jnp.ones((2, 2))}}, {"d": {"kernel": pair}})["d"])
    ['kernel', 'kernel@lora']
    """
    flat = dict(paths.flatten(paths.params_of(frozen)))
    ad = paths.flatten(adapters)
    check_fits(flat, ad)
    for p, leaf in ad.items():
        if is_adapter(leaf):
            flat[p + LORA_SUFFIX] = leaf.bind(flat)
        else:
            flat[p] = leaf
    return paths.unflatten(flat)


def _own_params(module: nn.Module) -> dict[str, Any]:
    """The module's direct parameters (not those of its submodules)."""
    params = module.variables.get("params", {})
    return {k: v for k, v in params.items() if not isinstance(v, Mapping)}


def _where(module: nn.Module, name: str) -> str:
    return paths.SEP.join((*module.path, name))


class _Interceptor:
    def __init__(self, dropout_active: bool):
        self.dropout_active = dropout_active

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        own = _own_params(module)
        leaves = {k[: -len(LORA_SUFFIX)]: v for k, v in own.items() if k.endswith(LORA_SUFFIX)}
        stored_frozen = [k for k, v in own.items() if frozen.is_frozen(v)]
        if not leaves and not stored_frozen:
            return next_fun(*args, **kwargs)
        rule = layers.rule_for(module)
        if rule is None or set(leaves) - {rule.weight}:
            name = next(iter(leaves or stored_frozen))
            raise layers.unsupported(_where(module, name), module)
        if stored_frozen and context.method_name == "setup":
            # A layer that declares its weight in setup (nn.Embed) would check the packed
            # codes against the weight's shape; its methods run on a clone instead.
            return None
        if context.method_name not in rule.methods:
            return next_fun(*args, **kwargs)
        name = context.method_name
        stored = {k: v for k, v in own.items() if not k.endswith(LORA_SUFFIX)}

        def run(call_args):
            # The layer's own call once; a second call (on other inputs) runs on a clone, as a
            # compact module cannot declare its params twice.
            if stored_frozen or call_args is not args:
                return _run_clone(module, rule, stored, name, call_args, kwargs)
            return next_fun(*call_args, **kwargs)

        leaf = leaves.get(rule.weight)
        if leaf is None:
            return run(args)
        call = LayerCall(module, name, args, dict(kwargs), rule, stored, run,
                         self.dropout_active)
        return leaf.method.apply(call, leaf)


def _run_clone(module, rule, stored, method_name, args, kwargs):
    # A frozen weight with its own matmul (a low-rank kernel) computes the layer itself;
    # otherwise the layer's own code runs on an unbound clone whose params are the
    # materialised (dequantized) weights, a call that passes through the interceptor untouched.
    clone = module.clone(parent=None)

    def run(stored):
        weight = stored.get(rule.weight)
        if frozen.is_frozen(weight):
            out = weight.layer_call(module, rule, method_name, args, kwargs, stored)
            if out is not None:
                return out
        plain = {k: frozen.materialize(v) for k, v in stored.items()}
        return clone.apply({"params": plain}, *args, method=method_name, **kwargs)

    if not any(frozen.is_frozen(v) for v in stored.values()):
        return run(stored)

    # Saving nothing keeps only the packed codes for the backward pass, which dequantizes
    # again: otherwise every layer's float kernel is a residual (under nn.scan, all of them
    # stacked), and QLoRA would hold as much memory as LoRA over a float base. No CSE
    # barrier: it copied each layer's input and cotangent (MiniLM QLoRA step +144 MiB of
    # temporaries); nn.scan's loops already keep the two dequantizations apart.
    return jax.checkpoint(run, prevent_cse=False,
                          policy=jax.checkpoint_policies.nothing_saveable)(stored)


def apply(
    model: nn.Module,
    frozen: Mapping,
    adapters: Mapping,
    *args: Any,
    lora_rng: jax.Array | bool | None = None,
    rngs: Mapping[str, jax.Array] | None = None,
    extra_variables: Mapping[str, Any] | None = None,
    **apply_kwargs: Any,
) -> Any:
    """Runs ``model`` with its weights taken from ``frozen`` and adapted by ``adapters``.

    Args:
      model: an unmodified linen module, or an NNX one (see :mod:`lowrank.nnx`).
      frozen: the base params (plain or quantized arrays; ``{"params": ...}`` also accepted).
      adapters: the trainable tree from :func:`lowrank.init_adapters` (``{}`` runs the base).
      *args: the model's inputs.
      lora_rng: a PRNG key turns adapter dropout on (training); omit it at evaluation. The
        key becomes the model's ``"dropout"`` stream, so if ``rngs`` already has one, pass
        ``lora_rng=True`` to draw adapter dropout from that stream instead.
      rngs: the model's own rngs (its dropout etc.), as in ``model.apply``.
      extra_variables: other collections (``batch_stats``...).
      **apply_kwargs: passed to ``model.apply`` (``method=``, ``mutable=``, model kwargs).

    >>> import jax.numpy as jnp
    >>> model = nn.Dense(3)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> import lowrank
    >>> adapters = lowrank.init_adapters(jax.random.key(1), params, lowrank.LoraSpec(rank=2))
    >>> y = apply(model, params, adapters, jnp.ones((1, 4)))
    >>> bool(jnp.allclose(y, model.apply({"params": params}, jnp.ones((1, 4)))))
    True
    """
    if nnx_run.is_nnx(model):  # one entry point for both Flax APIs
        if extra_variables is not None:
            raise ValueError("extra_variables are linen's; an NNX model keeps its other state "
                             "in itself")
        return nnx_run.apply(model, frozen, adapters, *args, lora_rng=lora_rng, rngs=rngs,
                             **apply_kwargs)
    variables = {"params": combine(frozen, adapters), **(extra_variables or {})}
    rngs = dict(rngs or {})
    active = lora_rng is not None and lora_rng is not False
    if active and lora_rng is not True:
        if DROPOUT_STREAM in rngs:
            raise ValueError(
                "lora_rng and rngs['dropout'] were both given: adapter dropout draws from the "
                "model's 'dropout' stream, so pass rngs={'dropout': key} with lora_rng=True"
            )
        rngs[DROPOUT_STREAM] = lora_rng
    elif active and DROPOUT_STREAM not in rngs:
        raise ValueError("lora_rng=True draws adapter dropout from rngs['dropout'], which is "
                         "missing")
    with nn.intercept_methods(_Interceptor(dropout_active=active)):
        return model.apply(variables, *args, rngs=rngs or None, **apply_kwargs)
