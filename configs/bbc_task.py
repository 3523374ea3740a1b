"""BERT (the real MiniLM or a tiny random one) classifying BBC News topics: the data (tokenized
once and cached on disk), the model with its head drawn from the run's seed where the config
says so, and the task (``configs.tasks:bbc_classifier`` names it).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lowrank as lr
from configs.bases import CALIBRATION_BATCHES, BaseInfo, for_loftq, stored_base
from lowrank import data, models
from lowrank.assets import cache_dir, minilm_dir
from lowrank.train import Task


def _atomic_write_npz(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


@functools.lru_cache(maxsize=4)
def bbc_arrays(max_length: int) -> dict[str, dict[str, np.ndarray]]:
    """The BBC News splits tokenized by MiniLM's tokenizer to ``max_length`` tokens:
    ``{split: {"input_ids", "attention_mask", "labels"}}``, cached on disk by split digest.

    >>> bbc_arrays(32)["test"]["input_ids"].shape  # doctest: +SKIP
    (223, 32)
    """
    splits = data.split_bbc(data.load_bbc())
    file = cache_dir() / "bbc_tokens" / f"{data.split_digest(splits)[:16]}_L{max_length}.npz"
    if not file.is_file():
        tok = data.load_tokenizer(minilm_dir(), max_length=max_length)
        flat = {}
        for name, split in splits.items():
            arrays = data.classification_arrays(split, tok)
            for key in ("input_ids", "attention_mask", "labels"):
                flat[f"{name}/{key}"] = arrays[key]
        _atomic_write_npz(file, flat)
    with np.load(file, allow_pickle=False) as z:
        out: dict[str, dict[str, np.ndarray]] = {}
        for key in z.files:
            split, name = key.split("/")
            out.setdefault(split, {})[name] = z[key]
    return out


def stratified_subset(arrays: dict[str, np.ndarray], n: int, seed: int = 0) -> dict:
    """``n`` examples of ``arrays`` (all of them when ``n`` is 0 or at least their number),
    taken from each label in turn, within a label in the order :func:`lowrank.data.hash_order`
    fixes by ``seed``; kept in their order in ``arrays``. A function of the split alone.

    The BBC splits list their articles by id, so their first ``n`` articles would all be of
    the first topic ("business").

    >>> split = {"labels": np.array([0, 0, 0, 0, 1, 1, 2]), "x": np.arange(7)}
    >>> stratified_subset(split, 4)["labels"].tolist()
    [0, 0, 1, 2]
    """
    labels = np.asarray(arrays["labels"])
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"a subset of {n!r} examples: use 0 (all of them) or a positive size")
    if n == 0 or n >= len(labels):
        return arrays
    by_label = [data.hash_order([str(i) for i in np.flatnonzero(labels == y)], seed)
                for y in np.unique(labels)]
    in_turn = [int(group[k]) for k in range(max(map(len, by_label))) for group in by_label
               if k < len(group)]
    chosen = np.sort(np.array(in_turn[:n]))
    return {k: v[chosen] for k, v in arrays.items()}


@functools.lru_cache(maxsize=2)
def bert_base(name: str, num_labels: int, tiny: tuple) -> tuple[Any, dict]:
    if name == "minilm":
        return models.from_pretrained(minilm_dir(), num_labels=num_labels, pooling="mean",
                                      key=jax.random.key(0))
    if name == "tiny":
        hidden, layers, heads, intermediate = tiny
        cfg = models.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=intermediate,
                                max_position_embeddings=512)
        model = models.BertForSequenceClassification(cfg, num_labels=num_labels, pooling="mean")
        params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
        return model, params
    raise ValueError(f"config.model.name {name!r} is not one of ('minilm', 'tiny')")


def reseeded_head(model: Any, params: dict, seed: int) -> dict:
    """``params`` with the classifier head drawn afresh from ``seed`` (normal, std
    ``initializer_range``, zero bias: how the model initialises it), so that runs of different
    seeds also differ in their head's initialisation, as they do in the papers' protocols.

    >>> model, params = bert_base("tiny", 5, (32, 2, 4, 64))
    >>> a, b = reseeded_head(model, params, 1), reseeded_head(model, params, 2)
    >>> bool((a["classifier"]["kernel"] != b["classifier"]["kernel"]).all())
    True
    """
    head = params["classifier"]
    std = model.config.initializer_range
    kernel = std * jax.random.normal(jax.random.key(seed), head["kernel"].shape,
                                     head["kernel"].dtype)
    return {**params, "classifier": {"kernel": kernel, "bias": jnp.zeros_like(head["bias"])}}


def _bert_forward(model, frozen, trainable, batch, rng):
    return lr.apply(model, frozen, trainable, batch["input_ids"], batch["attention_mask"],
                    lora_rng=rng)


def _bert_forward_with_dropout(model, frozen, trainable, batch, rng):
    """``_bert_forward`` with the model's own dropout (hidden and attention probabilities, as
    in transformers' ``train()`` mode) on in training steps (``rng`` given), off in
    evaluation (``config.model.dropout``)."""
    return lr.apply(model, frozen, trainable, batch["input_ids"], batch["attention_mask"],
                    lora_rng=rng, deterministic=rng is None)


def bbc_task(config: Any) -> tuple[Task, BaseInfo]:
    m, d = config.model, config.data
    model, params = bert_base(m.name, 5, (m.hidden_size, m.num_layers, m.num_heads,
                                           m.intermediate_size))
    if m.get("head_init", "fixed") == "seed":
        params = reseeded_head(model, dict(params), config.seed)
    splits = bbc_arrays(d.max_length)
    train_arrays = stratified_subset(splits["train"], d.train_examples)

    def calibration():  # a few training batches, for activation-aware compression
        batches = [data.batch_at(train_arrays, i, config.batch_size, 0)
                   for i in range(CALIBRATION_BATCHES)]
        return model, [(b["input_ids"], b["attention_mask"]) for b in batches]

    frozen, info = stored_base(dict(params), config, "bert", calibration)
    eval_arrays = stratified_subset(splits[d.eval_split], d.eval_examples)
    test_split = d.get("test_split", None)
    test_arrays = stratified_subset(splits[test_split], d.eval_examples) if test_split else None
    batch_size = config.batch_size

    train_batch, train_rows = data.sampler(train_arrays, batch_size)

    def eval_batches():
        return data.eval_batches(eval_arrays, d.eval_batch_size)

    def test_batches():
        return data.eval_batches(test_arrays, d.eval_batch_size)

    seeded = None
    if m.get("head_init", "fixed") == "seed":
        def seeded(seed):  # the head drawn from another seed, on this base
            return reseeded_head(model, dict(frozen), seed)
    task = Task(model, frozen, train_batch, "classification", eval_batches,
                forward=_bert_forward_with_dropout if m.get("dropout", False) else _bert_forward,
                source=f"bbc:{m.name}", test_batches=test_batches if test_split else None,
                train_rows=train_rows, seeded_params=seeded)
    return for_loftq(task, dict(params), config, "bert"), info
