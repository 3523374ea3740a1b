"""lowrank: LoRA and QLoRA for plain Flax models, as two pytrees.

>>> import lowrank as lr
>>> spec = lr.LoraSpec(rank=8, alpha=16, targets=r".*/(query|value)/kernel")
"""

from lowrank import optim
from lowrank.intercept import apply, combine
from lowrank.layers import Factorization, UnsupportedLayer
from lowrank.layouts import discover_layouts
from lowrank.lora import LoraPair, init_adapters, merge, unmerge
from lowrank.spec import LoraSpec

__all__ = [
    "Factorization",
    "LoraPair",
    "LoraSpec",
    "UnsupportedLayer",
    "apply",
    "combine",
    "discover_layouts",
    "init_adapters",
    "merge",
    "optim",
    "unmerge",
]
