"""Hugging Face tensor names of a model's parameters, and the modules that hold them.

A thin index over :func:`lowrank.models.hf_key` (the one place that maps our paths to
Hugging Face names): it lists every tensor name once, with the parameter path and, for a
scanned stack, the layer slice it comes from. PEFT files name modules and tensors this way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from lowrank import paths
from lowrank.adapters import shape_of
from lowrank.models import hf


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one Hugging Face tensor lives in our params: ``path``, and ``layer`` of a scan."""

    path: str
    layer: int | None = None


def tensor_index(model: nn.Module, params: Mapping) -> dict[str, Slot]:
    """``{hf_key: Slot}`` for every parameter of ``model`` (each layer of a scan on its own).

    ``params`` may hold arrays, ``QuantizedArray`` leaves or ``jax.ShapeDtypeStruct`` (only
    shapes are read).

    >>> from lowrank.models import LlamaConfig, LlamaForCausalLM, abstract_params
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
    ...                                  num_hidden_layers=1, num_attention_heads=2))
    >>> tensor_index(m, abstract_params(m))["model.layers.0.mlp.up_proj.weight"]
    Slot(path='model/layers_0/mlp/up_proj/kernel', layer=None)
    """
    arch = hf.architecture_of(model)
    out: dict[str, Slot] = {}
    for path, leaf in paths.flatten(paths.params_of(params)).items():
        if hf.is_stacked(path, arch.layer_list):
            for i in range(shape_of(leaf)[0]):
                out[hf.hf_key(path, arch.layer_list, i)] = Slot(path, i)
        else:
            out[hf.hf_key(path, arch.layer_list)] = Slot(path)
    return out


def module_of(key: str) -> str:
    """The module part of a tensor name.

    >>> module_of("model.layers.0.mlp.up_proj.weight")
    'model.layers.0.mlp.up_proj'
    """
    return key.rpartition(".")[0]


def modules(index: Mapping[str, Slot]) -> dict[str, dict[str, Slot]]:
    """``{module: {tensor name within it: Slot}}`` from a :func:`tensor_index`.

    >>> modules({"a.dense.weight": Slot("a/dense/kernel")})
    {'a.dense': {'weight': Slot(path='a/dense/kernel', layer=None)}}
    """
    out: dict[str, dict[str, Slot]] = {}
    for key, slot in index.items():
        out.setdefault(module_of(key), {})[key.rpartition(".")[2]] = slot
    return out


def slice_of(array: Any, slot: Slot) -> Any:
    """The part of ``array`` (a parameter or an adapter factor) that ``slot`` names.

    >>> import numpy as np
    >>> slice_of(np.zeros((3, 4, 5)), Slot("s/kernel", 1)).shape
    (4, 5)
    """
    return array if slot.layer is None else array[slot.layer]


def leaf_name(path: str) -> str:
    """The last part of a parameter path (``kernel``, ``bias``...)."""
    return path.rpartition(paths.SEP)[2]
