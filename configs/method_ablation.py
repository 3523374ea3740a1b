"""LoRA against its variants: MiniLM on BBC News with LoRA, rsLoRA, DoRA, VeRA, AdaLoRA, PiSSA
and LoftQ on the query and value kernels, against full fine-tuning and the head alone.

    python experiments/sweep.py --config=configs/method_ablation.py --seeds=3
    python experiments/sweep.py --config=configs/method_ablation.py:tiny --seeds=1

Trainable parameters are matched where the method allows: LoRA, rsLoRA, DoRA (plus one
magnitude per output unit), PiSSA and LoftQ at rank 8; AdaLoRA from rank 12 down to a target
of 8 (PEFT's defaults, ending at LoRA's budget); VeRA cannot match (its count is ``r + out``
per weight whatever r is) and uses PEFT's default r = 256. Every run records its trainable
count, so the table shows what each method trained. LoftQ quantizes the base to nf4 (its
point); every other run keeps the float base. Learning rates: 3e-3 for the low-rank methods,
1e-2 for VeRA (two vectors per weight, as the VeRA paper's higher rates), 1e-4 for full
fine-tuning, 1e-2 for the head alone. The table under the results protocol (rates chosen on
validation data per method, several seeds) is the results issue's to run.
"""

from __future__ import annotations

import ml_collections

from configs.finetune_bbc import get_config as bbc_config

METHODS = {
    "lora": {},
    "rslora": {"lora.rslora": True},
    "dora": {"lora.method": "dora"},
    "vera": {"lora.method": "vera", "lora.rank": 256, "optimizer.learning_rate": 1e-2},
    "adalora": {"lora.method": "adalora", "lora.rank": 12, "lora.adalora.target_rank": 8},
    "pissa": {"lora.init": "pissa"},
    "loftq": {"lora.init": "loftq", "quant.fmt": "nf4"},
    "full": {"method": "full", "optimizer.learning_rate": 1e-4},
    "head": {"method": "head", "optimizer.learning_rate": 1e-2},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The finetune_bbc config plus ``sweep.methods``; "tiny" runs every method on a tiny
    random BERT (ranks scaled down to its 32-wide layers).

    >>> get_config("tiny").sweep.methods[:3]
    ('lora', 'rslora', 'dora')
    """
    config = bbc_config(arg)
    with config.unlocked():
        config.sweep.methods = tuple(METHODS)
    return config


def get_sweep(config: ml_collections.ConfigDict) -> list[dict]:
    """One run per method of ``config.sweep.methods``; on the tiny model the ranks shrink to
    fit (AdaLoRA 4 to 2, VeRA 16).

    >>> [run.get("lora.method", run.get("method")) for run in get_sweep(get_config())][:5]
    [None, None, 'dora', 'vera', 'adalora']
    >>> get_sweep(get_config("tiny"))[4]["lora.adalora.target_rank"]
    2
    """
    tiny = config.model.name == "tiny"
    runs = []
    for name in config.sweep.methods:
        run = dict(METHODS[name])
        if tiny and name == "vera":
            run["lora.rank"] = 16
        if tiny and name == "adalora":
            run["lora.rank"], run["lora.adalora.target_rank"] = 4, 2
        if name == "adalora":  # the full budget for the first tenth, the final ranks the last
            run["lora.adalora.tinit"] = run["lora.adalora.tfinal"] = max(1, config.steps // 10)
        runs.append(run)
    return runs
