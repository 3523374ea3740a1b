"""``LayerCall``: one call of an adapted layer, the layer's math handed to a method.

A method's ``apply`` gets a ``LayerCall`` and combines what it offers (the layer's own output,
its materialised weight, the factored product ``s (x A) B``, per-output-unit broadcasting);
it never needs to know which layer type it runs on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lowrank import frozen
from lowrank.layers import Factorization, LayerRule, UnsupportedLayer

# Adapter dropout draws from the model's own "dropout" stream: user models split that stream
# across nn.scan iterations (a stream the scan does not list never reaches its body).
DROPOUT_STREAM = "dropout"


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One call of an adapted layer, as a method's ``apply`` sees it: the layer's own math,
    nothing about any method.

    Attributes:
      module: the bound linen module.
      method_name: which of its methods runs (``"__call__"``, ``"attend"``).
      args, kwargs: the call's arguments (``args[0]`` is the input).
      rule: the layer type's :class:`LayerRule`.
      params: the module's own stored parameters (arrays or frozen leaves: quantized, low-rank).
      run: ``run(args) -> output``: the layer itself on ``args`` (its bias included),
        dequantizing a quantized weight on the fly.
      dropout_active: whether adapter dropout is on (training).

    A method that scales LoRA's update by a trainable vector per output unit, on any layer
    type with output units, in a few lines (its leaf and ``register`` omitted):

    >>> from lowrank.lora import LoRA
    >>> class ScaledLoRA(LoRA):
    ...     @classmethod
    ...     def apply(cls, call, leaf):
    ...         base = call.base()
    ...         update = cls.update(call, leaf, base.dtype)
    ...         return base + call.per_output(leaf.gain) * update
    """

    module: Any
    method_name: str
    args: tuple
    kwargs: dict
    rule: LayerRule
    params: dict
    run: Callable[[tuple], jax.Array]
    dropout_active: bool = False

    @property
    def where(self) -> str:
        """The adapted weight's path, for error messages."""
        return "/".join((*self.module.path, self.rule.weight))

    @property
    def factorization(self) -> Factorization:
        ndim = len(frozen.shape_of(self.params[self.rule.weight]))
        return self.rule.factorization(self.module, ndim, self.args, self.kwargs)

    def base(self, x: jax.Array | None = None) -> jax.Array:
        """The layer's own output (bias included), on ``x`` in place of its input if given."""
        return self.run(self.args if x is None else (x, *self.args[1:]))

    def weight(self, dtype: Any = None) -> jax.Array:
        """The layer's weight, materialised (dequantized, or a low-rank ``U V``) in
        ``dtype``."""
        w = self.params[self.rule.weight]
        if frozen.is_frozen(w):
            return w.materialize(dtype or jnp.dtype(w.dtype))
        return w if dtype is None else w.astype(dtype)

    def next_rng(self) -> jax.Array:
        """A new key from the model's ``"dropout"`` stream (a new one on every call)."""
        return self.module.make_rng(DROPOUT_STREAM)

    def dropout(self, rate: float) -> Callable[[jax.Array], jax.Array]:
        """Inverted dropout at ``rate`` from the model's ``"dropout"`` stream (identity when
        dropout is off or the rate is 0); each call of the result draws a new mask."""
        if not self.dropout_active or rate == 0.0:
            return lambda x: x

        def drop(x):
            keep = jax.random.bernoulli(self.next_rng(), 1.0 - rate, x.shape)
            return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)

        return drop

    def low_rank(self, a: jax.Array, b: jax.Array, scale: float, *, dropout: float = 0.0,
                 x: jax.Array | None = None) -> jax.Array:
        """``scale * (x A) B`` in the output's layout, never forming ``A B``; ``x`` replaces
        the layer's input (already dropped out, say), else dropout at ``dropout`` applies."""
        args = self.args if x is None else (x, *self.args[1:])
        drop = self.dropout(dropout) if x is None else (lambda v: v)
        return self.rule.delta(self.module, self.method_name, args, self.kwargs, a, b, scale,
                               drop)

    def per_output(self, v: jax.Array, order: str = "kernel") -> jax.Array:
        """``v`` (one value per output unit: the kernel's non-contracted axes) shaped to
        broadcast against the output."""
        if self.rule.per_output is None or self.method_name not in ("__call__",):
            raise UnsupportedLayer(
                f"{self.where!r}: {type(self.module).__name__}.{self.method_name} has no "
                "per-output-unit form (needed by this method)")
        return self.rule.per_output(self.module, self.args, self.kwargs, v, None, order)

    def bias(self) -> jax.Array | float:
        """The layer's bias shaped to broadcast against the output (0 when it has none)."""
        b = self.params.get("bias")
        return 0.0 if b is None else self.per_output(b, order="output")
