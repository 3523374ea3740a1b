"""The frozen-leaf protocol: a weight stored in some other form than a plain array.

A frozen tree holds plain arrays and *frozen leaves*: a block-quantized weight
(:class:`lowrank.quant.QuantizedArray`), a low-rank compressed kernel
(:class:`lowrank.compression.LowRankKernel`), whose factors may themselves be quantized. Every
frozen leaf is a pytree that offers the same four things, so the code that runs, merges,
measures or adapts a frozen tree asks the leaf instead of testing for one class:

* ``logical_shape``: the shape of the weight it stands for (leading stack axes included);
* ``materialize(dtype)``: that weight as a plain array (for export, DoRA's norm, a layer that
  has no cheaper way to run);
* ``nbytes`` and ``size``: bytes held and parameters represented;
* ``layer_call(...)``: optionally, its own way to run the layer it sits in (a low-rank kernel
  computes ``(x U) V``, never ``U V``); ``None`` means "run the layer on the materialised
  weight".

>>> import jax.numpy as jnp
>>> from lowrank.quant import quantize
>>> q = quantize(jnp.ones((64, 8)), "int8")
>>> is_frozen(q), is_frozen(jnp.ones(3)), shape_of(q), materialize(q).shape
(True, False, (64, 8), (64, 8))
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["FrozenLeaf", "is_frozen", "materialize", "materialize_tree", "shape_of"]


class FrozenLeaf:
    """Base class of the frozen-weight types (see the module docstring).

    Subclasses are pytrees whose array leaves all carry the same leading stack axes, so that
    ``nn.scan`` and ``jax.vmap`` slice them into valid leaves of one layer.
    """

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The shape of the weight this leaf stands for, leading stack axes included."""
        raise NotImplementedError

    def materialize(self, dtype: Any = None) -> jax.Array:
        """The weight as a plain array in ``dtype`` (None: the leaf's compute dtype)."""
        raise NotImplementedError

    def layer_call(self, module: Any, rule: Any, method_name: str, args: tuple, kwargs: dict,
                   params: dict) -> jax.Array | None:
        """The layer's output computed from this leaf directly, or None (the default) to run
        the layer's own code on the materialised weight.

        ``rule`` is the layer type's :class:`lowrank.layers.LayerRule`; ``params`` the
        module's own stored parameters (this leaf among them, under ``rule.weight``).
        """
        del module, rule, method_name, args, kwargs, params
        return None


def is_frozen(x: Any) -> bool:
    """Whether ``x`` is a frozen leaf (use as ``is_leaf`` when walking a frozen tree).

    >>> import jax.numpy as jnp
    >>> is_frozen(jnp.ones(3))
    False
    """
    return isinstance(x, FrozenLeaf)


def shape_of(leaf: Any) -> tuple[int, ...]:
    """The logical shape of an array or a frozen leaf (leading stack axes included).

    >>> import jax.numpy as jnp
    >>> shape_of(jnp.ones((2, 3)))
    (2, 3)
    """
    return tuple(leaf.logical_shape) if is_frozen(leaf) else tuple(np.shape(leaf))


def materialize(leaf: Any, dtype: Any = None) -> Any:
    """A frozen leaf as a plain array in ``dtype`` (None: its compute dtype); anything else is
    returned as it is (cast to ``dtype`` when given).

    >>> import jax.numpy as jnp
    >>> materialize(jnp.ones(2, jnp.float32), jnp.bfloat16).dtype
    dtype(bfloat16)
    """
    if is_frozen(leaf):
        return leaf.materialize(dtype)
    return leaf if dtype is None else leaf.astype(dtype)


def materialize_tree(tree: Any, dtype: Any = None) -> Any:
    """Replaces every frozen leaf of ``tree`` by its materialised array.

    >>> import jax.numpy as jnp
    >>> from lowrank.quant import quantize
    >>> materialize_tree({"w": quantize(jnp.ones((64, 2)))}, jnp.float32)["w"].dtype
    dtype('float32')
    """
    return jax.tree.map(lambda x: materialize(x, dtype) if is_frozen(x) else x, tree,
                        is_leaf=is_frozen)
