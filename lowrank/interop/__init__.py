"""Interoperability with the torch ecosystem: PEFT adapters, merged Hugging Face exports and
bitsandbytes 4-bit checkpoints, all read and written without torch.

>>> from lowrank.interop import peft
>>> spec, adapters = peft.load("peft-adapter/", params, model)  # doctest: +SKIP
"""

from lowrank.interop import peft

__all__ = ["peft"]
