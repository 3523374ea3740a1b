"""How each Hugging Face ``model_type`` maps to our linen models, and the one name map.

:func:`hf_key` is the one mapping between our parameter paths and Hugging Face tensor names
(with the kernel transpose in :func:`to_hf_tensor` / :func:`from_hf_tensor`); loading, saving
and the PEFT / bitsandbytes interop all go through it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax

from lowrank import paths
from lowrank.models import llama_nnx
from lowrank.models.bert import BertConfig, BertForSequenceClassification, BertModel
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}

# ----------------------------------------------------------------------------- architectures


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one Hugging Face ``model_type`` maps to our modules.

    Attributes:
      model_type: ``config.json``'s ``model_type``.
      base_prefix: the base model's key prefix in task checkpoints ("bert.", "model.").
      layer_list: Hugging Face's name of the layer list ("layer" in ``encoder.layer.3``).
      new_heads: parameter path prefixes that may be missing from a checkpoint and are then
        freshly initialised (a new classifier head).
    """

    model_type: str
    base_prefix: str
    layer_list: str
    new_heads: tuple[tuple[str, ...], ...]
    build: Callable[..., nn.Module]
    to_config: Callable[[nn.Module], dict]


def _fields(cls, hf: Mapping) -> dict:
    return {f.name: hf[f.name] for f in dataclasses.fields(cls) if hf.get(f.name) is not None}


def bert_config_from_hf(hf: Mapping) -> BertConfig:
    """``BertConfig`` from a parsed ``config.json``.

    >>> bert_config_from_hf({"hidden_size": 8, "num_attention_heads": 2}).hidden_size
    8
    """
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"position_embedding_type={kind!r} is not supported; accepted: absolute")
    return BertConfig(**_fields(BertConfig, hf))


def llama_config_from_hf(hf: Mapping) -> LlamaConfig:
    """``LlamaConfig`` from a parsed ``config.json`` (transformers 4 or 5 rope fields).

    >>> llama_config_from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
    ...                       "hidden_size": 16, "num_attention_heads": 4}).rope_theta
    500000.0
    """
    fields = _fields(LlamaConfig, hf)
    # transformers 5 moved rope_theta into rope_parameters; 4 kept it top-level with rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"rope_type={rope_type!r} (rope scaling) is not supported; accepted: default"
        )
    if "rope_theta" in rope:
        fields["rope_theta"] = float(rope["rope_theta"])
    return LlamaConfig(**fields)


def _build_bert(hf: Mapping, checkpoint_keys, *, num_labels, pooling, **kw) -> nn.Module:
    config = bert_config_from_hf(hf)
    archs = hf.get("architectures") or []
    if num_labels is None and any(a.endswith("ForSequenceClassification") for a in archs):
        num_labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
    if num_labels is None:
        if pooling is not None:
            raise ValueError("pooling applies to a classifier: pass num_labels as well")
        # Some BERT checkpoints were saved without a pooler; build the model they hold.
        has_pooler = any(re.match(r"(bert\.)?pooler\.", k) for k in checkpoint_keys)
        return BertModel(config, add_pooling_layer=has_pooler, **kw)
    pooling = pooling or hf.get("lowrank_pooling", "pooler")
    return BertForSequenceClassification(config, num_labels=num_labels, pooling=pooling, **kw)


def _build_llama(hf: Mapping, checkpoint_keys, *, num_labels, pooling, **kw) -> nn.Module:
    if num_labels is not None or pooling is not None:
        raise ValueError(
            "num_labels and pooling apply to BERT classifiers, not to model_type llama"
        )
    return LlamaForCausalLM(llama_config_from_hf(hf), **kw)


def _bert_to_config(model: nn.Module) -> dict:
    out = {"model_type": "bert", **dataclasses.asdict(model.config)}
    if isinstance(model, BertForSequenceClassification):
        labels = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
        out.update(
            architectures=["BertForSequenceClassification"], id2label=labels,
            label2id={v: int(k) for k, v in labels.items()}, lowrank_pooling=model.pooling,
        )
    else:
        out["architectures"] = ["BertModel"]
    out["position_embedding_type"] = "absolute"
    return out


def _llama_to_config(model: nn.Module) -> dict:
    out = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    out.update(dataclasses.asdict(model.config))
    # Both spellings, so transformers 4 and 5 read the same rope.
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": model.config.rope_theta}
    return out


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(
        "bert", "bert", "layer", (("classifier",), ("pooler",), ("bert", "pooler")),
        _build_bert, _bert_to_config,
    ),
    "llama": Architecture("llama", "model", "layers", (), _build_llama, _llama_to_config),
}


def architecture_of(model: nn.Module) -> Architecture:
    """The ``Architecture`` entry of one of our model instances.

    >>> architecture_of(LlamaForCausalLM(LlamaConfig())).model_type
    'llama'
    """
    if isinstance(model, BertModel | BertForSequenceClassification):
        return ARCHITECTURES["bert"]
    if isinstance(model, LlamaForCausalLM | llama_nnx.LlamaForCausalLM):
        return ARCHITECTURES["llama"]
    raise TypeError(
        f"{type(model).__name__} has no Hugging Face mapping; accepted: BertModel, "
        "BertForSequenceClassification, LlamaForCausalLM (linen or NNX)"
    )


# ----------------------------------------------------------------------------- the name map


def hf_key(path: str, layer_list: str, layer: int | None = None) -> str:
    """Hugging Face key of our parameter ``path``; ``layer`` picks a slice of a scanned stack.

    >>> hf_key("encoder/layer_3/attention/self/query/kernel", "layer")
    'encoder.layer.3.attention.self.query.weight'
    >>> hf_key("model/layers/mlp/up_proj/kernel", "layers", layer=1)
    'model.layers.1.mlp.up_proj.weight'
    """
    *modules, leaf = path.split(paths.SEP)
    parts: list[str] = []
    for part in modules:
        numbered = re.fullmatch(rf"{re.escape(layer_list)}_(\d+)", part)
        if numbered:
            parts += [layer_list, numbered.group(1)]
        elif part == layer_list:
            if layer is None:
                raise ValueError(f"{path} is a scanned stack: pass the layer index")
            parts += [layer_list, str(layer)]
        else:
            parts.append(part)
    if leaf not in _LEAF_TO_HF:
        raise ValueError(f"no Hugging Face name for parameter {path!r}")
    return ".".join(parts + [_LEAF_TO_HF[leaf]])


def is_stacked(path: str, layer_list: str) -> bool:
    """Whether ``path`` lies in a scanned layer stack (its arrays have a leading layer axis)."""
    return layer_list in path.split(paths.SEP)[:-1]


def is_kernel(path: str) -> bool:
    """Whether ``path`` names a kernel (stored transposed, as Linear weights, by Hugging Face).

    >>> is_kernel("model/lm_head/kernel"), is_kernel("model/norm/scale")
    (True, False)
    """
    return path.rpartition(paths.SEP)[2] == "kernel"


def from_hf_tensor(path: str, tensor: jax.Array) -> jax.Array:
    """A Hugging Face tensor in our layout: Linear weights ``[out, in]`` become kernels."""
    return tensor.T if is_kernel(path) else tensor


def to_hf_tensor(path: str, array: jax.Array) -> jax.Array:
    """Our array in Hugging Face's layout (the inverse of :func:`from_hf_tensor`)."""
    return array.T if is_kernel(path) else array


__all__ = [
    "ARCHITECTURES", "Architecture", "architecture_of", "bert_config_from_hf",
    "from_hf_tensor", "hf_key", "is_kernel", "is_stacked", "llama_config_from_hf", "to_hf_tensor",
]
