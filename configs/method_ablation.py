"""LoRA against its variants: MiniLM on BBC News with LoRA, rsLoRA, DoRA, VeRA, AdaLoRA, PiSSA
and LoftQ on the query and value kernels, against full fine-tuning and the head alone, under
the results protocol (``configs/protocol.py``).

    python experiments/tune.py --config=configs/method_ablation.py --seeds=3    # the table
    python experiments/tune.py --config=configs/method_ablation.py:lm --seeds=3 # the LM task
    python experiments/tune.py --config=configs/method_ablation.py:tiny --seeds=2

Trainable parameters are matched where the method allows: LoRA, rsLoRA, DoRA (plus one
magnitude per output unit), PiSSA and LoftQ at rank 8; AdaLoRA from rank 12 down to a target
of 8 (PEFT's defaults, ending at LoRA's budget); VeRA cannot match (its count is ``r + out``
per weight whatever r is) and uses PEFT's default r = 256. Every run records its trainable
count, so the table shows what each method trained. LoftQ quantizes the base to nf4 (its
point); every other run keeps the float base. Scales: alpha = 2r (scale 2) for LoRA, DoRA,
AdaLoRA, PiSSA and LoftQ; rsLoRA the protocol's alpha = 8 over sqrt(r). Each method's learning
rate is chosen on validation from its grid (``protocol.LEARNING_RATES``: the adapters' grid,
VeRA's higher one, full fine-tuning's and the head's), 3 epochs, test accuracy at the best
validation epoch; the new head trains at the protocol's head rate beside every body.

"lm" (and "lm_tiny") is the same comparison on the LM task (``configs/lm_domain.py``: the
Python-pretrained Llama-style decoder adapted to English prose, every linear layer adapted):
one epoch over the English training windows (~420k bytes; cosine to 0), validation every
quarter epoch on the first
``data.eval_windows`` held-out windows, test perplexity on the next as many (the same held-out
documents, later windows) at the best validation perplexity. Its baselines are full
fine-tuning, whose grid moves up to (3e-5, 1e-4, 3e-4) since this small model was pretrained at
3e-3, and the base untrained ("none"); it has no new head.
"""

from __future__ import annotations

import ml_collections

from configs import protocol
from configs.common import parse_variant
from configs.finetune_bbc import get_config as bbc_config
from configs.lm_domain import get_config as lm_config

METHODS = {
    "lora": {},
    "rslora": protocol.scale_overrides("rslora", 8),
    "dora": {"lora.method": "dora"},
    "vera": {"lora.method": "vera", "lora.rank": 256},
    "adalora": {"lora.method": "adalora", "lora.rank": 12, "lora.adalora.target_rank": 8},
    "pissa": {"lora.init": "pissa"},
    "loftq": {"lora.init": "loftq", "quant.fmt": "nf4"},
    "full": {"method": "full"},
    "head": {"method": "head"},
    "none": {"method": "none"},
}
FULL_RATES = (*protocol.LEARNING_RATES["full"], 3e-4)
"""Full fine-tuning's grid on MiniLM: the protocol's, and one step above it, since full
fine-tuning chose its top (1e-4) in the first pass (52423a7)."""
GRIDS = {"vera": "vera", "full": "full", "head": "head", "none": None}
"""The learning-rate grid of ``protocol.LEARNING_RATES`` each method takes ("lora" if absent;
None: nothing trained, nothing to tune)."""


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The finetune_bbc config under the results protocol plus ``sweep.methods``; "tiny" runs
    every method on a tiny random BERT (ranks scaled down to its 32-wide layers; 2 epochs, two
    rates per grid); "lm" / "lm_tiny" on the LM task (see the module docstring).

    >>> get_config("tiny").sweep.methods[:3], get_config().steps
    (('lora', 'rslora', 'dora'), 165)
    >>> lm = get_config("lm")
    >>> lm.steps, lm.eval.every, lm.eval.select, lm.sweep.methods[-2:]
    (204, 51, 'perplexity', ('full', 'none'))
    """
    variant = parse_variant(arg, ("default", "tiny", "lm", "lm_tiny"))
    if variant.startswith("lm"):
        return _lm(variant == "lm_tiny")
    config = bbc_config(arg)
    with config.unlocked():
        config.sweep.methods = tuple(m for m in METHODS if m != "none")
        protocol.apply_bbc(config, tiny=variant == "tiny")
        if variant == "default":
            config.sweep.learning_rates.full = FULL_RATES
    return config


def _lm(tiny: bool) -> ml_collections.ConfigDict:
    config = lm_config("tiny" if tiny else None)
    with config.unlocked():
        config.sweep.methods = tuple(m for m in METHODS if m != "head")
        protocol.apply_lm(config, tiny=tiny)
        config.sweep.learning_rates.full = protocol.LM_FULL_RATES[1 if tiny else 0:]
    config.lock()
    return config


def get_sweep(config: ml_collections.ConfigDict) -> list[dict]:
    """One run per method of ``config.sweep.methods`` and learning rate of its grid; on the
    tiny model the ranks shrink to fit (AdaLoRA 4 to 2, VeRA 16).

    >>> runs = get_sweep(get_config())
    >>> len(runs), runs[0]
    (28, {'lora.alpha': 16.0, 'lora.rslora': False, 'optimizer.learning_rate': 0.0003})
    >>> [run["lora.adalora.target_rank"] for run in get_sweep(get_config("tiny"))
    ...  if "lora.adalora.target_rank" in run]
    [2, 2]
    """
    tiny = config.model.name == "tiny" or (config.model.name == "llama"
                                           and config.model.hidden_size <= 32)
    runs = []
    for name in config.sweep.methods:
        run = dict(METHODS[name])
        if tiny and name == "vera":
            run["lora.rank"] = 16
        if tiny and name == "adalora":
            run["lora.rank"], run["lora.adalora.target_rank"] = 4, 2
        if name == "adalora":  # the full budget for the first tenth, the final ranks the last
            run["lora.adalora.tinit"] = run["lora.adalora.tfinal"] = max(1, config.steps // 10)
        if "lora.alpha" not in run and name not in GRIDS:  # constant scale 2 = alpha/r
            run.update(protocol.scale_overrides("constant", run.get("lora.rank",
                                                                     config.lora.rank)))
        grid = GRIDS.get(name, "lora")
        runs += [{**run, **lr} for lr in protocol.lr_grid(config, grid)] if grid else [run]
    return runs
