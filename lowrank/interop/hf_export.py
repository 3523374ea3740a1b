"""Merged export: adapters folded into the base and written as a Hugging Face directory.

The result is a plain transformers checkpoint (config.json + model.safetensors) that
``AutoModel.from_pretrained`` loads with no PEFT and no lowrank. A quantized base is
dequantized first (to the dtype it was quantized from), so a QLoRA model exports as the dense
model it computes.

>>> save_merged("out/merged", model, frozen, adapters)  # doctest: +SKIP
PosixPath('out/merged')
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowrank import adapters as adapters_lib
from lowrank.models import hf


def save_merged(
    directory: str | Path,
    model: nn.Module,
    frozen: Mapping,
    adapters: Mapping,
    *,
    dtype: Any = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Writes ``merge(frozen, adapters)`` with :func:`lowrank.models.save_pretrained`.

    Args:
      directory: created if missing.
      model: one of our Hugging Face-mapped models (BERT, Llama).
      frozen: its base params, plain or quantized (looped or scanned).
      adapters: the trainable tree (``{}`` exports the base alone, e.g. dequantized).
      dtype: cast floating-point weights to this dtype (e.g. ``jnp.bfloat16``) after merging;
        None keeps each weight's dtype.
      max_shard_bytes: split into shards of at most this size.

    >>> import tempfile
    >>> from lowrank.models import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
    ...                                  num_hidden_layers=1, num_attention_heads=2))
    >>> p = m.init(jax.random.key(0), jnp.ones((1, 2), int))["params"]
    >>> (save_merged(tempfile.mkdtemp(), m, p, {}) / "model.safetensors").is_file()
    True
    """
    merged = jax.jit(adapters_lib.merge)(frozen, adapters)  # one program, not many small ops
    if dtype is not None:
        merged = jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, merged
        )
        model = model.clone(param_dtype=dtype)  # config.json names the dtype written
    return hf.save_pretrained(directory, model, merged, max_shard_bytes=max_shard_bytes)
