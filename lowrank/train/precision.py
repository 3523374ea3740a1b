"""Compute and parameter dtypes: names to dtypes, and casting the floating leaves of a tree."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lowrank import quant

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(name: str) -> jnp.dtype:
    """The dtype called ``name``; "auto" is float32 on CPU (faster there) and bfloat16 on
    GPU/TPU.

    >>> resolve_dtype("bfloat16")
    dtype(bfloat16)
    """
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; accepted: {DTYPES}")
    if name == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(name)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Casts every floating-point array of ``tree`` to ``dtype``, integer arrays aside. A
    quantized array keeps its codes and scales and is told to dequantize to ``dtype``.

    >>> cast_floating({"w": jnp.ones(2), "ids": jnp.ones(2, jnp.int32)}, jnp.bfloat16)["w"].dtype
    dtype(bfloat16)
    """

    name = jnp.dtype(dtype).name

    def cast(x):
        if quant.is_quantized(x):
            return dataclasses.replace(x, compute_dtype=name)
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        return jnp.asarray(x).astype(dtype)

    return jax.tree.map(cast, tree, is_leaf=quant.is_quantized)
