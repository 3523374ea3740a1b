"""Task factories the experiment configs name: BERT on BBC News, a Llama-style LM on a domain
shift. Each turns a config into a :class:`lowrank.train.Task`; :func:`build` also returns
facts about the frozen base (parameters, bits per parameter, quantization error) for the
results database, and :func:`training_config` resolves ``method`` / ``adapt`` into the
``lora`` fields ``lowrank.train.train`` reads.

The factories' pieces live beside this file: ``bases.py`` (the frozen base, compressed or
quantized, and its facts), ``bbc_task.py`` and ``lm_task.py`` (data, model and task of each).

Baselines ("full" and "head") get ``lora.targets = None``: no adapters, only the
``lora.trainable`` leaves trained (every weight, or the classifier head).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from configs.bases import BaseInfo, count_trainable, stored_base
from configs.bbc_task import bbc_arrays, bbc_task, stratified_subset  # noqa: F401 (re-exported)
from configs.common import TARGET_SETS, check_experiment_fields
from configs.lm_task import lm_task, pretrained_lm  # noqa: F401 (re-exported)
from lowrank import stack
from lowrank.train import Task, load_task

__all__ = ["BaseInfo", "bbc_arrays", "bbc_classifier", "build", "count_trainable", "family_of",
           "lm_domain", "pretrained_lm", "stack_member_keys", "stratified_subset",
           "training_config"]

HEADS = {"bert": r"classifier/.*", "llama": None}


def family_of(config: Any) -> str:
    """"bert" or "llama": which model family the config's task builds.

    >>> family_of(ml_collections.ConfigDict({"task": "configs.tasks:lm_domain"}))
    'llama'
    """
    return "llama" if config.task.endswith(":lm_domain") else "bert"


def training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose ``lora`` fields say what ``method`` and ``adapt`` mean:
    LoRA on ``TARGET_SETS[family][adapt]``; or, for "full" and "head", no adapters
    (``lora.targets`` None) and every weight ("full") or the head ("head") trained.

    >>> from configs.common import base_config
    >>> c = base_config("configs.tasks:bbc_classifier"); c.adapt = "q"
    >>> training_config(c).lora.targets
    'bert/encoder/layer_\\\\d+/attention/self/query/kernel'
    """
    family = family_of(config)
    check_experiment_fields(config, family)
    config = config.copy_and_resolve_references()
    lora = config.lora
    _head_rate(config, family)
    if config.method == "lora":
        if config.adapt != "custom":
            lora.targets = TARGET_SETS[family][config.adapt]
        return config
    if config.method == "none":  # evaluated as stored (quantized or not); nothing trained
        lora.targets = lora.trainable = None
        return config
    if config.method == "full" and config.quant.fmt != "none":  # "head" trains no base weight
        raise ValueError(f"config.method {config.method!r} trains the base weights, which "
                         f"cannot be stored quantized (config.quant.fmt {config.quant.fmt!r}): "
                         "use quant.fmt='none'")
    if config.method == "head" and HEADS[family] is None:
        raise ValueError(f"config.method 'head' needs a classifier head; the {family} task "
                         "has none: use 'lora' or 'full'")
    # The other adapter fields stay as the config gives them: without targets they are unused.
    lora.targets = None
    lora.trainable = ".*" if config.method == "full" else HEADS[family]
    return config


def _head_rate(config: ml_collections.ConfigDict, family: str) -> None:
    """A method that trains the head beside a body (``lora``, ``full``) gets the head's own
    rate, ``config.head_learning_rate`` (the protocol's), as a learning-rate multiplier."""
    head_rate = config.get("head_learning_rate", None)
    if head_rate is None or config.method == "head" or HEADS[family] is None:
        return
    ratio = float(head_rate) / float(config.optimizer.learning_rate)
    config.optimizer.lr_multipliers = ((HEADS[family], ratio),)


def bbc_classifier(config: Any) -> Task:
    """BERT (real MiniLM or a tiny random one, ``config.model.name``) classifying BBC News
    topics; evaluates accuracy on ``config.data.eval_split``.

    >>> from configs.finetune_bbc import get_config
    >>> bbc_classifier(training_config(get_config("tiny"))).loss  # doctest: +SKIP
    'classification'
    """
    return bbc_task(config)[0]


def lm_domain(config: Any) -> Task:
    """The Python-pretrained Llama-style model adapted to English prose (LoRA or QLoRA);
    evaluates perplexity on English validation windows.

    >>> from configs.lm_domain import get_config
    >>> lm_domain(training_config(get_config("tiny"))).loss  # doctest: +SKIP
    'lm'
    """
    return lm_task(config)[0]


FACTORIES = {"configs.tasks:bbc_classifier": bbc_task, "configs.tasks:lm_domain": lm_task}


def stack_member_keys(config: Any) -> tuple[str, ...]:
    """The fields in which runs of ``config``'s task may differ inside one stack: the library's
    ``lowrank.stack.MEMBER_KEYS`` and ``adapt`` (which only sets ``lora.targets``). Seeds
    stack too where the task draws the head from the seed (``model.head_init = "seed"``): each
    member starts from its own head (``Task.seeded_params``).

    >>> from configs.rank_ablation import get_config
    >>> "seed" in stack_member_keys(get_config("quick")), "seed" in stack_member_keys(get_config())
    (True, True)
    """
    del config  # every task here stacks the same fields
    return (*stack.MEMBER_KEYS, "adapt")


def build(config: Any) -> tuple[Task, BaseInfo]:
    """The task of a (resolved) config and the facts about its frozen base. Tasks of other
    modules (``config.task``, e.g. ``lowrank.train.toy:classifier``) are built by
    ``lowrank.train.load_task`` and stored as they are (``quant.fmt`` must be "none").

    >>> from configs.finetune_bbc import get_config
    >>> task, info = build(training_config(get_config("tiny")))  # doctest: +SKIP
    """
    if config.task in FACTORIES:
        return FACTORIES[config.task](config)
    task = load_task(config)
    params = dict(task.params)
    frozen, info = stored_base(params, config, "bert")
    if frozen is not params:
        raise ValueError(f"config.quant.fmt {config.quant.fmt!r} applies to the configs.tasks "
                         f"factories only; {config.task!r} gets its base as it is")
    return task, info
