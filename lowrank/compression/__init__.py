"""Low-rank compression of the frozen base: kernels replaced by frozen factors ``W ~ U V``.

Compress, optionally quantize the factors (bits and rank combined), recover with LoRA on top
(the frozen tree is the factors), merge back to dense kernels for export:

>>> import jax, jax.numpy as jnp, flax.linen as nn
>>> import lowrank as lr
>>> model = nn.Dense(16)
>>> params = model.init(jax.random.key(0), jnp.ones((1, 32)))["params"]
>>> frozen = lr.compress(params, lr.CompressSpec(rank=4), quant=lr.QuantSpec("int8"))
>>> adapters = lr.init_adapters(jax.random.key(1), params, lr.LoraSpec(rank=2))
>>> y = lr.apply(model, frozen, adapters, jnp.ones((3, 32)))        # runs (x U) V + s (x A) B
>>> dense = lr.merge(frozen, adapters)                              # plain kernels for export
>>> bool(jnp.allclose(model.apply({"params": dense}, jnp.ones((3, 32))), y, atol=1e-4))
True

References:
  Yuan et al., "ASVD: Activation-aware Singular Value Decomposition for Compressing Large
  Language Models", 2023, https://arxiv.org/abs/2312.05821
  Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language
  Model Compression", ICLR 2025, https://arxiv.org/abs/2403.07378
"""

from lowrank.compression.calibrate import activation_stats
from lowrank.compression.compress import CompressSpec, compress, compression_summary
from lowrank.compression.kernel import LowRankKernel, is_low_rank

__all__ = [
    "CompressSpec",
    "LowRankKernel",
    "activation_stats",
    "compress",
    "compression_summary",
    "is_low_rank",
]
