"""The results protocol (``experiments/results/README.md``) as config fields and sweep grids.

1. Train to convergence: ``epochs`` passes over the whole training split, evaluated on the
   validation split after every epoch; the run reports the **test** split's metrics at its
   best validation point (``config.eval.select``; ties keep the earlier epoch) and stores
   each test example's prediction, for paired tests.
2. Tune the learning rate of every method on the validation split, from a small grid per
   method (:data:`LEARNING_RATES`), at seed 0; the other seeds run at the chosen rate
   (``experiments/tune.py``; ``experiments/report.py`` makes the same choice from the rows).
3. A method that trains a new classifier head beside its body (LoRA, full fine-tuning)
   trains the head at :data:`HEAD_LEARNING_RATE` whatever the body's rate
   (``optimizer.lr_multipliers``).
4. Seeds change the adapters' initialisation, the head's initialisation
   (``model.head_init = "seed"``) and the order of the batches.
5. LoRA's scale is fixed by a convention, never by the learning rate: "constant" (alpha = 2r,
   scale 2 at every rank) or "rslora" (scale alpha / sqrt(r), alpha = 8: 2 at r = 16).

>>> scale_overrides("constant", 8), scale_overrides("rslora", 4)
({'lora.alpha': 16.0, 'lora.rslora': False}, {'lora.alpha': 8.0, 'lora.rslora': True})
"""

from __future__ import annotations

import ml_collections

from lowrank import data

LEARNING_RATES = {
    "lora": (3e-4, 1e-3, 3e-3),
    "full": (1e-5, 3e-5, 1e-4),
    "head": (3e-3, 1e-2, 3e-2),
    "vera": (3e-3, 1e-2, 3e-2),
}
"""The grid each method's learning rate is chosen from (the issue's ranges, a factor ~3 apart).
VeRA trains two vectors per weight from frozen random projections and needs rates ~10x a
LoRA's (the VeRA paper's 1e-2..4e-2); it takes the head's grid."""

HEAD_LEARNING_RATE = 1e-2
"""The new head's rate when it trains beside a body (LoRA, full fine-tuning)."""

SCALES = ("constant", "rslora")
RSLORA_ALPHA = 8.0


def scale_overrides(convention: str, rank: int) -> dict:
    """The ``lora.alpha`` / ``lora.rslora`` overrides of a scale convention at ``rank``."""
    if convention == "constant":
        return {"lora.alpha": 2.0 * rank, "lora.rslora": False}
    if convention == "rslora":
        return {"lora.alpha": RSLORA_ALPHA, "lora.rslora": True}
    raise ValueError(f"unknown scale convention {convention!r}; accepted: {SCALES}")


def apply(config: ml_collections.ConfigDict, *, epochs: int, train_examples: int,
          warmup_fraction: float = 0.06) -> None:
    """Sets ``config`` (unlocked) to the protocol: ``steps`` for ``epochs`` epochs of
    ``train_examples`` at ``config.batch_size``, evaluation on the validation split every
    epoch with test scores at the best one, a seeded head, the head's own learning rate, and
    the per-method grids in ``config.sweep.learning_rates``.

    >>> c = ml_collections.ConfigDict({"batch_size": 32, "steps": 1, "optimizer": {
    ...     "warmup_steps": 0}, "eval": {"every": 0, "select": None}, "data": {}, "model": {},
    ...     "sweep": {}})
    >>> apply(c, epochs=3, train_examples=1779)
    >>> c.steps, c.eval.every, c.optimizer.warmup_steps, c.data.test_split
    (165, 55, 10, 'test')
    """
    per_epoch = data.steps_per_epoch(train_examples, config.batch_size)
    config.steps = epochs * per_epoch
    config.eval.every, config.eval.select = per_epoch, "accuracy"
    config.optimizer.warmup_steps = max(1, round(warmup_fraction * config.steps))
    config.data.eval_split, config.data.test_split = "validation", "test"
    config.model.head_init = "seed"
    config.head_learning_rate = HEAD_LEARNING_RATE
    config.sweep.epochs = epochs
    config.sweep.learning_rates = ml_collections.ConfigDict(
        {method: tuple(rates) for method, rates in LEARNING_RATES.items()})
    config.sweep.scales = SCALES


BBC_EPOCHS = 3
BBC_TRAIN_EXAMPLES = 1779  # the BBC training split (lowrank.data.split_bbc)


def apply_bbc(config: ml_collections.ConfigDict, *, tiny: bool = False) -> None:
    """Sets a BBC News config (``configs/finetune_bbc.py``, unlocked) to the protocol: 3 epochs
    over the training split; ``tiny`` (the tiny model's few articles): 2 epochs and the upper
    two rates of each grid.

    >>> from configs.finetune_bbc import get_config
    >>> c = get_config()
    >>> with c.unlocked():
    ...     apply_bbc(c)
    >>> c.steps, c.eval.every, c.eval.select
    (165, 55, 'accuracy')
    """
    if tiny:
        apply(config, epochs=2, train_examples=config.data.train_examples)
        for name, rates in config.sweep.learning_rates.items():
            config.sweep.learning_rates[name] = rates[1:]
    else:
        apply(config, epochs=BBC_EPOCHS, train_examples=BBC_TRAIN_EXAMPLES)


LM_LORA_RATES = (3e-3, 1e-2, 3e-2)
"""LoRA's grid on the LM task, above the adapter grid: LoRA chose that grid's top (3e-3) in the
method comparison and 1e-2 was far the best on the first compressed bases tried (validation
perplexity 7.2 against 8.3 at 3e-3 and 9.6 at 1e-3)."""
LM_FULL_RATES = (3e-5, 1e-4, 3e-4)
"""Full fine-tuning's grid on the LM task (the decoder was pretrained at 3e-3)."""

LM_TRAIN_WINDOWS = 3272  # English training windows of 128 bytes (lowrank.data.lm_windows)
LM_EVAL_WINDOWS = 160  # validation and test each; 342 held-out windows in all


def apply_lm(config: ml_collections.ConfigDict, *, tiny: bool = False) -> None:
    """Sets an LM-task config (``configs/lm_domain.py``, unlocked) to the protocol: one epoch
    over the English training windows (cosine to 0), validation perplexity every quarter epoch
    on the first ``data.eval_windows`` held-out windows, test perplexity on the next as many at
    the best one; no new head. ``tiny``: the tiny model's windows, two rates per grid.

    >>> from configs.lm_domain import get_config
    >>> c = get_config()
    >>> with c.unlocked():
    ...     apply_lm(c)
    >>> c.steps, c.eval.every, c.eval.select, c.data.eval_windows
    (204, 51, 'perplexity', 160)
    """
    apply(config, epochs=1, train_examples=32 if tiny else LM_TRAIN_WINDOWS)
    config.eval.every = max(1, config.eval.every // 4)
    config.eval.select = "perplexity"
    config.data.eval_windows = 6 if tiny else LM_EVAL_WINDOWS
    del config["head_learning_rate"]  # no new head
    if tiny:
        for name, rates in config.sweep.learning_rates.items():
            config.sweep.learning_rates[name] = rates[1:]


def lr_grid(config: ml_collections.ConfigDict, method: str) -> list[dict]:
    """``[{"optimizer.learning_rate": lr}, ...]`` over the method's grid (one entry, the
    config's own rate, without a grid).

    >>> lr_grid(ml_collections.ConfigDict({"optimizer": {"learning_rate": 0.1},
    ...                                    "sweep": {}}), "lora")
    [{'optimizer.learning_rate': 0.1}]
    """
    grids = config.sweep.get("learning_rates", None)
    rates = grids[method] if grids is not None else (config.optimizer.learning_rate,)
    return [{"optimizer.learning_rate": float(lr)} for lr in rates]
