"""Training runs given as configs, many at once: which runs can share a stack, and
``train_stacked(configs) -> one result per run``.

Runs share a stack when they differ only in :data:`MEMBER_KEYS` (seed, LoRA rank, alpha,
targets, trained leaves, learning rate and schedule, weight decay, Adam's betas and epsilon)
and in fields that don't change what is computed (``lowrank.results.UNHASHED``: workdir,
logging, checkpointing). Everything else (the task, model, data, steps, batch size, dropout,
clipping, dtypes) is one value per stack.

Each member's seed does what it does in its own run: it seeds the adapter initialisation,
the per-step PRNG keys (adapter dropout), the data order and, where the task draws leaves
from the seed (``Task.seeded_params``: a new classifier head), the initial values of those
leaves. Members with one seed share each batch; members with different seeds get their own
batches, stacked along the member axis.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from lowrank import paths, results
from lowrank.stack.checkpoint import StackCheckpoints
from lowrank.stack.layout import stack_states, unstack_states
from lowrank.stack.selection import member_metrics, stack_selector
from lowrank.stack.step import make_stacked_eval_step, make_stacked_train_step
from lowrank.train.loop import TrainResult, adamw_arguments, check_config, init_state, optimizer
from lowrank.train.precision import resolve_dtype
from lowrank.train.step import make_loss_fn
from lowrank.train.stepping import NonFiniteLoss
from lowrank.train.task import Task, load_task

MEMBER_KEYS = (
    "seed",
    "lora.rank", "lora.alpha", "lora.targets", "lora.exclude", "lora.rank_pattern",
    "lora.alpha_pattern", "lora.rslora", "lora.init", "lora.trainable",
    "optimizer.learning_rate", "optimizer.schedule", "optimizer.warmup_steps",
    "optimizer.end_learning_rate", "optimizer.weight_decay", "optimizer.b1", "optimizer.b2",
    "optimizer.eps",
)
"""Config fields in which the members of one stack may differ."""

STACKABLE_INITS = ("kaiming", "gaussian")  # pissa and loftq change the frozen base per run
# (TrainResult is gaining loop_cpu_seconds; fill whichever fields the installed one has.)
_RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(TrainResult))


def _ignored(key: str, member_keys: Sequence[str]) -> bool:
    return key in member_keys or results.unhashed(key)


def shared_fields(config: Any, member_keys: Sequence[str] = MEMBER_KEYS) -> dict[str, Any]:
    """The flattened fields of ``config`` that every member of its stack must share.

    >>> from lowrank.train import default_config
    >>> fields = shared_fields(default_config())
    >>> "steps" in fields, "seed" in fields, "lora.rank" in fields
    (True, False, False)
    """
    flat = results.flatten(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    return {k: v for k, v in flat.items() if not _ignored(k, member_keys)}


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)  # tuples and lists alike


def _key(config: Any, member_keys: Sequence[str]) -> str:
    return _json(shared_fields(config, member_keys))


def group_compatible(
    configs: Sequence[Any],
    *,
    max_size: int | None = None,
    member_keys: Sequence[str] = MEMBER_KEYS,
) -> list[list[int]]:
    """Indices of ``configs`` grouped into stacks: runs that share every field outside
    ``member_keys``, in order of first appearance, each group cut into pieces of at most
    ``max_size`` runs; a run that cannot train in a stack at all (:func:`unstackable`) is a
    group of its own.

    >>> from lowrank.train import default_config
    >>> configs = [default_config() for _ in range(5)]
    >>> configs[1].lora.rank, configs[2].steps, configs[3].seed = 2, 7, 1
    >>> configs[4].lora.init = "pissa"  # a member key, but PiSSA changes the base
    >>> group_compatible(configs), group_compatible(configs, max_size=2)
    ([[0, 1, 3], [2], [4]], [[0, 1], [3], [2], [4]])
    """
    if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
        raise ValueError(f"max_size must be an integer >= 1 or None, got {max_size!r}")
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        alone = unstackable(config) is not None
        groups.setdefault(f"alone {i}" if alone else _key(config, member_keys), []).append(i)
    size = max_size or max(len(configs), 1)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def check_compatible(configs: Sequence[Any], member_keys: Sequence[str] = MEMBER_KEYS) -> None:
    """Raises a ValueError naming the first field in which a config differs from the first
    one outside ``member_keys`` (those runs cannot share a stack).

    >>> from lowrank.train import default_config
    >>> a, b = default_config(), default_config()
    >>> b.batch_size = 16
    >>> check_compatible([a, b])
    Traceback (most recent call last):
    ...
    ValueError: runs 0 and 1 cannot share a stack: batch_size is 32 in run 0 and 16 in run 1 \
(members may differ only in seed, lora.rank, lora.alpha, lora.targets, lora.exclude, \
lora.rank_pattern, lora.alpha_pattern, lora.rslora, lora.init, lora.trainable, \
optimizer.learning_rate, optimizer.schedule, optimizer.warmup_steps, \
optimizer.end_learning_rate, optimizer.weight_decay, optimizer.b1, optimizer.b2, optimizer.eps)
    """
    if not configs:
        raise ValueError("no configs to stack: give at least one")
    first = shared_fields(configs[0], member_keys)
    for i, config in enumerate(configs[1:], start=1):
        other = shared_fields(config, member_keys)
        for key in sorted(set(first) | set(other)):
            missing = "<missing>"
            if _json(first.get(key, missing)) != _json(other.get(key, missing)):
                raise ValueError(
                    f"runs 0 and {i} cannot share a stack: {key} is "
                    f"{first.get(key, missing)!r} in run 0 and {other.get(key, missing)!r} in "
                    f"run {i} (members may differ only in {', '.join(member_keys)})")


def unstackable(config: Any) -> str | None:
    """Why ``config``'s run cannot train inside a stack, whatever it is stacked with, or None
    when it can.

    >>> from lowrank.train import default_config
    >>> config = default_config()
    >>> unstackable(config) is None
    True
    >>> config.lora.method = "adalora"
    >>> unstackable(config).split(":")[0]
    "config.lora.method 'adalora' is not stackable"
    """
    if config.parallel.mode != "jit":
        return (f"config.parallel.mode {config.parallel.mode!r} is not stackable; stacks run "
                "with parallel.mode='jit'")
    if config.lora.method == "adalora":
        return ("config.lora.method 'adalora' is not stackable: its rank budget (an optax "
                "transform around AdamW) and its orthogonality penalty are per run; train "
                "AdaLoRA runs one at a time")
    if config.lora.init not in STACKABLE_INITS:
        return (f"config.lora.init {config.lora.init!r} changes the frozen base, which a stack "
                f"shares; stackable: {STACKABLE_INITS}")
    return None


def _check_stackable(configs: Sequence[Any]) -> None:
    for i, config in enumerate(configs):
        check_config(config)
        reason = unstackable(config)
        if reason is not None:
            raise ValueError(f"run {i}: {reason}")
        if config.workdir:
            raise ValueError(f"run {i}: config.workdir is {config.workdir!r}, but a stack "
                             "writes no per-run metrics files or exports (its results come "
                             "back as TrainResults): set config.workdir to None, and give "
                             "train_stacked(..., workdir=) for the stack's checkpoints")


def _member_params(configs: Sequence[Any], task: Task) -> tuple[list, list[list[str]]]:
    """The tree each member starts from (``task.seeded_params(seed)`` where the task draws
    leaves from the seed, else ``task.params``) and the paths of the leaves drawn."""
    if task.seeded_params is None:
        return [task.params for _ in configs], [[] for _ in configs]
    shared = paths.flatten(paths.params_of(task.params))
    trees, drawn = [], []
    for config in configs:
        tree = task.seeded_params(config.seed)
        own = paths.flatten(paths.params_of(tree))
        trees.append(tree)
        drawn.append([p for p, leaf in own.items() if leaf is not shared.get(p)])
    return trees, drawn


def _init_states(configs: Sequence[Any], task: Task) -> list:
    """Each run's ``init_state``, traced into one program (one compilation, not K). A leaf
    a member draws from its seed must be one it trains: the stack shares one frozen tree."""

    @jax.jit
    def init_all(member_params):
        return [init_state(c, dataclasses.replace(task, params=p))
                for c, p in zip(configs, member_params, strict=True)]

    trees, drawn = _member_params(configs, task)
    states = init_all(trees)
    for i, (state, own) in enumerate(zip(states, drawn, strict=True)):
        untrained = sorted(set(own) - set(paths.flatten(state.trainable)))
        if untrained:
            raise ValueError(
                f"run {i} (seed {configs[i].seed}): the task draws {untrained} from the seed, "
                "but the run does not train them, so they would come from the stack's shared "
                "frozen tree; stack one seed at a time, or train those leaves")
    return states


def _stack_batches(task: Task, seeds: Sequence[int], step: int) -> dict:
    by_seed = {s: task.train_batch(s, step) for s in dict.fromkeys(seeds)}
    if len(by_seed) == 1:
        return next(iter(by_seed.values()))
    return jax.tree.map(lambda *xs: np.stack(xs), *(by_seed[s] for s in seeds))


def _non_finite(step: int, loss: float) -> NonFiniteLoss:
    return NonFiniteLoss(
        f"the training loss is {loss} at step {step} (computed on the batch of step "
        f"{step - 1}): this member's results are void (the other members of its stack are "
        "unaffected). Try a lower learning rate, gradient clipping (optimizer.clip_norm), or "
        "check that batch")


def train_stacked(
    configs: Sequence[Any],
    task: Task | None = None,
    *,
    member_keys: Sequence[str] = MEMBER_KEYS,
    workdir: str | None = None,
) -> list[TrainResult | NonFiniteLoss]:
    """Trains the runs of ``configs`` as one stack; returns, per run, what
    ``lowrank.train.train(config, task)`` would (its state in its own layout, last train
    metrics, evaluation metrics), or the ``NonFiniteLoss`` its run would have raised.

    With ``workdir``, the stack checkpoints there every ``checkpoint.every`` steps and at the
    end (``lowrank.stack.checkpoint``), and resumes from its newest checkpoint, ending equal to
    an uninterrupted stack; no metrics files or exports are written. ``loop_seconds`` (and
    ``loop_cpu_seconds``) are the stack's: the time of K runs' steps together.

    Args:
      configs: ``lowrank.train`` configs that :func:`check_compatible` accepts.
      task: the shared task; default: built by ``configs[0].task``.
      member_keys: the fields members may differ in (a caller may add fields of its own that
        the task ignores).
      workdir: the stack's own directory for checkpoints (the members' ``config.workdir``
        stay None).

    >>> from lowrank.train import default_config
    >>> configs = [default_config() for _ in range(2)]
    >>> for config, rank in zip(configs, (2, 4)):
    ...     config.steps, config.batch_size, config.quiet, config.lora.rank = 2, 8, True, rank
    >>> [r.trainable["hidden_0"]["kernel"].rank for r in train_stacked(configs)]
    [2, 4]
    """
    configs = list(configs)
    check_compatible(configs, member_keys)
    _check_stackable(configs)
    first = configs[0]
    task = task if task is not None else load_task(first)
    compute_dtype = resolve_dtype(first.compute_dtype)
    loss_fn = make_loss_fn(task.model, task.forward, task.loss, compute_dtype=compute_dtype,
                           remat=first.remat)
    schedules_txs = [optimizer(c) for c in configs]
    states = _init_states(configs, task)
    templates = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s)
                 for s in states]
    stacked = stack_states(states, task.params, [tx for _, tx in schedules_txs])
    del states
    seeds = [c.seed for c in configs]
    step = jax.jit(make_stacked_train_step(
        loss_fn, [adamw_arguments(c, s) for c, (s, _) in zip(configs, schedules_txs, strict=True)],
        micro_batches=first.micro_batches, per_member_batches=len(set(seeds)) > 1,
    ), donate_argnums=0)
    frozen = task.params
    eval_step = jax.jit(make_stacked_eval_step(loss_fn))

    def evaluate_members(stacked, batches):
        return member_metrics(eval_step, stacked, frozen, batches)

    checkpoints = start = None
    progress = {"last_metrics": [{} for _ in configs], "non_finite": [None for _ in configs]}
    evals = None
    try:
        if workdir is not None:
            checkpoints = StackCheckpoints(workdir, configs, task.params,
                                           keep=first.checkpoint.keep)
            restored = checkpoints.restore(stacked)
            if restored is not None:
                stacked, start, progress = restored
        start = start or 0
        selector = stack_selector(configs, task, evaluate_members, compute_dtype,
                                  progress.get("best"))
        history, started, cpu_started = [], None, None
        every, eval_every = first.checkpoint.every, first.eval.every if selector else 0
        for i in range(start, first.steps):
            stacked, metrics = step(stacked, frozen, _stack_batches(task, seeds, i))
            history.append((i + 1, metrics))
            if i == start:  # the first step includes compilation: time the rest
                jax.block_until_ready(metrics)
                started, cpu_started = time.perf_counter(), time.process_time()
            if eval_every and (i + 1) % eval_every == 0:  # before the checkpoint: it keeps
                evals = evaluate_members(stacked, task.eval_batches())  # the best points
                selector.observe(i + 1, stacked, frozen, evals)
            if checkpoints is not None and ((i + 1) % every == 0 or i + 1 == first.steps):
                progress = _progress(progress, history)
                if selector is not None:
                    progress["best"] = selector.to_json()
                history = []
                checkpoints.save(i + 1, stacked, progress)
        jax.block_until_ready(stacked)
        progress = _progress(progress, history)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    loop_seconds = time.perf_counter() - started if started is not None else 0.0
    loop_cpu_seconds = time.process_time() - cpu_started if started is not None else 0.0
    timed_steps = max(first.steps - start - 1, 0)
    if task.eval_batches is not None and (
            evals is None or not eval_every or first.steps % eval_every):
        evals = evaluate_members(stacked, task.eval_batches())
        if selector is not None:
            selector.observe(first.steps, stacked, frozen, evals)
    out: list[TrainResult | NonFiniteLoss] = []
    for k, state in enumerate(unstack_states(stacked, templates)):
        if progress["non_finite"][k] is not None:
            out.append(_non_finite(*progress["non_finite"][k]))
            continue
        metrics = dict(progress["last_metrics"][k])
        metrics["step_seconds"] = loop_seconds / timed_steps if timed_steps else float("nan")
        fields = dict(state=state, metrics=metrics, eval_metrics=evals[k] if evals else None,
                      start_step=start, loop_seconds=loop_seconds,
                      loop_cpu_seconds=loop_cpu_seconds, timed_steps=timed_steps, workdir=None,
                      best=selector.best[k] if selector is not None else None)
        out.append(TrainResult(**{f: fields[f] for f in _RESULT_FIELDS if f in fields}))
    return out


def _progress(progress: dict, history: list[tuple[int, Any]]) -> dict:
    """``progress`` (each member's last metrics and first non-finite ``[step, loss]``)
    carried over the steps of ``history``; JSON-ready, so a checkpoint keeps it."""
    history = jax.device_get(history)
    last, bad = [dict(m) for m in progress["last_metrics"]], list(progress["non_finite"])
    for done, metrics in history:
        for k in range(len(last)):
            loss = float(metrics["loss"][k])
            if bad[k] is None and not math.isfinite(loss):
                bad[k] = [done, loss]
            last[k] = {name: float(value[k]) for name, value in metrics.items()}
    return {**progress, "last_metrics": last, "non_finite": bad}
