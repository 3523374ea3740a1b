"""Domain adaptation of a small language model: a Llama-style byte-level decoder trained from
scratch on the standard library's Python (``pretrain.*``), then adapted with LoRA (or QLoRA,
``quant.fmt``) on every linear layer to English prose (pydoc's help topics); evaluated by
perplexity on held-out English.

    python experiments/run.py --config=configs/lm_domain.py
    python experiments/sweep.py --config=configs/lm_domain.py --seeds=1   # LoRA vs QLoRA
    python experiments/tune.py --config=configs/lm_domain.py:protocol --seeds=3

"protocol" (and "protocol_tiny") is QLoRA's Tables 2 and 3 on this task under the results
protocol (``configs/protocol.py``, ``protocol.apply_lm``: one epoch, test perplexity at the best
validation point, each test window's loss stored): for each base data type of
``configs/quant_ablation.py`` the base as stored, nothing trained (Table 2 on the target
domain), and LoRA over it at the rate chosen on validation from
:data:`configs.protocol.LM_LORA_RATES` (Table 3), against full fine-tuning of the float32 base
(:data:`FULL_RATES`: the protocol's LM grid and three steps above it, since full fine-tuning
chose that grid's top, 3e-4, in the method comparison and in this experiment's first pass, and
then each new top in turn: 1e-3, then 3e-3, the rate the model was pretrained at).

"study" (and "study_tiny") is the same comparison at a size that can say something (issue 15's
LM study): a 10.8M-parameter decoder (:data:`STUDY_MODEL`) pretrained on all of the standard
library's Python ("python_tree", 31.5 MB of bytes on CPython 3.11, 90% for training) for
:data:`STUDY_PRETRAIN` steps with the held-out Python's loss logged every ``eval_every``
steps (the curve that shows the plateau is kept beside the cached model,
``pretrain_metrics.jsonl``), then adapted to English as under "protocol": the base untrained
(the baseline), full fine-tuning, LoRA over float32 and QLoRA over nf4. Pretraining takes
~8.5e15 FLOPs: minutes on one GPU, days on this 2-core CPU (it checkpoints and resumes).

    python experiments/tune.py --config=configs/lm_domain.py:study --seeds=3 --batch=3
"""

from __future__ import annotations

import ml_collections

from configs import protocol
from configs.common import base_config, parse_variant
from configs.quant_ablation import DATA_TYPES

FULL_RATES = (*protocol.LM_FULL_RATES, 1e-3, 3e-3, 1e-2)
"""Full fine-tuning's grid under the protocol (see the module docstring)."""

STUDY_MODEL = dict(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1024)
"""The LM study's decoder: 10.8M parameters (6 x 1.77M in the layers, tied byte embeddings)."""
STUDY_PRETRAIN = dict(steps=8000, batch_size=128, learning_rate=1e-3, seed=0, eval_every=250)
"""8000 steps of 128 windows of 128 bytes: 131M tokens, ~4.6 epochs of the 28M training bytes
(``pretrain_metrics.jsonl`` says where the validation loss flattens)."""
STUDY_DATA_TYPES = ("float32", "nf4")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of ``arg`` ("tiny", "protocol", "protocol_tiny" or the default).

    >>> get_config("tiny").pretrain.steps
    4
    >>> c = get_config("protocol")
    >>> c.steps, c.eval.select, c.sweep.learning_rates.lora, c.sweep.data_types[-1]
    (204, 'perplexity', (0.003, 0.01, 0.03), 'nf4+dq')
    """
    variant = parse_variant(arg, ("default", "tiny", "protocol", "protocol_tiny", "study",
                                  "study_tiny"))
    config = base_config("configs.tasks:lm_domain")
    config.adapt = "all"
    config.model = ml_collections.ConfigDict(dict(
        name="llama", hidden_size=128, num_layers=4, num_heads=4, intermediate_size=344,
    ))
    config.data = ml_collections.ConfigDict(dict(
        seq_len=128, python_max_bytes=2_000_000, eval_windows=64, eval_batch_size=32,
        pretrain_domain="python",
    ))
    config.pretrain = ml_collections.ConfigDict(dict(
        steps=300, batch_size=16, learning_rate=3e-3, seed=0, eval_every=0,
    ))
    config.lora.rank, config.lora.alpha = 8, 16.0
    config.steps, config.batch_size = 100, 16
    config.optimizer.learning_rate = 2e-3
    config.optimizer.schedule, config.optimizer.warmup_steps = "warmup_cosine", 10
    config.optimizer.clip_norm = 1.0
    config.sweep.data_types = ("none", "nf4")
    if variant.endswith("tiny"):
        config.model.update(dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
        config.data.update(dict(seq_len=16, python_max_bytes=100_000, eval_windows=8,
                                eval_batch_size=8))
        config.pretrain.update(dict(steps=4, batch_size=4))
        config.steps, config.batch_size = 3, 4
        config.optimizer.warmup_steps = 1
    if variant.startswith("study"):
        config.data.pretrain_domain = "python_tree"
        config.pretrain.update(STUDY_PRETRAIN)
        if variant == "study":
            config.model.update(STUDY_MODEL)
            config.data.python_max_bytes = 100_000_000  # all of it
        else:
            config.pretrain.update(dict(steps=4, batch_size=4, eval_every=2))
    if variant.startswith(("protocol", "study")):
        tiny = variant.endswith("tiny")
        protocol.apply_lm(config, tiny=tiny)
        config.sweep.learning_rates.lora = protocol.LM_LORA_RATES[1 if tiny else 0:]
        config.sweep.learning_rates.full = FULL_RATES[4 if tiny else 0:]
        config.sweep.data_types = (STUDY_DATA_TYPES if variant.startswith("study")
                                   else tuple(DATA_TYPES))
    config.lock()
    return config


FULL_LEARNING_RATE = 3e-4  # full fine-tuning's rate (not tuned: the protocol's grid is to come)


def get_sweep(config: ml_collections.ConfigDict) -> list[dict]:
    """The baseline (the pretrained base's held-out perplexity on the target domain, nothing
    trained), full fine-tuning, then LoRA over the float32 base and QLoRA over each data type
    in the grid. Under the protocol: each data type's base untrained and LoRA over it at every
    rate of its grid, and full fine-tuning at every rate of its own.

    >>> get_sweep(get_config())[:2]
    [{'method': 'none'}, {'method': 'full', 'optimizer.learning_rate': 0.0003}]
    >>> get_sweep(get_config())[2:]
    [{'quant.fmt': 'none'}, {'quant.fmt': 'nf4'}]
    >>> runs = get_sweep(get_config("protocol"))
    >>> len(runs), runs[-1]
    (30, {'method': 'full', 'optimizer.learning_rate': 0.01})
    """
    if "learning_rates" in config.sweep:
        runs = []
        for name in config.sweep.data_types:
            base = {**DATA_TYPES[name]}
            runs.append({**base, "method": "none"})
            runs += [{**base, "method": "lora", **lr} for lr in protocol.lr_grid(config, "lora")]
        return runs + [{"method": "full", **lr} for lr in protocol.lr_grid(config, "full")]
    baselines = [{"method": "none"}, {"method": "full",
                                      "optimizer.learning_rate": FULL_LEARNING_RATE}]
    return baselines + [{"quant.fmt": fmt} for fmt in config.sweep.data_types]
