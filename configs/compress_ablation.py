"""Rank and bits as one trade-off: MiniLM on BBC News over a frozen base whose encoder
kernels are compressed to low rank (a global budget of their parameters, activation-aware
truncation from two training batches) and/or quantized (float32, int8, nf4; a compressed
kernel's factors are quantized), trained with the classifier head alone (no recovery) or with
LoRA r=8 on every linear layer as well (LoRA recovery). The quantization-only bases (budget 0)
are the reference at equal bytes.

    python experiments/sweep.py --config=configs/compress_ablation.py --seeds=1
    python experiments/compression_report.py          # table + Pareto figure
    python experiments/sweep.py --config=configs/compress_ablation.py:lm   # the LM task
    python experiments/sweep.py --config=configs/compress_ablation.py:tiny --config.steps=2
"""

from __future__ import annotations

import itertools

import ml_collections

from configs.common import parse_variant
from configs.finetune_bbc import get_config as bbc_config
from configs.lm_domain import get_config as lm_config

BUDGETS = (0.0, 0.5, 0.25)  # fraction of the encoder kernels' parameters kept; 0: dense
FORMATS = ("none", "int8", "nf4")
RECOVERY = {"none": {"method": "head"}, "lora": {"method": "lora"}}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The finetune_bbc config (``"lm"``: the lm_domain one) with LoRA on every linear layer,
    ``compress.budget`` (0: no compression) and ``compress.aware``, and the sweep's axes.

    >>> c = get_config("tiny")
    >>> c.compress.budget, c.model.name
    (0.0, 'tiny')
    """
    variant = parse_variant(arg, ("default", "lm", "tiny"))
    if variant == "lm":
        config = lm_config(None)
    else:
        config = bbc_config("tiny" if variant == "tiny" else None)
    with config.unlocked():
        config.adapt = "all"
        config.compress = ml_collections.ConfigDict(dict(budget=0.0, aware=True))
        config.sweep.budgets = BUDGETS
        config.sweep.formats = FORMATS
        config.sweep.recovery = ("none", "lora") if variant != "lm" else ("lora",)
    return config


def get_sweep(config: ml_collections.ConfigDict) -> list[dict]:
    """Every budget x format x recovery (the LM task has no head to train alone, so it
    recovers with LoRA only).

    >>> runs = get_sweep(get_config())
    >>> len(runs), runs[0]
    (18, {'compress.budget': 0.0, 'quant.fmt': 'none', 'method': 'head'})
    """
    return [{"compress.budget": b, "quant.fmt": f, **RECOVERY[r]} for b, f, r in
            itertools.product(config.sweep.budgets, config.sweep.formats,
                              config.sweep.recovery)]
