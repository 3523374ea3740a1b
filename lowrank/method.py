"""The two seams every adaptation method plugs into: a method object and the leaves it makes.

A **method** (:class:`Method`) is an object with three parts:

* ``init(key, target) -> leaf``: the trainable leaf for one weight (``target`` says which
  weight, its shape and how its layer factorises);
* ``apply(call, leaf) -> output``: what the adapted layer outputs, given a
  :class:`lowrank.layer_call.LayerCall` (the layer's own math: its base output, its weight, its
  factored low-rank product) and the leaf;
* ``merge(weight, leaf) -> weight``: the dense weight an exported model runs with.

Methods compose by inheritance: DoRA is LoRA whose ``apply`` rescales what LoRA's returns.

An **adapter leaf** (:class:`Adapter`) is the pytree that sits in the trainable tree at an
adapted weight. It knows its method (``leaf.method``), so the code that handles trainable trees
(merging, export, checkpoints, stacks, interop) asks the leaf (``leaf.merge(w)``,
``leaf.arrays()``, ``leaf.summary()``) instead of testing for one class.

>>> from lowrank.lora import LoraPair
>>> import jax.numpy as jnp
>>> leaf = LoraPair(jnp.ones((4, 1)), jnp.ones((1, 3)), scale=0.5)
>>> is_adapter(leaf), leaf.kind, leaf.merge(jnp.zeros((4, 3)))[0, 0].tolist()
(True, 'lora', 0.5)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from lowrank.layers import Factorization


@dataclasses.dataclass(frozen=True)
class Target:
    """One weight that a method adapts.

    Attributes:
      path: its '/'-joined parameter path.
      weight: the frozen value (an array or a ``QuantizedArray``).
      shape: its logical shape, leading stack axes (``nn.scan``) included.
      factorization: how one slice of it factorises (which axes the input contracts with).
      dtype: the floating dtype adapters are created in.
    """

    path: str
    weight: Any
    shape: tuple[int, ...]
    factorization: Factorization
    dtype: Any

    @property
    def n_lead(self) -> int:
        """The number of leading stack axes (one per ``nn.scan`` level)."""
        return len(self.shape) - self.factorization.ndim

    @property
    def slice_shape(self) -> tuple[int, ...]:
        return self.shape[self.n_lead:]


class Method:
    """Base class of adaptation methods (see the module docstring).

    Subclasses are frozen dataclasses of their hyper-parameters (hashable, so that they can
    be used in rules and compared), with ``init`` an instance method and ``apply`` / ``merge``
    / ``unmerge`` class methods of the leaf alone (all a leaf needs at run time is in it).
    """

    name: ClassVar[str] = "method"
    leaf: ClassVar[type]  # the Adapter class its init makes (set by `register`)

    @classmethod
    def from_spec(cls, spec: Any, path: str) -> Method:
        """The method for ``path`` from a ``LoraSpec``'s fields (``LoraSpec(method=name)``)."""
        raise NotImplementedError

    def prepare(self, targets: list[Target]) -> Method:
        """This method configured for all the targets it adapts, before any ``init`` (a
        method that shares state across weights sizes it here); by default itself."""
        return self

    def init(self, key: jax.Array, target: Target) -> Adapter:
        raise NotImplementedError

    @classmethod
    def apply(cls, call: Any, leaf: Adapter) -> jax.Array:
        raise NotImplementedError

    @classmethod
    def merge(cls, weight: jax.Array, leaf: Adapter) -> jax.Array:
        """An additive update by default: ``W + leaf.delta()``."""
        return weight + leaf.delta(weight.dtype)

    @classmethod
    def unmerge(cls, merged: jax.Array, leaf: Adapter) -> jax.Array:
        """The inverse of the default :meth:`merge`: ``W' - leaf.delta()``."""
        return merged - leaf.delta(merged.dtype)


class Adapter:
    """Mixin of the trainable leaves methods create (``flax.struct`` dataclasses).

    Subclasses set ``method`` (the :class:`Method` class whose ``apply`` and ``merge`` run
    them) and ``kind`` (the name exports record), and implement ``rank``, ``delta`` and
    ``statics``. The array fields are the leaf's trainable arrays.
    """

    method: ClassVar[type[Method]]
    kind: ClassVar[str]

    @property
    def rank(self) -> int:
        raise NotImplementedError

    def delta(self, dtype: Any = None) -> jax.Array:
        """The low-rank part of the update, dense, in the kernel's layout."""
        raise NotImplementedError

    def delta_shape(self) -> tuple[int, ...]:
        """The shape of :meth:`delta`: the weight's, leading stack axes included."""
        return tuple(jax.eval_shape(lambda x: x.delta(), self).shape)

    def statics(self) -> dict[str, Any]:
        """The static (non-array) fields, JSON-ready: what an export records beside arrays."""
        raise NotImplementedError

    def arrays(self) -> dict[str, jax.Array]:
        """The leaf's arrays by field name (``{"a": ..., "b": ...}`` for LoRA)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("pytree_node", True)}

    def bind(self, frozen_flat: Mapping[str, Any]) -> Adapter:
        """This leaf with the frozen arrays it reads from the frozen tree (``{path: leaf}``,
        flattened) attached, for one forward pass or merge; by default itself. A method whose
        frozen state is shared across weights keeps it in the frozen tree (so it never gets a
        gradient or optimizer state) under a path starting with :data:`SHARED`."""
        del frozen_flat
        return self

    def merge(self, weight: jax.Array) -> jax.Array:
        """The merged dense weight (``weight`` already materialised, float)."""
        return self.method.merge(weight, self)

    def unmerge(self, merged: jax.Array) -> jax.Array:
        """The base weight back from a merged one, where the method allows it."""
        return self.method.unmerge(merged, self)

    def summary(self) -> dict[str, Any]:
        """Rank, array shapes and statics, JSON-ready (compared when resuming a run)."""
        out: dict[str, Any] = {"rank": int(self.rank)}
        out.update({k: list(np.shape(v)) for k, v in self.arrays().items()})
        if "scale" in self.statics():
            out["scale"] = float(self.statics()["scale"])
        if self.kind != "lora":
            out["kind"] = self.kind
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], statics: Mapping[str, Any]) -> Adapter:
        """Inverse of :meth:`arrays` and :meth:`statics`."""
        return cls(**arrays, **statics)


# Top-level entries of the frozen tree whose name starts with this hold a method's shared
# frozen arrays (VeRA's projections loaded from a file), not model weights: the model ignores
# them, merging drops them.
SHARED = "@"


def is_shared(path: str) -> bool:
    """Whether ``path`` of a frozen tree is a method's shared array (see :data:`SHARED`).

    >>> is_shared("@vera/a"), is_shared("dense/kernel")
    (True, False)
    """
    return path.startswith(SHARED)


def is_adapter(x: Any) -> bool:
    """Whether ``x`` is an adapter leaf (as opposed to a full-rank trained array)."""
    return isinstance(x, Adapter)


_METHODS: dict[str, type[Method]] = {}


def register(method: type[Method], leaf: type[Adapter]) -> None:
    """Makes ``method`` selectable by its name (``LoraSpec(method=...)``) and its leaves
    loadable by their kind, the same name (exports record it).

    >>> method_class("lora").__name__, adapter_class("lora").__name__
    ('LoRA', 'LoraPair')
    """
    if leaf.kind != method.name or leaf.method is not method:
        raise ValueError(f"{leaf.__name__} (kind {leaf.kind!r}) is not the leaf of "
                         f"{method.__name__} ({method.name!r})")
    method.leaf = leaf
    _METHODS[method.name] = method


def method_class(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(_METHODS)}")
    return _METHODS[name]


def adapter_class(kind: str) -> type[Adapter]:
    """The leaf class of the method named ``kind`` (what an export records)."""
    return method_class(kind).leaf


def method_names() -> tuple[str, ...]:
    return tuple(sorted(_METHODS))
