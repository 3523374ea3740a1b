"""lowrank: LoRA and QLoRA for plain Flax models, as two pytrees.

>>> import lowrank as lr
>>> spec = lr.LoraSpec(rank=8, alpha=16, targets=r".*/(query|value)/kernel")
"""

from lowrank import optim
from lowrank.init_quantized import init
from lowrank.intercept import apply, combine
from lowrank.layers import Factorization, UnsupportedLayer
from lowrank.layouts import discover_layouts
from lowrank.lora import LoraPair, init_adapters, merge, unmerge
from lowrank.quant import (
    FORMATS,
    QuantizedArray,
    QuantSpec,
    dequantize,
    dequantize_tree,
    is_quantized,
    memory_report,
    quantize,
    quantize_tree,
)
from lowrank.spec import LoraSpec

__all__ = [
    "FORMATS",
    "Factorization",
    "LoraPair",
    "LoraSpec",
    "QuantSpec",
    "QuantizedArray",
    "UnsupportedLayer",
    "apply",
    "combine",
    "dequantize",
    "dequantize_tree",
    "discover_layouts",
    "init",
    "init_adapters",
    "is_quantized",
    "memory_report",
    "merge",
    "optim",
    "quantize",
    "quantize_tree",
    "unmerge",
]
