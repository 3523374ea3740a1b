"""Pieces shared by the BERT and Llama models: activations, attention, the stack of layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # HF's "gelu" is the exact erf form
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function a Hugging Face config calls ``name``.

    >>> float(activation("relu")(jnp.array(-1.0)))
    0.0
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; accepted: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Softmax attention with grouped key/value heads.

    Args:
      query: ``[batch, q_len, heads, head_dim]``.
      key, value: ``[batch, kv_len, kv_heads, head_dim]``; ``heads`` must be a multiple of
        ``kv_heads`` (grouped-query attention; equal for plain multi-head attention).
      mask: boolean, True where a query may attend a key, broadcastable to
        ``[batch, q_len, kv_len]``.
      dropout: applied to the attention probabilities (e.g. a bound ``nn.Dropout``).

    Returns:
      ``[batch, q_len, heads, head_dim]``.

    >>> q = jnp.ones((1, 3, 4, 8)); kv = jnp.ones((1, 3, 2, 8))
    >>> dot_product_attention(q, kv, kv).shape
    (1, 3, 4, 8)
    """
    b, t, h, d = query.shape
    kv_heads = key.shape[2]
    if h % kv_heads:
        raise ValueError(f"{h} query heads cannot be grouped over {kv_heads} key/value heads")
    # Grouping the query heads instead of repeating k/v keeps k/v at their stored size.
    q = query.reshape(b, t, kv_heads, h // kv_heads, d) * jnp.asarray(d**-0.5, query.dtype)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, key).astype(jnp.float32)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, t, key.shape[1]))[:, None, None]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    if dropout is not None:
        probs = dropout(probs)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, value)
    return out.reshape(b, t, h, d)


def layer_stack(
    block: type[nn.Module],
    num_layers: int,
    *,
    name: str,
    scan: bool,
    remat: bool,
    **block_kwargs: Any,
) -> Callable[..., jax.Array]:
    """``num_layers`` copies of ``block`` applied in turn; call inside a compact method.

    ``block(**block_kwargs)(x, *args)`` must return ``(x, None)``. Without ``scan`` the layers
    are submodules ``{name}_0 ... {name}_{n-1}`` (Hugging Face's ``layer.0`` ...); with ``scan``
    they are one ``nn.scan`` named ``name`` whose variables carry a leading layer axis. Every
    collection is stacked, so a collection added from outside (adapters) is sliced per layer too.

    >>> class Block(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(x.shape[-1])(x), None
    >>> class Net(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return layer_stack(Block, 3, name="layer", scan=True, remat=False)(x)
    >>> params = Net().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> params["layer"]["Dense_0"]["kernel"].shape
    (3, 4, 4)
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if remat:
        # Inside scan, CSE cannot undo rematerialisation, and the barrier would cost speed.
        block = nn.remat(block, prevent_cse=not scan)

    def run(x: jax.Array, *args: Any) -> jax.Array:
        if scan:
            stacked = nn.scan(
                block,
                variable_axes={True: 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * len(args),
                length=num_layers,
            )(name=name, **block_kwargs)
            x, _ = stacked(x, *args)
            return x
        for i in range(num_layers):
            x, _ = block(name=f"{name}_{i}", **block_kwargs)(x, *args)
        return x

    return run
