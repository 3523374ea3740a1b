"""Running an unmodified Flax NNX model with a frozen tree and an adapters tree.

NNX has no counterpart of linen's ``intercept_methods``: a layer's ``__call__`` is plain
Python on the module object. So each call builds a *clone* of the model (``nnx.split`` into a
graph definition and its state, the ``nnx.Param`` values replaced by the frozen tree,
``nnx.merge``) and, in the clone only, swaps each adapted (or quantized) layer for a small
wrapper module that holds the original layer and the adapter leaf (as an ``nnx.LoRAParam``).
The wrapper's ``__call__`` hands the call to the leaf's method through a
:class:`~lowrank.layer_call.LayerCall`, exactly as linen's interceptor does, with the layer
rules of :mod:`lowrank.nnx.rules` (the linen rules, on a linen twin of the layer).

Why this mechanism, after reading the alternatives:

* ``nnx.LoRA`` / ``nnx.LoRALinear`` change the model: the user builds a different layer class
  into it, with no alpha scaling, no dropout, only ``Linear``. We keep the model unmodified;
  the user's model object is never mutated (the clone is new on every call).
* Google's qwix intercepts ``jax.lax.dot_general`` / ``einsum`` / ``conv`` while a cloned
  module runs, and finds which module and weight a primitive belongs to by walking Python
  stack frames. A primitive-level hook also sees only ``(x, W)``, not the layer: DoRA needs
  the layer's output with and without its bias, and embeddings use no ``dot_general``.
  Swapping the layer object in a clone needs only public NNX APIs (``split``, ``merge``,
  attribute assignment) and gives the method the whole layer call.
* The adapter leaf lives *inside* the clone's graph, as a variable of the wrapper, so a
  stack built with ``nnx.vmap`` and run with ``nnx.scan`` slices it per layer exactly as it
  slices the layer's kernel (the linen side gets the same from ``kernel@lora`` siblings).

Paths are the NNX state paths joined with '/' (``layers/0/attn/q/kernel``), so ``LoraSpec``
regexes, merging, stacks and PEFT names read the same as for linen. The frozen tree is the
model's ``nnx.Param`` values only; other state (batch statistics, the model's own RNG streams)
is read from the model as it is and not updated by a call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank import layers, paths, quant
from lowrank.adapters import _path_key, check_fits
from lowrank.layer_call import DROPOUT_STREAM, LayerCall
from lowrank.method import is_adapter
from lowrank.nnx import rules


def is_nnx(model: Any) -> bool:
    """Whether ``model`` is a Flax NNX module (as opposed to a linen one).

    >>> is_nnx(nnx.Linear(2, 3, rngs=nnx.Rngs(0))), is_nnx(object())
    (True, False)
    """
    return isinstance(model, nnx.Module)


def _join(path: tuple) -> str:
    return paths.SEP.join(str(k) for k in path)


def params(model: nnx.Module) -> dict:
    """The model's ``nnx.Param`` values as a nested dict keyed by '/'-path parts: the frozen
    tree of :func:`lowrank.apply`, what :func:`lowrank.init_adapters` and
    :func:`lowrank.quantize_tree` take.

    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> {k: v.shape for k, v in params(model).items()}
    {'bias': (3,), 'kernel': (4, 3)}
    """
    flat = {_join(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return paths.unflatten(flat)


def with_params(model: nnx.Module, params: Mapping) -> nnx.Module:
    """A new module: ``model``'s structure and other state, its ``nnx.Param`` values taken
    from ``params`` (a tree from :func:`params`, :func:`lowrank.merge`, possibly quantized).
    ``model`` itself is not changed; it may be abstract (``nnx.eval_shape``).

    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> zero = with_params(model, {"kernel": jnp.zeros((4, 3)), "bias": jnp.ones(3)})
    >>> zero(jnp.ones((1, 4))).tolist(), bool((model.kernel[...] != 0).any())
    ([[1.0, 1.0, 1.0]], True)
    """
    flat = paths.flatten(paths.params_of(params))
    graphdef, state = nnx.split(model)
    leaves, seen = [], set()
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, nnx.Param):
            p = _join(path)
            if p not in flat:
                raise ValueError(f"params tree does not fit the model: parameter {p!r} is "
                                 "missing. Given: " + paths.candidates_hint(list(flat)))
            seen.add(p)
            value = flat[p]
        else:
            value = var.get_value()
        # A new Variable, so that nothing in the clone is shared with (or mutates) the model.
        leaves.append((path, var.replace(value=value)))
    extra = [p for p in flat if p not in seen]
    if extra:
        raise ValueError(f"params tree does not fit the model: {extra[0]!r} is not a parameter. "
                         "Parameters: " + paths.candidates_hint(sorted(seen)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


_ADAPTER_STREAM = 0x4C6F5241  # folded into rngs['dropout'] for the adapters (lora_rng=True)


class _AdapterRng(nnx.LoRAParam):
    """The dropout key and call count of one adapted layer. A ``LoRAParam``, so that a user's
    ``nnx.scan`` that slices parameters (``StateAxes({nnx.Param: 0})``) slices it per layer."""


class _NnxLayerCall(LayerCall):
    """A :class:`~lowrank.layer_call.LayerCall` of an NNX layer: ``where`` is its state path,
    and adapter dropout draws from the wrapper's own key."""

    def __init__(self, *args: Any, where: str, next_rng: Callable[[], jax.Array], **kwargs: Any):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "_where", where)
        object.__setattr__(self, "_next_rng", next_rng)

    @property
    def where(self) -> str:
        return self._where

    def next_rng(self) -> jax.Array:
        return self._next_rng()


class _Adapted(nnx.Module):
    """A supported layer with its adapter leaf, in the clone only (see the module docstring)."""

    def __init__(self, layer: nnx.Module, where: str, leaf: Any, key: jax.Array | None,
                 record: Callable[[str, Any], None] | None):
        self.layer = layer
        self.where = where
        self.adapter = nnx.data(None) if leaf is None else nnx.LoRAParam(leaf)
        self.record = record
        self.key = nnx.data(None) if key is None else _AdapterRng(key)
        self.count = nnx.data(None) if key is None else _AdapterRng(
            jnp.zeros(key.shape, jnp.uint32))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("__call__", args, kwargs)

    def attend(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("attend", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        # Attributes the model reads off the layer itself (``embed.embedding``...).
        if name.startswith("_") or name == "layer":
            raise AttributeError(name)
        return getattr(self.layer, name)

    def _next_rng(self) -> jax.Array:
        key = jax.random.fold_in(self.key[...], self.count[...])
        self.count[...] = self.count[...] + 1
        return key

    def _call(self, name: str, args: tuple, kwargs: dict) -> Any:
        rule = rules.rule_for(self.layer)
        stored = {_join(p): v.get_value()
                  for p, v in nnx.to_flat_state(nnx.state(self.layer, nnx.Param))}
        if self.record is not None and name in rule.methods:
            try:
                self.record(self.where, rule.factorization(
                    self.layer, len(_shape(stored[rule.weight])), args, kwargs))
            except layers.UnsupportedLayer:
                pass  # as on the linen side: no layout, and adapting it fails when it runs
        quantized = any(quant.is_quantized(v) for v in stored.values())

        def run(call_args: tuple) -> Any:
            if quantized:
                return _run_dequantized(self.layer, name, call_args, kwargs)
            return getattr(self.layer, name)(*call_args, **kwargs)

        leaf = self.adapter.get_value() if self.adapter is not None else None
        if leaf is None or name not in rule.methods:
            return run(args)
        call = _NnxLayerCall(self.layer, name, args, dict(kwargs), rule, stored, run,
                            self.key is not None, where=self.where, next_rng=self._next_rng)
        return leaf.method.apply(call, leaf)


def _shape(v: Any) -> tuple[int, ...]:
    return quant.logical_shape(v) if quant.is_quantized(v) else tuple(v.shape)


def _run_dequantized(layer: nnx.Module, name: str, args: tuple, kwargs: dict) -> Any:
    graphdef, state = nnx.split(layer)

    def run(state):
        flat = [(p, v.replace(value=quant.dequantize(v.get_value())))
                if quant.is_quantized(v.get_value()) else (p, v)
                for p, v in nnx.to_flat_state(state)]
        return getattr(nnx.merge(graphdef, nnx.from_flat_state(flat)), name)(*args,
                                                                                   **kwargs)

    # As on the linen side (intercept._run_clone): saving nothing keeps only the packed codes
    # for the backward pass, which dequantizes again, instead of a float kernel per layer.
    return jax.checkpoint(run, prevent_cse=False,
                          policy=jax.checkpoint_policies.nothing_saveable)(state)


def _node(root: Any, keys: tuple) -> Any:
    for k in keys:
        root = root[k] if isinstance(k, int) else getattr(root, k)
    return root


def _replace(root: Any, keys: tuple, new: Any) -> Any:
    if not keys:
        return new
    parent, k = _node(root, keys[:-1]), keys[-1]
    if isinstance(k, int):
        parent[k] = new
    else:
        setattr(parent, k, new)
    return root


def _adapted_clone(model: nnx.Module, frozen: Mapping, adapters: Mapping, *,
                  lora_rng: jax.Array | None = None,
                  record: Callable[[str, Any], None] | None = None) -> nnx.Module:
    """A clone of ``model`` on ``frozen`` whose adapted and quantized layers run through
    their adapter leaves' methods (``record``, if given, sees every supported layer's
    factorization as it is called)."""
    flat = dict(paths.flatten(paths.params_of(frozen)))
    ad = paths.flatten(adapters)
    check_fits(flat, ad)
    leaves = {}
    for p, leaf in ad.items():
        if is_adapter(leaf):
            leaves[p] = leaf
        else:
            flat[p] = leaf  # a full-rank trained leaf replaces the frozen one
    clone = with_params(model, flat)
    owners: dict[tuple, dict[str, str]] = {}  # module path -> {weight name: '/'-path}
    for path, var in nnx.to_flat_state(nnx.state(clone, nnx.Param)):
        p = _join(path)
        owner = _node(clone, path[:-1])
        if (p in leaves or quant.is_quantized(var.get_value())
                or (record is not None and rules.rule_for(owner) is not None)):
            owners.setdefault(path[:-1], {})[str(path[-1])] = p
    for mpath, weights in owners.items():
        layer = _node(clone, mpath)
        rule = rules.rule_for(layer)
        named = [p for w, p in weights.items() if p in leaves or quant.is_quantized(flat[p])]
        if rule is None or any(p in leaves for w, p in weights.items() if w != rule.weight):
            raise layers.unsupported((named or list(weights.values()))[0], layer,
                                     rules.SUPPORTED)
        where = _join((*mpath, rule.weight))
        leaf = leaves.get(where)
        key = None
        if lora_rng is not None and leaf is not None:
            n_lead = len(_shape(flat[where])) - rules.kernel_ndim(layer)
            key = _path_key(lora_rng, where)
            if n_lead:  # one key per slice of an nnx.vmap-built stack
                key = jax.random.split(key, _shape(flat[where])[:n_lead])
        clone = _replace(clone, mpath, _Adapted(layer, where, leaf, key, record))
    return clone


def _call(module: nnx.Module, method: str | Callable | None, args: tuple, kwargs: dict) -> Any:
    if method is None:
        return module(*args, **kwargs)
    if isinstance(method, str):
        return getattr(module, method)(*args, **kwargs)
    return method(module, *args, **kwargs)


def apply(model: nnx.Module, frozen: Mapping, adapters: Mapping, *args: Any,
          lora_rng: jax.Array | bool | None = None, rngs: Mapping[str, Any] | None = None,
          method: str | Callable | None = None, **kwargs: Any) -> Any:
    """:func:`lowrank.apply` for an NNX model (``lowrank.apply`` dispatches here).

    Args:
      model: an unmodified NNX module (its ``nnx.Param`` values are not used; it may be
        abstract, from ``nnx.eval_shape``). Its other state is read, never updated: put it in
        training mode (``model.train()``) for its own dropout to run.
      frozen: the base params, as from :func:`params` (plain or quantized arrays).
      adapters: the trainable tree from :func:`lowrank.init_adapters` (``{}`` runs the base).
      *args: the model's inputs.
      lora_rng: a PRNG key turns adapter dropout on (training); omit it at evaluation. As
        for linen, it also reseeds the model's own ``"dropout"`` stream (``nnx.reseed``), so
        each step draws new masks; if ``rngs`` has a ``"dropout"`` key, pass ``lora_rng=True``
        to derive the adapters' key from it instead.
      rngs: ``{stream: key}``: the model's RNG streams are reseeded with these
        (``nnx.reseed``, a stack's keys split to its shape).
      method: a method name or function ``f(module, *args)`` to run instead of ``__call__``.
      **kwargs: the model's keyword inputs.

    >>> import lowrank as lr
    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> frozen = params(model)
    >>> adapters = lr.init_adapters(jax.random.key(1), frozen, lr.LoraSpec(rank=2))
    >>> bool(jnp.allclose(apply(model, frozen, adapters, jnp.ones((1, 4))),
    ...                   model(jnp.ones((1, 4)))))
    True
    """
    rngs = dict(rngs or {})
    if lora_rng is True:
        if DROPOUT_STREAM not in rngs:
            raise ValueError("lora_rng=True draws adapter dropout from rngs['dropout'], which "
                             "is missing")
        lora_rng = jax.random.fold_in(rngs[DROPOUT_STREAM], _ADAPTER_STREAM)
    elif lora_rng is False:
        lora_rng = None
    elif lora_rng is not None:
        if DROPOUT_STREAM in rngs:
            raise ValueError(
                "lora_rng and rngs['dropout'] were both given: the key also reseeds the model's "
                "'dropout' stream, so pass rngs={'dropout': key} with lora_rng=True")
        rngs[DROPOUT_STREAM] = lora_rng
    clone = _adapted_clone(model, frozen, adapters, lora_rng=lora_rng)
    if rngs:
        nnx.reseed(clone, policy="match_shape", **rngs)
    return _call(clone, method, args, kwargs)


def discover_layouts(model: nnx.Module, params: Mapping, *args: Any,
                     method: str | Callable | None = None, **kwargs: Any) -> dict:
    """:func:`lowrank.discover_layouts` for an NNX model: ``{path: Factorization}`` of every
    supported layer the model calls, traced once under ``jax.eval_shape`` (no FLOPs).

    >>> model = nnx.LinearGeneral(4, (2, 3), rngs=nnx.Rngs(0))
    >>> discover_layouts(model, params(model), jnp.ones((1, 4)))["kernel"].out
    (1, 2)
    """
    found: dict = {}

    def record(where: str, factorization: Any) -> None:
        found[where] = factorization

    def run(p):
        clone = _adapted_clone(model, p, {}, record=record)
        return _call(clone, method, args, kwargs)

    jax.eval_shape(run, paths.params_of(params))
    return found
