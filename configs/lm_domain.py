"""Domain adaptation of a small language model: a Llama-style byte-level decoder trained from
scratch on the standard library's Python (``pretrain.*``), then adapted with LoRA (or QLoRA,
``quant.fmt``) on every linear layer to English prose (pydoc's help topics); evaluated by
perplexity on held-out English.

    python experiments/run.py --config=configs/lm_domain.py
    python experiments/sweep.py --config=configs/lm_domain.py --seeds=1   # LoRA vs QLoRA
"""

from __future__ import annotations

import ml_collections

from configs.common import base_config, parse_variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of ``arg`` ("tiny" or the default).

    >>> get_config("tiny").pretrain.steps
    4
    """
    variant = parse_variant(arg)
    config = base_config("configs.tasks:lm_domain")
    config.adapt = "all"
    config.model = ml_collections.ConfigDict(dict(
        name="llama", hidden_size=128, num_layers=4, num_heads=4, intermediate_size=344,
    ))
    config.data = ml_collections.ConfigDict(dict(
        seq_len=128, python_max_bytes=2_000_000, eval_windows=64, eval_batch_size=32,
    ))
    config.pretrain = ml_collections.ConfigDict(dict(
        steps=300, batch_size=16, learning_rate=3e-3, seed=0,
    ))
    config.lora.rank, config.lora.alpha = 8, 16.0
    config.steps, config.batch_size = 100, 16
    config.optimizer.learning_rate = 2e-3
    config.optimizer.schedule, config.optimizer.warmup_steps = "warmup_cosine", 10
    config.optimizer.clip_norm = 1.0
    config.sweep.data_types = ("none", "nf4")
    if variant == "tiny":
        config.model.update(dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
        config.data.update(dict(seq_len=16, python_max_bytes=100_000, eval_windows=8,
                                eval_batch_size=8))
        config.pretrain.update(dict(steps=4, batch_size=4))
        config.steps, config.batch_size = 3, 4
        config.optimizer.warmup_steps = 1
    config.lock()
    return config


FULL_LEARNING_RATE = 3e-4  # full fine-tuning's rate (not tuned: the protocol's grid is to come)


def get_sweep(config: ml_collections.ConfigDict) -> list[dict]:
    """The baseline (the pretrained base's held-out perplexity on the target domain, nothing
    trained), full fine-tuning, then LoRA over the float32 base and QLoRA over each data type
    in the grid.

    >>> get_sweep(get_config())[:2]
    [{'method': 'none'}, {'method': 'full', 'optimizer.learning_rate': 0.0003}]
    >>> get_sweep(get_config())[2:]
    [{'quant.fmt': 'none'}, {'quant.fmt': 'nf4'}]
    """
    baselines = [{"method": "none"}, {"method": "full",
                                      "optimizer.learning_rate": FULL_LEARNING_RATE}]
    return baselines + [{"quant.fmt": fmt} for fmt in config.sweep.data_types]
