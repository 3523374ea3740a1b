"""The quantized frozen base: block-wise nf4 / fp4 / int4 / int8 weights as plain pytrees.

>>> import jax, jax.numpy as jnp
>>> from lowrank import quant
>>> q = quant.quantize(jax.random.normal(jax.random.key(0), (256, 64)), "nf4", 64, True)
>>> quant.dequantize(q, jnp.float32).shape, round(quant.memory_report(q).bits_per_param, 3)
((256, 64), 4.129)
"""

from lowrank.quant.array import (
    QuantizedArray,
    default_compute_dtype,
    dequantize,
    is_quantized,
    logical_shape,
    quantize,
)
from lowrank.quant.formats import FORMATS
from lowrank.quant.memory import MemoryReport, memory_report
from lowrank.quant.tree import (
    Layout,
    QuantSpec,
    default_layout,
    dequantize_tree,
    layout_from_factorization,
    quantize_tree,
)

__all__ = [
    "FORMATS",
    "Layout",
    "MemoryReport",
    "QuantSpec",
    "QuantizedArray",
    "default_compute_dtype",
    "default_layout",
    "dequantize",
    "dequantize_tree",
    "is_quantized",
    "layout_from_factorization",
    "logical_shape",
    "memory_report",
    "quantize",
    "quantize_tree",
]
