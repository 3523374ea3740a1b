"""Plain linen models with Hugging Face parameter names, and their safetensors checkpoints.

>>> from lowrank import models
>>> model, params = models.from_pretrained("path/to/hf-dir")  # doctest: +SKIP
>>> models.save_pretrained("out/", model, params)  # doctest: +SKIP
"""

from lowrank.models.bert import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertOutput,
    mean_pool,
)
from lowrank.models.hf import (
    abstract_params,
    build_model,
    from_pretrained,
    hf_key,
    load_params,
    read_config,
    save_pretrained,
)
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM, causal_mask

__all__ = [
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "BertOutput",
    "LlamaConfig",
    "LlamaForCausalLM",
    "abstract_params",
    "build_model",
    "causal_mask",
    "from_pretrained",
    "hf_key",
    "load_params",
    "mean_pool",
    "read_config",
    "save_pretrained",
]
