"""The LoRA paper's Tables 5 and 6 in miniature: MiniLM on BBC News with LoRA of rank
1, 2, 4, 8, 16, 64 on {q}, {v}, {q, v}, {q, k, v, o} or every linear layer, against full
fine-tuning and training the classifier head alone.

    python experiments/sweep.py --config=configs/rank_ablation.py --seeds=2
    python experiments/sweep.py --config=configs/rank_ablation.py:quick   # bash scripts/run.sh
    python experiments/sweep.py --config=configs/rank_ablation.py:tiny --seeds=1

alpha stays 16 for every rank (scale alpha / r), as in the paper. Each method gets the learning
rate usual for it: 3e-3 for LoRA (short runs), 1e-4 for full fine-tuning, 1e-2 for the head alone.
"""

from __future__ import annotations

import ml_collections

from configs.finetune_bbc import get_config as bbc_config

BASELINE_LEARNING_RATES = {"full": 1e-4, "head": 1e-2}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The finetune_bbc config plus the grid (``sweep.ranks``, ``sweep.adapts``,
    ``sweep.baselines``); "quick" is a 7-run grid of 20-step runs, "tiny" a 6-run grid on a
    tiny random BERT.

    >>> get_config("tiny").sweep.ranks, get_config("quick").sweep.adapts
    ((1, 4), ('q', 'qv', 'all'))
    """
    config = bbc_config(arg)
    with config.unlocked():
        config.sweep.ranks = (1, 2, 4, 8, 16, 64)
        config.sweep.adapts = ("q", "v", "qv", "qkvo", "all")
        config.sweep.baselines = ("full", "head")
        if arg == "quick":
            config.sweep.ranks, config.sweep.adapts = (2, 8), ("q", "qv", "all")
            config.sweep.baselines = ("head",)
        if arg == "tiny":
            config.sweep.ranks, config.sweep.adapts = (1, 4), ("q", "all")
    return config


def get_sweep(config: ml_collections.ConfigDict) -> list[dict]:
    """Every (targets, rank) pair, then one run per baseline method.

    >>> len(get_sweep(get_config()))
    32
    >>> get_sweep(get_config("tiny"))[-1]
    {'method': 'head', 'optimizer.learning_rate': 0.01}
    """
    runs = [{"method": "lora", "adapt": adapt, "lora.rank": rank}
            for adapt in config.sweep.adapts for rank in config.sweep.ranks]
    runs += [{"method": method, "optimizer.learning_rate": BASELINE_LEARNING_RATES[method]}
             for method in config.sweep.baselines]
    return runs
