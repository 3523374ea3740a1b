"""QLoRA's Table 2 in miniature: the held-out perplexity of a pretrained language model whose
base is stored in each data type, before any fine-tuning.

The Python-pretrained Llama-style model of ``configs/lm_domain.py`` (cached after its first
pretraining), its transformer kernels stored as nf4, fp4, int4 or int8, with and without double
quantization, in blocks of 64, 128 or 256, evaluated as stored (``method="none"``: nothing
trained) on held-out Python (the pretraining domain, as the paper evaluates its base models)
and, with ``--config.data.eval_domain=english``, on the adaptation domain.

    python experiments/sweep.py --config=configs/quant_perplexity.py
    python experiments/sweep.py --config=configs/quant_perplexity.py:tiny

QLoRA's Table 3 analogue (the same bases after adaptation) is ``configs/lm_domain.py`` swept
over the same data types (``--config.sweep.data_types``).
"""

from __future__ import annotations

import ml_collections

from configs.lm_domain import get_config as lm_config

FORMATS = ("nf4", "fp4", "int4", "int8")
BLOCK_SIZES = (64, 128, 256)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The lm_domain config (``arg``: "tiny" or the default) with nothing trained.

    >>> get_config().method, get_config().data.eval_domain
    ('none', 'python')
    """
    config = lm_config(arg)
    with config.unlocked():
        config.method = "none"
        config.data.eval_domain = "python"
        config.sweep.formats = FORMATS
        config.sweep.block_sizes = BLOCK_SIZES if arg != "tiny" else (64,)
    return config


def get_sweep(config: ml_collections.ConfigDict) -> list[dict]:
    """The float32 base, then every format x double quantization x block size.

    >>> runs = get_sweep(get_config())
    >>> len(runs), runs[0], runs[-1]
    (25, {'quant.fmt': 'none'}, {'quant.fmt': 'int8', 'quant.double_quant': True, \
'quant.block_size': 256})
    """
    runs = [{"quant.fmt": "none"}]
    runs += [{"quant.fmt": fmt, "quant.double_quant": dq, "quant.block_size": block}
             for fmt in config.sweep.formats for dq in (False, True)
             for block in config.sweep.block_sizes]
    return runs
