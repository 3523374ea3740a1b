"""Forward-mode differentiation through lowrank's layers (``jax.jvp``, ``jax.jacfwd``,
``jax.linearize``, forward-over-reverse Hessian-vector products).

Two computations have hand-written backward passes (``jax.custom_vjp``), which make a training
step faster: the low-rank product of every adapter (``lowrank.layers.low_rank``) and the
models' softmax attention (``lowrank.models.common.dot_product_attention``). A custom VJP
supports reverse mode only, so forward mode through them raises JAX's "can't apply
forward-mode autodiff (jvp) to a custom_vjp function". Inside ``with forward_mode():`` the same
forward computations are traced without their custom backward passes and JAX derives every
mode itself; reverse-mode gradients then agree with the fast path to float rounding.

The setting is read when a function is traced: ``jax.jit`` a function inside the block (a
function already traced outside it keeps its trace, and its jit cache, until retraced).

>>> import jax, jax.numpy as jnp
>>> from lowrank.layers import low_rank
>>> a, b = jnp.ones((3, 2)), jnp.ones((2, 4))
>>> with forward_mode():
...     out, tangent = jax.jvp(lambda x: low_rank(x, a, b, 0.5), (jnp.ones((1, 3)),),
...                            (jnp.ones((1, 3)),))
>>> tangent.tolist()
[[3.0, 3.0, 3.0, 3.0]]
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["custom_backward", "forward_mode"]

_FORWARD_MODE = contextvars.ContextVar("lowrank_forward_mode", default=False)


@contextlib.contextmanager
def forward_mode(enabled: bool = True) -> Iterator[None]:
    """Within the block, lowrank's layers trace without their custom backward passes, so
    forward-mode autodiff works through them (see the module docstring); ``enabled=False``
    restores the fast path inside an enclosing block.

    >>> with forward_mode():
    ...     custom_backward()
    False
    """
    token = _FORWARD_MODE.set(bool(enabled))
    try:
        yield
    finally:
        _FORWARD_MODE.reset(token)


def custom_backward() -> bool:
    """Whether layers should use their hand-written backward passes now (False inside
    :func:`forward_mode`).

    >>> custom_backward()
    True
    """
    return not _FORWARD_MODE.get()
