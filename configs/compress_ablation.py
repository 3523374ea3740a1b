"""Rank and bits as one trade-off, under the results protocol (``configs/protocol.py``): a
frozen base whose transformer kernels are compressed to low rank (a global budget of their
parameters, activation-aware truncation from two training batches) and/or quantized (float32,
int8, nf4; a compressed kernel's factors are quantized), then recovered with LoRA r=8 on every
linear layer, or not at all. The quantization-only bases (budget 0) are the reference at
equal bytes.

    python experiments/tune.py --config=configs/compress_ablation.py --seeds=3      # MiniLM
    python experiments/tune.py --config=configs/compress_ablation.py:lm --seeds=3   # LM task
    python experiments/compression_report.py --db=workdir/protocol.sqlite
    python experiments/tune.py --config=configs/compress_ablation.py:tiny --seeds=2

MiniLM on BBC News (the default): 3 epochs, test accuracy at the best validation epoch; no
recovery is the classifier head alone (rate from the head's grid), recovery LoRA r=8 (alpha =
2r) beside the head at the protocol's head rate. The LM task (``"lm"``): the Python-pretrained
Llama-style decoder adapted to English prose for one epoch, test perplexity at the best
validation point; no recovery is the compressed base as it is (nothing trained: the damage
compression does), recovery LoRA r=8. On MiniLM LoRA's rates are the protocol's adapter grid
(3e-4, 1e-3, 3e-3: on every linear layer 1e-2 diverged and 1e-3 did best in a first try); on
the LM task, where LoRA chose the top of that grid in the method comparison and 1e-2 was the
best by far on the first bases tried (validation perplexity 7.2 against 8.3 at 3e-3 and 9.6 at
1e-3), they come from :data:`configs.protocol.LM_LORA_RATES`, two steps higher. On MiniLM the
head alone over a compressed base chose the top of the head's grid (3e-2) in the first pass, so
its grid gained 1e-1 (:data:`HEAD_RATES`).
"""

from __future__ import annotations

import itertools

import ml_collections

from configs import protocol
from configs.common import parse_variant
from configs.finetune_bbc import get_config as bbc_config
from configs.lm_domain import get_config as lm_config

BUDGETS = (0.0, 0.5, 0.25)  # fraction of the transformer kernels' parameters kept; 0: dense
FORMATS = ("none", "int8", "nf4")
RECOVERY = {"none": {"method": "head"}, "lora": {"method": "lora"}}
HEAD_RATES = (*protocol.LEARNING_RATES["head"], 1e-1)
LM_RECOVERY = {"none": {"method": "none"}, "lora": {"method": "lora"}}
GRIDS = {"head": "head", "lora": "lora", "none": None}
"""The learning-rate grid of ``config.sweep.learning_rates`` each method takes (None: nothing
trained, nothing to tune)."""


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The finetune_bbc config (``"lm"``: the lm_domain one) under the protocol, with LoRA on
    every linear layer, ``compress.budget`` (0: no compression) and ``compress.aware``, and the
    sweep's axes. ``"tiny"`` / ``"lm_tiny"``: the tiny models, 2 epochs (BBC), two rates per
    grid.

    >>> c = get_config()
    >>> c.compress.budget, c.model.name, c.steps, c.eval.select
    (0.0, 'minilm', 165, 'accuracy')
    >>> lm = get_config("lm")
    >>> lm.steps, lm.eval.select, lm.sweep.learning_rates.lora
    (204, 'perplexity', (0.003, 0.01, 0.03))
    """
    variant = parse_variant(arg, ("default", "tiny", "lm", "lm_tiny"))
    tiny = variant.endswith("tiny")
    if variant.startswith("lm"):
        config = lm_config("tiny" if tiny else None)
    else:
        config = bbc_config("tiny" if tiny else None)
    with config.unlocked():
        config.adapt = "all"
        config.compress = ml_collections.ConfigDict(dict(budget=0.0, aware=True))
        config.sweep.budgets = BUDGETS
        config.sweep.formats = FORMATS
        config.sweep.recovery = ("none", "lora")
        if variant.startswith("lm"):
            protocol.apply_lm(config, tiny=tiny)
        else:
            protocol.apply_bbc(config, tiny=tiny)
            if not tiny:
                config.sweep.learning_rates.head = HEAD_RATES
        if variant.startswith("lm"):
            config.sweep.learning_rates.lora = protocol.LM_LORA_RATES[1 if tiny else 0:]
        config.lora.alpha = 2.0 * config.lora.rank  # the protocol's constant scale 2
    config.lock()
    return config


def get_sweep(config: ml_collections.ConfigDict) -> list[dict]:
    """Every budget x format x recovery, at every learning rate of the recovery's grid.

    >>> runs = get_sweep(get_config())
    >>> len(runs), runs[0]
    (63, {'compress.budget': 0.0, 'quant.fmt': 'none', 'method': 'head', \
'optimizer.learning_rate': 0.003})
    >>> len(get_sweep(get_config("lm")))   # no recovery is one untrained run per base
    36
    """
    lm = config.task.endswith(":lm_domain")
    recovery = LM_RECOVERY if lm else RECOVERY
    runs = []
    for budget, fmt, name in itertools.product(config.sweep.budgets, config.sweep.formats,
                                               config.sweep.recovery):
        run = {"compress.budget": budget, "quant.fmt": fmt, **recovery[name]}
        grid = GRIDS[run["method"]]
        runs += [{**run, **lr} for lr in protocol.lr_grid(config, grid)] if grid else [run]
    return runs
