"""Task factories the experiment configs name: BERT on BBC News, a Llama-style LM on a domain
shift. Each turns a config into a :class:`lowrank.train.Task`; :func:`build` also returns
facts about the frozen base (parameters, bits per parameter, quantization error) for the
results database, and :func:`training_config` resolves ``method`` / ``adapt`` into the
``lora`` fields ``lowrank.train.train`` reads.

Baselines ("full" and "head") get ``lora.targets = None``: no adapters, only the
``lora.trainable`` leaves trained (every weight, or the classifier head).
"""

from __future__ import annotations

import dataclasses
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
import ml_collections
import numpy as np

import lowrank as lr
from configs.common import QUANT_TARGETS, TARGET_SETS, check_experiment_fields
from lowrank import compression, data, models, quant, stack
from lowrank import frozen as frozen_leaves
from lowrank.assets import cache_dir, minilm_dir
from lowrank.train import Task, default_config, load_task, train

HEADS = {"bert": r"classifier/.*", "llama": None}
CALIBRATION_BATCHES = 2  # training batches that activation-aware compression measures


@dataclasses.dataclass(frozen=True)
class BaseInfo:
    """Facts about a task's frozen base, for the results database.

    Attributes:
      base_params: parameters of the model.
      bits_per_param: bits the frozen model tree stores per parameter (float32 leaves: 32).
      quant_bits_per_param: the same over the quantized weights only (nan when none).
      weight_rmse: root-mean-square error of the dequantized weights against the originals
        (0 when nothing is quantized).
      quantized_params: how many parameters are stored quantized.
    """

    base_params: int
    bits_per_param: float
    quant_bits_per_param: float
    weight_rmse: float
    quantized_params: int


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


def count_trainable(trainable: Any) -> int:
    """Parameters of a trainable tree (both factors of each adapter, every full-rank leaf).

    >>> count_trainable({"head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}})
    9
    """
    return sum(int(np.size(x)) for x in jax.tree.leaves(trainable))


def _quant_spec(config: Any, family: str) -> quant.QuantSpec | None:
    q = config.quant
    if q.fmt == "none":
        return None
    return quant.QuantSpec(q.fmt, block_size=q.block_size, double_quant=q.double_quant,
                           targets=QUANT_TARGETS[family])


def _for_loftq(task: Task, params: dict, config: Any, family: str) -> Task:
    """With ``lora.init="loftq"`` the run quantizes the float base itself (LoftQ fits the
    adapters to that quantization's error): the task keeps the float params and says how to
    quantize them. (The base's statistics stay those of plain quantization.)"""
    spec = _quant_spec(config, family)
    if config.lora.init != "loftq" or spec is None:
        return task
    return dataclasses.replace(task, params=params, quant=spec, seeded_params=None)


def _quantize(params: dict, config: Any, family: str,
              calibration: Any = None) -> tuple[dict, BaseInfo]:
    spec = _quant_spec(config, family)
    frozen = compress_base(params, config, family, spec, calibration)
    if spec is not None:
        frozen = quant.quantize_tree(frozen, spec)  # leaves compressed kernels as they are
    sq_err, n_quant, quant_bytes = 0.0, 0, 0
    flat, flat_q = lr.paths.flatten(params), lr.paths.flatten(frozen)
    for path, leaf in flat_q.items():
        if frozen_leaves.is_frozen(leaf):  # quantized, or low-rank (with quantized factors)
            diff = leaf.materialize(jnp.float32) - flat[path]
            sq_err += float(jnp.sum(diff * diff))
            n_quant += leaf.size
            quant_bytes += leaf.nbytes
    report = quant.memory_report(frozen)
    info = BaseInfo(
        base_params=report.params,
        bits_per_param=report.bits_per_param,
        quant_bits_per_param=8.0 * quant_bytes / n_quant if n_quant else float("nan"),
        weight_rmse=(sq_err / n_quant) ** 0.5 if n_quant else 0.0,
        quantized_params=n_quant,
    )
    return frozen, info


def compress_base(params: dict, config: Any, family: str, spec: Any = None,
                  calibration: Any = None) -> dict:
    """``params`` with the transformer layers' kernels compressed to low rank as
    ``config.compress`` says (a field only the compression configs have; absent or
    ``budget`` 0: returned as they are), their factors quantized with ``spec`` if given.

    ``calibration()`` gives ``(model, batches)`` for activation-aware truncation
    (``config.compress.aware``).

    >>> import ml_collections
    >>> c = ml_collections.ConfigDict({"compress": {"budget": 0.5, "aware": False}})
    >>> w = {"model": {"layers_0": {"mlp": {"kernel": jnp.ones((8, 8))}}}}
    >>> type(compress_base(w, c, "llama")["model"]["layers_0"]["mlp"]["kernel"]).__name__
    'LowRankKernel'
    """
    c = config.get("compress")
    if c is None or not c.budget:
        return params
    targets = QUANT_TARGETS[family]
    stats = None
    if c.aware:
        model, batches = calibration()
        stats = compression.activation_stats(model, params, batches, targets)
    return lr.compress(params, lr.CompressSpec(targets=targets, budget=float(c.budget)),
                       stats=stats, quant=spec)


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
def _bert_base(name: str, num_labels: int, tiny: tuple) -> tuple[Any, dict]:
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

    >>> model, params = _bert_base("tiny", 5, (32, 2, 4, 64))
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


def _bbc(config: Any) -> tuple[Task, BaseInfo]:
    m, d = config.model, config.data
    model, params = _bert_base(m.name, 5, (m.hidden_size, m.num_layers, m.num_heads,
                                           m.intermediate_size))
    if m.get("head_init", "fixed") == "seed":
        params = reseeded_head(model, dict(params), config.seed)
    splits = bbc_arrays(d.max_length)
    train_arrays = stratified_subset(splits["train"], d.train_examples)

    def calibration():  # a few training batches, for activation-aware compression
        batches = [data.batch_at(train_arrays, i, config.batch_size, 0)
                   for i in range(CALIBRATION_BATCHES)]
        return model, [(b["input_ids"], b["attention_mask"]) for b in batches]

    frozen, info = _quantize(dict(params), config, "bert", calibration)
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
    return _for_loftq(task, dict(params), config, "bert"), info


def bbc_classifier(config: Any) -> Task:
    """BERT (real MiniLM or a tiny random one, ``config.model.name``) classifying BBC News
    topics; evaluates accuracy on ``config.data.eval_split``.

    >>> from configs.finetune_bbc import get_config
    >>> bbc_classifier(training_config(get_config("tiny"))).loss  # doctest: +SKIP
    'classification'
    """
    return _bbc(config)[0]


# ---- language modelling across a domain shift -------------------------------------------

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


def _lm(config: Any) -> tuple[Task, BaseInfo]:
    model, params = pretrained_lm(config)

    def calibration():  # a few English training windows, for activation-aware compression
        d = config.data
        windows = _lm_windows("english", "train", d.seq_len, d.python_max_bytes)
        return model, [data.batch_at(windows, i, config.batch_size, 0)["inputs"]
                       for i in range(CALIBRATION_BATCHES)]

    frozen, info = _quantize(dict(params), config, "llama", calibration)
    task = _lm_task(model, frozen, config, "english", (0, config.data.eval_windows),
                    eval_domain=config.data.get("eval_domain", None))
    return _for_loftq(task, dict(params), config, "llama"), info


def lm_domain(config: Any) -> Task:
    """The Python-pretrained Llama-style model adapted to English prose (LoRA or QLoRA);
    evaluates perplexity on English validation windows.

    >>> from configs.lm_domain import get_config
    >>> lm_domain(training_config(get_config("tiny"))).loss  # doctest: +SKIP
    'lm'
    """
    return _lm(config)[0]


FACTORIES = {"configs.tasks:bbc_classifier": _bbc, "configs.tasks:lm_domain": _lm}


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
    frozen, info = _quantize(params, config, "bert")
    if frozen is not params:
        raise ValueError(f"config.quant.fmt {config.quant.fmt!r} applies to the configs.tasks "
                         f"factories only; {config.task!r} gets its base as it is")
    return task, info
