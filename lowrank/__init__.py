"""lowrank: LoRA and QLoRA for plain Flax models, as two pytrees.

>>> import lowrank as lr
>>> spec = lr.LoraSpec(rank=8, alpha=16, targets=r".*/(query|value)/kernel")
"""

from lowrank import autodiff, compression, frozen, nnx, optim, prng
from lowrank.adalora import AdaLoRA, AdaLoraTriplet
from lowrank.adapters import init_adapters, merge, unmerge
from lowrank.autodiff import forward_mode
from lowrank.compression import CompressSpec, LowRankKernel, compress
from lowrank.dora import DoRA, DoraPair
from lowrank.init_quantized import init
from lowrank.intercept import apply, combine
from lowrank.layers import Factorization, UnsupportedLayer
from lowrank.layouts import discover_layouts
from lowrank.lora import LoRA, LoraPair
from lowrank.method import Adapter, Method, is_adapter
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
from lowrank.vera import VeRA, VeraAdapter

__all__ = [
    "FORMATS",
    "AdaLoRA",
    "AdaLoraTriplet",
    "Adapter",
    "CompressSpec",
    "DoRA",
    "DoraPair",
    "Factorization",
    "LoRA",
    "LoraPair",
    "Method",
    "LoraSpec",
    "LowRankKernel",
    "QuantSpec",
    "QuantizedArray",
    "UnsupportedLayer",
    "apply",
    "autodiff",
    "combine",
    "compression",
    "compress",
    "dequantize",
    "dequantize_tree",
    "discover_layouts",
    "forward_mode",
    "frozen",
    "init",
    "init_adapters",
    "is_adapter",
    "is_quantized",
    "memory_report",
    "merge",
    "nnx",
    "optim",
    "prng",
    "quantize",
    "quantize_tree",
    "unmerge",
    "VeRA",
    "VeraAdapter",
]
