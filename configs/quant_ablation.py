"""The QLoRA paper's data-type comparison in miniature: MiniLM on BBC News with LoRA (r=8) on
every linear layer over a frozen base stored as float32, int8, int4, fp4, nf4, or nf4 with
double quantization (blocks of 64; the transformer layers' kernels are quantized, embeddings,
norms and the head stay float32).

    python experiments/tune.py  --config=configs/quant_ablation.py:protocol --seeds=3 --batch=3
    python experiments/sweep.py --config=configs/quant_ablation.py --seeds=2   # the old rows
    python experiments/tune.py  --config=configs/quant_ablation.py:protocol_tiny --seeds=2

"protocol" (and "protocol_tiny") runs it under the results protocol (``configs/protocol.py``:
3 epochs, test accuracy at the best validation epoch, the head at its own rate): for each data
type LoRA at every rate of the adapters' grid (3e-4, 1e-3, 3e-3; on every linear layer 1e-2
diverged in the compression ablation's first try) at seed 0, then seeds 1 and 2 at the rate
chosen on validation; alpha = 2r. The default variant is the pre-protocol comparison (30 steps
at 3e-3, evaluated once), kept because the committed ``quant_ablation`` rows are its.
"""

from __future__ import annotations

import ml_collections

from configs import protocol
from configs.common import parse_variant
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
    """The finetune_bbc config with LoRA on every linear layer, plus ``sweep.data_types``;
    "protocol" / "protocol_tiny" under the results protocol (see the module docstring).

    >>> get_config().adapt, get_config("protocol").steps, get_config("protocol").lora.alpha
    ('all', 165, 16.0)
    """
    variant = parse_variant(arg, ("default", "tiny", "protocol", "protocol_tiny"))
    config = bbc_config("tiny" if variant.endswith("tiny") else None)
    with config.unlocked():
        config.adapt = "all"
        config.sweep.data_types = tuple(DATA_TYPES)
        if variant.startswith("protocol"):
            protocol.apply_bbc(config, tiny=variant.endswith("tiny"))
            config.lora.alpha = protocol.scale_overrides("constant", config.lora.rank)[
                "lora.alpha"]
    return config


def get_sweep(config: ml_collections.ConfigDict) -> list[dict]:
    """One run per data type; under the protocol one per (data type, LoRA rate).

    >>> get_sweep(get_config())[-1]
    {'quant.fmt': 'nf4', 'quant.double_quant': True}
    >>> runs = get_sweep(get_config("protocol"))
    >>> len(runs), runs[-1]
    (18, {'quant.fmt': 'nf4', 'quant.double_quant': True, 'optimizer.learning_rate': 0.003})
    """
    if "learning_rates" not in config.sweep:
        return [dict(DATA_TYPES[name]) for name in config.sweep.data_types]
    return [{**DATA_TYPES[name], **lr} for name in config.sweep.data_types
            for lr in protocol.lr_grid(config, "lora")]
