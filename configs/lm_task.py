"""A Llama-style byte-level decoder pretrained from scratch on the standard library's Python
(cached on disk, resumable), then adapted to English prose: the model, its pretraining and the
task (``configs.tasks:lm_domain`` names it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from configs.bases import CALIBRATION_BATCHES, BaseInfo, for_loftq, stored_base
from lowrank import data, models
from lowrank.assets import cache_dir
from lowrank.train import Task, default_config, train


def _llama_config(m: Any) -> models.LlamaConfig:
    return models.LlamaConfig(
        vocab_size=data.BYTE_VOCAB_SIZE, hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


@functools.lru_cache(maxsize=4)
def _lm_windows(domain: str, split: str, seq_len: int, max_bytes: int) -> dict[str, np.ndarray]:
    return data.lm_windows(data.lm_tokens(domain, split, max_bytes=max_bytes or None), seq_len)


def _lm_task(model, params, config, domain: str, split_sizes: tuple[int, int],
             eval_domain: str | None = None) -> Task:
    d = config.data
    train_windows = _lm_windows(domain, "train", d.seq_len, d.python_max_bytes)
    eval_windows = _lm_windows(eval_domain or domain, "validation", d.seq_len,
                               d.python_max_bytes)
    test_windows = None
    if d.get("test_split", None) == "test":  # the next windows of the held-out documents
        n = split_sizes[1]
        if not n or 2 * n > len(eval_windows["inputs"]):
            raise ValueError(f"config.data.eval_windows={n}: a test split takes the "
                             f"{n} windows after the first {n} of the "
                             f"{len(eval_windows['inputs'])} held-out ones, so it must be "
                             f"between 1 and {len(eval_windows['inputs']) // 2}")
        test_windows = {k: v[n: 2 * n] for k, v in eval_windows.items()}
    if split_sizes[1]:
        eval_windows = {k: v[: split_sizes[1]] for k, v in eval_windows.items()}
    train_batch, train_rows = data.sampler(train_windows, config.batch_size)
    return Task(model, params, train_batch, "lm",
                lambda: data.eval_batches(eval_windows, d.eval_batch_size),
                source=f"lm:{domain}", train_rows=train_rows,
                test_batches=test_windows and (
                    lambda: data.eval_batches(test_windows, d.eval_batch_size)))


def pretrained_lm(config: Any) -> tuple[Any, dict]:
    """The Llama-style model of ``config.model``, trained from scratch on the standard
    library's Python (``data.pretrain_domain``: its top-level modules, or "python_tree", all of
    it) for ``config.pretrain.steps`` steps (every weight trained), cached on disk by a hash of
    what determines it. With ``pretrain.eval_every``, the held-out Python's loss is evaluated
    that often and the curve kept beside the model (``pretrain_metrics.jsonl``), and the run
    checkpoints into ``<cache>.pretraining/`` so that a long one resumes where it stopped.

    >>> from configs.lm_domain import get_config
    >>> model, params = pretrained_lm(get_config("tiny"))  # doctest: +SKIP
    """
    m, p, d = config.model, config.pretrain, config.data
    domain, eval_every = d.get("pretrain_domain", "python"), p.get("eval_every", 0)
    what = {"model": m.to_dict(), "pretrain": p.to_dict(), "seq_len": d.seq_len,
            "python_max_bytes": d.python_max_bytes}
    if domain != "python":  # older caches keep their names
        what["pretrain_domain"] = domain
    what["pretrain"].pop("eval_every", None)  # it changes what is logged, not the model
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_dir() / "lm_domain" / digest
    if (directory / "config.json").is_file():
        return models.from_pretrained(directory)
    model = models.LlamaForCausalLM(_llama_config(m))
    params = model.init(jax.random.key(p.seed), jnp.ones((1, 8), jnp.int32))["params"]
    pre = default_config()
    pre.steps, pre.batch_size, pre.seed, pre.quiet = p.steps, p.batch_size, p.seed, True
    pre.optimizer.learning_rate, pre.optimizer.schedule = p.learning_rate, "warmup_cosine"
    pre.optimizer.warmup_steps, pre.optimizer.clip_norm = max(p.steps // 10, 1), 1.0
    pre.log.tensorboard, pre.export_adapters = False, False
    pre.lora.targets, pre.lora.trainable = None, ".*"
    workdir = directory.with_name(digest + ".pretraining")
    if eval_every:
        pre.eval.every, pre.checkpoint.every, pre.log.every = eval_every, eval_every, eval_every
        pre.workdir = str(workdir)
    task = _lm_task(model, params, _with_batch_size(config, p.batch_size), domain,
                    (0, d.eval_windows))
    trained = train(pre, task).trainable
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
        models.save_pretrained(tmp, model, trained)
        if eval_every:
            shutil.copy(workdir / "metrics.jsonl", Path(tmp) / "pretrain_metrics.jsonl")
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / "config.json").is_file():
                raise
        os.makedirs(tmp, exist_ok=True)  # TemporaryDirectory cleans up what it made
    shutil.rmtree(workdir, ignore_errors=True)  # the checkpoints: the model is saved
    return models.from_pretrained(directory)


def _with_batch_size(config: Any, batch_size: int) -> Any:
    config = config.copy_and_resolve_references()
    config.batch_size = batch_size
    return config


def lm_task(config: Any) -> tuple[Task, BaseInfo]:
    model, params = pretrained_lm(config)

    def calibration():  # a few English training windows, for activation-aware compression
        d = config.data
        windows = _lm_windows("english", "train", d.seq_len, d.python_max_bytes)
        return model, [data.batch_at(windows, i, config.batch_size, 0)["inputs"]
                       for i in range(CALIBRATION_BATCHES)]

    frozen, info = stored_base(dict(params), config, "llama", calibration)
    task = _lm_task(model, frozen, config, "english", (0, config.data.eval_windows),
                    eval_domain=config.data.get("eval_domain", None))
    return for_loftq(task, dict(params), config, "llama"), info
