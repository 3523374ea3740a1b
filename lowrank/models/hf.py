"""Hugging Face checkpoint directories (config.json + safetensors) <-> our linen models.

Nothing here imports torch and nothing is unpickled. The pieces live in their own modules
and are gathered here: the architectures and the one name map (:mod:`.architectures`),
reading and writing safetensors (:mod:`.safetensors_files`), loading one tensor at a time,
optionally quantizing on load (:mod:`.loading`); this module writes directories back.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import paths
from lowrank.models.architectures import (
    ARCHITECTURES,
    Architecture,
    architecture_of,
    bert_config_from_hf,
    from_hf_tensor,
    hf_key,
    is_stacked,
    llama_config_from_hf,
    to_hf_tensor,
)
from lowrank.models.loading import abstract_params, build_model, from_pretrained, load_params
from lowrank.models.safetensors_files import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    read_config,
    write_checkpoint,
)

# ----------------------------------------------------------------------------- writing


def hf_tensors(model: nn.Module, params: Mapping) -> Iterator[tuple[str, jax.Array]]:
    """``(hf_key, tensor)`` for every parameter, in Hugging Face's layout; scans unstacked.

    >>> from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
    ...                   num_hidden_layers=1, num_attention_heads=2)
    >>> m = LlamaForCausalLM(cfg); p = m.init(jax.random.key(0), jnp.ones((1, 2), int))
    >>> dict(hf_tensors(m, p["params"]))["lm_head.weight"].shape
    (8, 4)
    """
    flat = paths.flatten(params)
    for name, (path, layer, _) in hf_layout(model, params).items():
        yield name, to_hf_tensor(path, flat[path] if layer is None else flat[path][layer])


def save_pretrained(
    directory: str | Path,
    model: nn.Module,
    params: Mapping,
    *,
    max_shard_bytes: int | None = None,
    extra_config: Mapping | None = None,
) -> Path:
    """Writes ``config.json`` and safetensors weights that transformers and
    :func:`from_pretrained` read.

    Args:
      directory: created if missing.
      model, params: one of our models and its (dense, unquantized) params; merge adapters
        into the params first to export a fine-tuned model.
      max_shard_bytes: split the weights into ``model-0000i-of-0000n.safetensors`` shards of at
        most this size (plus ``model.safetensors.index.json``); one file when None.
      extra_config: more ``config.json`` fields (token ids, a label map).

    >>> save_pretrained("/tmp/tiny", model, params)  # doctest: +SKIP
    PosixPath('/tmp/tiny')
    """
    directory = Path(directory)
    write_config(directory, model, extra_config)
    slots = hf_layout(model, params)
    flat = paths.flatten(params)

    def produce(name: str) -> np.ndarray:
        path, layer, _ = slots[name]
        leaf = flat[path] if layer is None else flat[path][layer]
        return np.asarray(to_hf_tensor(path, leaf))

    # transformers refuses safetensors files without the "format" metadata.
    write_checkpoint(directory, {k: v[2] for k, v in slots.items()}, produce,
                     max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    return directory


def write_config(directory: str | Path, model: nn.Module,
                 extra_config: Mapping | None = None) -> Path:
    """Writes the ``config.json`` of ``model`` into ``directory`` (created if missing).

    >>> from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
    >>> import tempfile
    >>> f = write_config(tempfile.mkdtemp(), LlamaForCausalLM(LlamaConfig()))
    >>> read_config(f.parent)["num_hidden_layers"]
    32
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = architecture_of(model).to_config(model)
    # transformers 4 reads torch_dtype, 5 reads dtype.
    config["torch_dtype"] = config["dtype"] = jnp.dtype(model.param_dtype).name
    config.update(extra_config or {})
    file = directory / "config.json"
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return file


def hf_layout(model: nn.Module, params: Mapping
              ) -> dict[str, tuple[str, int | None, jax.ShapeDtypeStruct]]:
    """``{hf_key: (path, layer, shape and dtype in HF layout)}`` of every tensor of ``params``.

    ``params`` may hold arrays or ``jax.ShapeDtypeStruct``s (only shapes are read); ``layer``
    is the slice of a scanned stack, None elsewhere.

    >>> from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
    ...                                  num_hidden_layers=1, num_attention_heads=2))
    >>> hf_layout(m, abstract_params(m))["lm_head.weight"][2].shape
    (8, 4)
    """
    arch = architecture_of(model)
    out = {}
    for path, leaf in paths.flatten(params).items():
        layers = range(leaf.shape[0]) if is_stacked(path, arch.layer_list) else [None]
        for i in layers:
            shape = jax.ShapeDtypeStruct(leaf.shape[1:] if i is not None else leaf.shape,
                                         leaf.dtype)
            hf = jax.eval_shape(functools.partial(to_hf_tensor, path), shape)
            out[hf_key(path, arch.layer_list, i)] = (path, i, hf)
    return out


__all__ = [
    "ARCHITECTURES", "INDEX_FILE", "SINGLE_FILE", "Architecture", "Checkpoint",
    "abstract_params", "architecture_of", "bert_config_from_hf", "build_model",
    "from_hf_tensor", "from_pretrained", "hf_key", "hf_layout", "hf_tensors", "is_stacked",
    "llama_config_from_hf", "load_params", "read_config", "save_pretrained", "to_hf_tensor",
    "write_config",
]
