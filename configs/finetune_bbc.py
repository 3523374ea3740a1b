"""MiniLM (all-MiniLM-L6-v2, mean pooling) classifying BBC News topics: LoRA r=8 on query and
value, the classifier head trained in full.

    python experiments/run.py --config=configs/finetune_bbc.py
    python experiments/run.py --config=configs/finetune_bbc.py:tiny   # a tiny random BERT
    python experiments/run.py --config=configs/finetune_bbc.py:quick  # 20 steps

Sized for a 2-core CPU: 32 tokens per article (the headline and first sentence), 30 steps of
32 articles (about half an epoch of the 1780 training articles).
"""

from __future__ import annotations

import ml_collections

from configs.common import base_config, parse_variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of ``arg``: the default, "quick" (20 steps: the Quickstart's sweep) or
    "tiny" (a tiny random BERT on a few articles, for tests).

    >>> get_config("tiny").model.name, get_config("quick").steps
    ('tiny', 20)
    """
    variant = parse_variant(arg, ("default", "quick", "tiny"))
    config = base_config("configs.tasks:bbc_classifier")
    config.adapt = "qv"
    config.model = ml_collections.ConfigDict(dict(
        name="minilm", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        dropout=False,
    ))  # the sizes apply to name="tiny" only; dropout: the model's own in training steps
    config.data = ml_collections.ConfigDict(dict(
        max_length=32, train_examples=0, eval_split="test", eval_examples=0, eval_batch_size=64,
    ))  # 0 examples: all of them; otherwise a subset stratified by topic (tasks.stratified_subset)
    config.lora.rank, config.lora.alpha = 8, 16.0
    config.lora.trainable = r"classifier/.*"
    config.steps, config.batch_size = 30, 32
    config.optimizer.learning_rate = 3e-3
    config.optimizer.schedule, config.optimizer.warmup_steps = "warmup_cosine", 3
    config.optimizer.clip_norm = 1.0
    if variant == "quick":
        config.steps = 20
    if variant == "tiny":
        config.model.name = "tiny"
        config.data.max_length, config.data.train_examples = 16, 64
        config.data.eval_examples, config.data.eval_batch_size = 24, 16
        config.steps, config.batch_size = 3, 8
        config.optimizer.warmup_steps = 1
    config.lock()
    return config


def get_sweep(config: ml_collections.ConfigDict) -> list[dict]:
    """One run: the config as it is.

    >>> get_sweep(get_config())
    [{}]
    """
    del config
    return [{}]
