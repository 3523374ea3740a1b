"""Interoperability with the torch ecosystem, read and written without torch: PEFT LoRA
adapters (:mod:`~lowrank.interop.peft`), merged Hugging Face exports
(:func:`~lowrank.interop.save_merged`) and bitsandbytes 4-bit checkpoints
(:mod:`~lowrank.interop.bnb`). The converter command is ``python -m lowrank.interop.convert``.

>>> from lowrank.interop import bnb, peft, save_merged
>>> model, frozen = bnb.load("llama-nf4/")  # doctest: +SKIP
>>> spec, adapters = peft.load("peft-adapter/", frozen, model)  # doctest: +SKIP
>>> save_merged("merged/", model, frozen, adapters)  # doctest: +SKIP
"""

from lowrank.interop import bnb, peft
from lowrank.interop.hf_export import save_merged

__all__ = ["bnb", "peft", "save_merged"]
