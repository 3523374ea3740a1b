"""The LoRA paper's Tables 5 and 6 in miniature: MiniLM on BBC News with LoRA of rank
1, 2, 4, 8, 16, 64 on {q}, {v}, {q, v}, {q, k, v, o} or every linear layer, against full
fine-tuning and training the classifier head alone.

    python experiments/tune.py  --config=configs/rank_ablation.py --seeds=3 --batch=3 \
        --experiment=rank_ablation:protocol                                 # the protocol
    python experiments/sweep.py --config=configs/rank_ablation.py:quick       # bash scripts/run.sh
    python experiments/tune.py  --config=configs/rank_ablation.py:tiny --seeds=2

The default and "tiny" variants follow the results protocol (``configs/protocol.py``): epochs
over the whole training split, the test split scored at the best validation epoch, each
method's learning rate tuned on validation from a grid, the new head at its own rate, seeds
that vary the head too, and every rank under two scale conventions (constant alpha/r = 2, and
rsLoRA), so that rank is not confounded with step size. Each (targets, convention) family
tunes its rate at rank 8 (``sweep.tune_rank``; "tiny": rank 4) and runs every rank at it, as
the LoRA and rsLoRA papers compare ranks: with the rate tuned per rank, the two conventions
would differ only by where each rank's rate falls in the grid (Adam's step on the adapters is
the rate; the scale multiplies it), while a fixed rate shows what each convention does to a
rank's effective step. "quick" is the Quickstart's 7-run grid
of 20-step runs at fixed rates (LoRA 3e-3 with alpha 16; full 1e-4; head 1e-2), a smoke test
rather than a result. (The committed rows named plain ``rank_ablation`` predate the protocol;
its rows are ``rank_ablation:protocol``.)
"""

from __future__ import annotations

import ml_collections

from configs import protocol
from configs.finetune_bbc import get_config as bbc_config

BASELINE_LEARNING_RATES = {"full": 1e-4, "head": 1e-2}  # the "quick" variant's fixed rates
LEARNING_RATES = {"lora": (3e-4, 1e-3, 3e-3, 1e-2), "full": (3e-5, 1e-4, 3e-4)}
"""The protocol's grids widened where the data asked: in the method comparison
(``configs/method_ablation.py``) LoRA on W_q, W_v and full fine-tuning chose the top of
``protocol.LEARNING_RATES``, while LoRA on every linear layer diverged at 1e-2 and did best at
1e-3 (the compression ablation's first try), so the adapters' grid gains 1e-2 and keeps 3e-4,
and full fine-tuning's moves one step up (the head chose the middle of its grid, kept)."""


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The finetune_bbc config plus the grid (``sweep.ranks``, ``sweep.adapts``,
    ``sweep.baselines``, and under the protocol ``sweep.scales`` and
    ``sweep.learning_rates``); "quick" is a 7-run grid of 20-step runs, "tiny" the protocol on
    a tiny random BERT.

    >>> get_config().steps, get_config().eval.select, get_config("quick").eval.select
    (165, 'accuracy', None)
    """
    config = bbc_config(arg)
    with config.unlocked():
        config.sweep.ranks = (1, 2, 4, 8, 16, 64)
        config.sweep.adapts = ("q", "v", "qv", "qkvo", "all")
        config.sweep.baselines = ("full", "head")
        if arg == "quick":
            config.sweep.ranks, config.sweep.adapts = (2, 8), ("q", "qv", "all")
            config.sweep.baselines = ("head",)
            return config
        if arg == "tiny":
            protocol.apply(config, epochs=2, train_examples=config.data.train_examples)
            config.sweep.ranks, config.sweep.adapts = (1, 4), ("q", "all")
            config.sweep.learning_rates.lora = (1e-3, 3e-3)
            config.sweep.learning_rates.full = (3e-5, 1e-4)
            config.sweep.learning_rates.head = (1e-2, 3e-2)
            config.sweep.tune_rank = 4
        else:
            protocol.apply_bbc(config)
            config.sweep.learning_rates.update(LEARNING_RATES)
            config.sweep.tune_rank = 8
    return config


def get_sweep(config: ml_collections.ConfigDict) -> list[dict]:
    """Every (targets, rank, scale convention, learning rate), then each baseline at each
    of its learning rates ("quick": every (targets, rank) at alpha 16, one rate per method).

    >>> len(get_sweep(get_config())), len(get_sweep(get_config("quick")))
    (246, 7)
    >>> get_sweep(get_config("tiny"))[0]
    {'method': 'lora', 'adapt': 'q', 'lora.rank': 1, 'lora.alpha': 2.0, 'lora.rslora': False, \
'optimizer.learning_rate': 0.001}
    """
    if "learning_rates" not in config.sweep:  # "quick"
        runs = [{"method": "lora", "adapt": adapt, "lora.rank": rank}
                for adapt in config.sweep.adapts for rank in config.sweep.ranks]
        return runs + [{"method": method, "optimizer.learning_rate": rate}
                       for method, rate in BASELINE_LEARNING_RATES.items()
                       if method in config.sweep.baselines]
    runs = [{"method": "lora", "adapt": adapt, "lora.rank": rank,
             **protocol.scale_overrides(scale, rank), **lr}
            for adapt in config.sweep.adapts for rank in config.sweep.ranks
            for scale in config.sweep.scales for lr in protocol.lr_grid(config, "lora")]
    runs += [{"method": method, **lr} for method in config.sweep.baselines
             for lr in protocol.lr_grid(config, method)]
    return runs
