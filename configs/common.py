"""What the experiment configs share: the base config, named target sets, variant parsing.

Every config starts from :func:`lowrank.train.default_config` and adds:

  method: "lora" (adapters on ``adapt``'s targets), "full" (every weight trained, no
    adapters), "head" (only the classifier head trained) or "none" (nothing trained: the
    base, as stored, evaluated on the evaluation split: QLoRA's Table 2, a pretrained
    model's held-out perplexity).
  adapt: a name of ``TARGET_SETS[<family>]`` ("q", "v", "qv", "qkvo", "all") that sets
    ``lora.targets``, or "custom" to use ``lora.targets`` as given.
  model.*: which base model (``name``: "minilm" the real all-MiniLM-L6-v2, "tiny" a small
    random BERT; "llama" a Llama-style decoder of the given size).
  data.*: sequence length, evaluation split and sizes.
  quant.*: the frozen base's storage (``fmt``: "none" for float32, or a
    :data:`lowrank.quant.FORMATS` name; ``block_size``; ``double_quant``).
  sweep.*: the grid :func:`get_sweep` expands (not part of a run's identity).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import ml_collections

from lowrank.train import default_config

METHODS = ("lora", "full", "head", "none")
QUANT_FORMATS = ("none", "int8", "int4", "fp4", "nf4")

_BERT_LAYER = r"bert/encoder/layer_\d+"
_LLAMA_LAYER = r"model/layers_\d+"
TARGET_SETS = {
    "bert": {
        "q": _BERT_LAYER + r"/attention/self/query/kernel",
        "v": _BERT_LAYER + r"/attention/self/value/kernel",
        "qv": _BERT_LAYER + r"/attention/self/(query|value)/kernel",
        "qkvo": _BERT_LAYER + r"/attention/(self/(query|key|value)|output/dense)/kernel",
        "all": _BERT_LAYER + r"/.*/kernel",
    },
    "llama": {
        "q": _LLAMA_LAYER + r"/self_attn/q_proj/kernel",
        "v": _LLAMA_LAYER + r"/self_attn/v_proj/kernel",
        "qv": _LLAMA_LAYER + r"/self_attn/(q|v)_proj/kernel",
        "qkvo": _LLAMA_LAYER + r"/self_attn/(q|k|v|o)_proj/kernel",
        "all": _LLAMA_LAYER + r"/.*/kernel",
    },
}
# The kernels a quantized base stores in low precision: the transformer layers' (embeddings,
# norms and the output head stay in float32, as in QLoRA).
QUANT_TARGETS = {"bert": _BERT_LAYER + r"/.*/kernel", "llama": _LLAMA_LAYER + r"/.*/kernel"}


def parse_variant(arg: str | None, variants: tuple[str, ...] = ("default", "tiny")) -> str:
    """The variant named after the colon of ``--config=configs/x.py:variant`` ("default" if
    none).

    >>> parse_variant(None), parse_variant("tiny")
    ('default', 'tiny')
    """
    variant = arg or "default"
    if variant not in variants:
        raise ValueError(f"unknown config variant {variant!r}; accepted: {variants}")
    return variant


def base_config(task: str) -> ml_collections.ConfigDict:
    """``lowrank.train.default_config()`` plus the experiment fields above, unlocked (the
    caller fills it in and calls ``.lock()``).

    >>> base_config("configs.tasks:bbc_classifier").method
    'lora'
    """
    config = default_config()
    config.unlock()
    config.task = task
    config.method = "lora"
    config.adapt = "qv"
    config.quiet = True
    config.log.tensorboard = False
    config.export_adapters = False
    config.checkpoint.every = 10**9  # runs are short: only the final checkpoint
    config.quant = ml_collections.ConfigDict(dict(fmt="none", block_size=64, double_quant=False))
    config.sweep = ml_collections.ConfigDict()
    return config


def check_experiment_fields(config: ml_collections.ConfigDict, family: str) -> None:
    """A ValueError naming the first experiment field with a value the tasks cannot use.

    >>> c = base_config("x:y"); c.method = "lorra"
    >>> check_experiment_fields(c, "bert")
    Traceback (most recent call last):
    ...
    ValueError: config.method 'lorra' is not one of ('lora', 'full', 'head', 'none')
    """
    if config.method not in METHODS:
        raise ValueError(f"config.method {config.method!r} is not one of {METHODS}")
    names = (*TARGET_SETS[family], "custom")
    if config.adapt not in names:
        raise ValueError(f"config.adapt {config.adapt!r} is not one of {names}")
    if config.quant.fmt not in QUANT_FORMATS:
        raise ValueError(f"config.quant.fmt {config.quant.fmt!r} is not one of {QUANT_FORMATS}")


def load(spec: str) -> tuple[Any, ml_collections.ConfigDict]:
    """The module and config of ``"configs/x.py[:variant]"`` (what ``--config=`` takes).

    >>> module, config = load("configs/finetune_bbc.py:tiny")
    >>> config.model.name, callable(module.get_sweep)
    ('tiny', True)
    """
    path, _, variant = str(spec).partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist (from {spec!r})")
    name = f"_config_{file.stem}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, module.get_config(variant or None)


def experiment_name(config_spec: str) -> str:
    """The stem of the config file in ``--config=configs/x.py[:variant]``, plus the variant.

    >>> experiment_name("configs/rank_ablation.py:tiny"), experiment_name("configs/a.py")
    ('rank_ablation:tiny', 'a')
    """
    path, _, variant = config_spec.partition(":")
    return Path(path).stem + (f":{variant}" if variant else "")


def unknown_override(argv: list[str]) -> str | None:
    """An error message for the first ``--config.<key>`` in ``argv`` that the config named by
    ``--config=`` lacks (listing the valid keys), or for a config file that does not exist;
    None when all is well.

    >>> unknown_override(["run.py", "--config=configs/finetune_bbc.py", "--config.lora.rnak=2"])
    ... # doctest: +ELLIPSIS
    "unknown config key 'lora.rnak'; valid keys: adapt, batch_size, ..."
    """
    from lowrank.results import flatten

    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    try:
        _, config = load(spec)
    except FileNotFoundError as e:  # a wrong --config path: a one-line error too
        return str(e)
    valid = flatten(config.to_dict())
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config."):].split("=", 1)[0]
            if key not in valid:
                return f"unknown config key {key!r}; valid keys: {', '.join(sorted(valid))}"
    return None
