"""The QLoRA paper's data-type comparison in miniature: MiniLM on BBC News with LoRA (r=8) on
every linear layer over a frozen base stored as float32, int8, int4, fp4, nf4, or nf4 with
double quantization (blocks of 64; the transformer layers' kernels are quantized, embeddings,
norms and the head stay float32).

    python experiments/sweep.py --config=configs/quant_ablation.py --seeds=2
"""

from __future__ import annotations

import ml_collections

from configs.finetune_bbc import get_config as bbc_config

DATA_TYPES = {
    "float32": {"quant.fmt": "none"},
    "int8": {"quant.fmt": "int8"},
    "int4": {"quant.fmt": "int4"},
    "fp4": {"quant.fmt": "fp4"},
    "nf4": {"quant.fmt": "nf4"},
    "nf4+dq": {"quant.fmt": "nf4", "quant.double_quant": True},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The finetune_bbc config with LoRA on every linear layer, plus ``sweep.data_types``.

    >>> get_config().adapt
    'all'
    """
    config = bbc_config(arg)
    with config.unlocked():
        config.adapt = "all"
        config.sweep.data_types = tuple(DATA_TYPES)
    return config


def get_sweep(config: ml_collections.ConfigDict) -> list[dict]:
    """One run per data type.

    >>> get_sweep(get_config())[-1]
    {'quant.fmt': 'nf4', 'quant.double_quant': True}
    """
    return [dict(DATA_TYPES[name]) for name in config.sweep.data_types]
