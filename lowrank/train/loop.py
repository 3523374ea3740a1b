"""``train(config)``: build or resume the state, run the steps (``stepping.StepLoop``: metrics,
checkpoints, evaluation), write the adapters export."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings
from typing import Any

import jax
import optax

from lowrank import optim, quant
from lowrank.adalora import with_orthogonality_penalty
from lowrank.adalora_budget import adalora_budget
from lowrank.adalora_budget import ranks as adalora_ranks
from lowrank.adapters import init_adapters
from lowrank.init_quantized import init as init_with_base
from lowrank.train import checkpoint as ckpt_lib
from lowrank.train import distributed
from lowrank.train.config import lora_spec
from lowrank.train.export import export_adapters
from lowrank.train.metrics import MetricsWriter, Progress
from lowrank.train.parallel import (
    MODES,
    PMAP_AXIS,
    Runner,
    jit_runner,
    make_mesh,
    mesh_runner,
    pmap_runner,
)
from lowrank.train.precision import cast_floating, resolve_dtype
from lowrank.train.schedules import make_schedule
from lowrank.train.selection import BestPoint, Selector, check_select, make_score_step
from lowrank.train.state import TrainState
from lowrank.train.step import make_eval_step, make_loss_fn, make_train_step
from lowrank.train.stepping import StepLoop, pack_metrics
from lowrank.train.task import Task, load_task

CHECKPOINTS = "checkpoints"
ADAPTERS = "adapters"


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
      state: the final state (one copy, whatever the parallel mode).
      metrics: the last step's train metrics (loss, grad_norm, learning_rate, throughput...).
      eval_metrics: the last evaluation's metrics, or None without eval batches.
      start_step: 0, or the checkpoint step the run resumed from.
      loop_seconds: wall time of the steps after the first one this run (compilation
        excluded), logging and checkpointing included.
      loop_cpu_seconds: the process's CPU time (all threads) over the same span.
      timed_steps: how many steps ``loop_seconds`` covers.
      workdir: where files were written, or None.
      best: the best validation point and the test split's metrics and per-example scores
        at it (``config.eval.select``), or None.
    """

    state: TrainState
    metrics: dict[str, float]
    eval_metrics: dict[str, float] | None
    start_step: int
    loop_seconds: float
    loop_cpu_seconds: float
    timed_steps: int
    workdir: str | None
    best: BestPoint | None = None

    @property
    def trainable(self) -> Any:
        return self.state.trainable


def _positive_int(config: Any, name: str, minimum: int = 1) -> int:
    value = config
    for part in name.split("."):
        value = value[part]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"config.{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_config(config: Any) -> None:
    """Raises a ValueError naming the first field of ``config`` that ``train`` cannot use.

    >>> from lowrank.train.config import default_config
    >>> config = default_config()
    >>> config.parallel.mode = "threads"
    >>> check_config(config)
    Traceback (most recent call last):
    ...
    ValueError: config.parallel.mode 'threads' is not one of ('jit', 'pmap', 'mesh')
    """
    for name in ("steps", "batch_size", "micro_batches", "checkpoint.every", "checkpoint.keep",
                 "log.every"):
        _positive_int(config, name)
    _positive_int(config, "eval.every", minimum=0)
    if config.parallel.mode not in MODES:
        raise ValueError(f"config.parallel.mode {config.parallel.mode!r} is not one of {MODES}")
    if (config.get("distributed") or {}).get("enabled") and config.parallel.mode != "mesh":
        raise ValueError(f"config.distributed.enabled needs config.parallel.mode='mesh' (the "
                         f"mesh spans every process's devices), got {config.parallel.mode!r}")
    if config.batch_size % config.micro_batches:
        raise ValueError(
            f"config.batch_size {config.batch_size} does not split into config.micro_batches "
            f"{config.micro_batches} equal parts: use a multiple of {config.micro_batches}"
        )
    resolve_dtype(config.compute_dtype)
    resolve_dtype(config.param_dtype)
    check_select(config.eval.select)


def _runner(config: Any, loss_fn, tx, schedule) -> tuple[Runner, list[str]]:
    mode = config.parallel.mode
    step, names = pack_metrics(make_train_step(
        loss_fn, tx, micro_batches=config.micro_batches, schedule=schedule,
        axis_name=PMAP_AXIS if mode == "pmap" else None,
    ))
    if mode == "jit":
        return jit_runner(step), names
    if mode == "pmap":
        runner = pmap_runner(step)
    else:
        runner = mesh_runner(step, make_mesh(tuple(config.parallel.mesh_shape)))
    per_device = config.batch_size // runner.devices
    if config.batch_size % runner.devices or per_device % config.micro_batches:
        raise ValueError(
            f"config.batch_size {config.batch_size} does not split over {runner.devices} "
            f"devices (parallel.mode={mode!r}) and then into {config.micro_batches} "
            f"micro-batches: use a multiple of {runner.devices * config.micro_batches}"
        )
    return runner, names


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def optimizer(config: Any) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The learning-rate schedule and the AdamW of ``config.optimizer`` (inside AdaLoRA's
    budget transform with ``config.lora.method = "adalora"``).

    >>> from lowrank.train.config import default_config
    >>> schedule, tx = optimizer(default_config())
    >>> float(schedule(0))
    0.001
    """
    o = config.optimizer
    schedule = make_schedule(o.schedule, o.learning_rate, steps=config.steps,
                             warmup_steps=o.warmup_steps, end_learning_rate=o.end_learning_rate)
    tx = optim.adamw(**adamw_arguments(config, schedule))
    if config.lora.method == "adalora":
        a = config.lora.adalora
        tx = adalora_budget(tx, target_rank=a.target_rank, total_steps=config.steps,
                            tinit=a.tinit, tfinal=a.tfinal, delta_t=a.delta_t, beta1=a.beta1,
                            beta2=a.beta2)
    return schedule, tx


def train_loss(config: Any, loss_fn: Any) -> Any:
    """The loss the train step differentiates: ``loss_fn``, plus AdaLoRA's orthogonality
    penalty with ``config.lora.method = "adalora"`` (evaluation runs ``loss_fn`` alone)."""
    if config.lora.method != "adalora":
        return loss_fn
    return with_orthogonality_penalty(loss_fn, config.lora.adalora.orth_reg_weight)


def adamw_arguments(config: Any, schedule: optax.ScalarOrSchedule) -> dict[str, Any]:
    """The keyword arguments of :func:`lowrank.optim.adamw` that ``config.optimizer`` gives,
    with ``schedule`` as the learning rate: what :func:`optimizer` builds for a single run,
    and what ``lowrank.stack`` maps over for each member of a stack.

    >>> from lowrank.train.config import default_config
    >>> arguments = adamw_arguments(default_config(), 1e-3)
    >>> arguments["learning_rate"], arguments["clip_norm"], sorted(arguments)[:3]
    (0.001, None, ['b1', 'b2', 'clip_norm'])
    """
    o = config.optimizer
    return dict(learning_rate=schedule, weight_decay=o.weight_decay,
                loraplus_ratio=o.loraplus_ratio,
                lr_multipliers=tuple((str(p), float(m)) for p, m in o.lr_multipliers),
                clip_norm=o.clip_norm, b1=o.b1, b2=o.b2, eps=o.eps)


def init_state(config: Any, task: Task) -> TrainState:
    """A run's state at step 0: adapters initialised from ``config.seed`` as ``config.lora``
    says, in ``config.param_dtype``, with their optimizer state and the run's PRNG key.

    ``jax.eval_shape(lambda: init_state(config, task))`` is the abstract state that
    :meth:`Checkpointer.restore` needs.

    >>> from lowrank.train import toy
    >>> from lowrank.train.config import default_config
    >>> config = default_config()
    >>> state = init_state(config, toy.classifier(config))
    >>> state.trainable["hidden_0"]["kernel"].rank, int(state.step)
    (8, 0)
    """
    if changes_base(config, task):
        return init_run(config, task)[1]
    spec = lora_spec(config.lora)
    _, tx = optimizer(config)
    param_dtype = resolve_dtype(config.param_dtype)

    @jax.jit  # one compilation instead of one per small eager op
    def init(key, params):
        init_key, step_key = jax.random.split(key)
        trainable = init_adapters(init_key, params, spec, layouts=task.layouts)
        return TrainState.create(cast_floating(trainable, param_dtype), tx, step_key,
                                 config.get("dropout_prng", "hash"))

    return init(jax.random.key(config.seed), task.params)


def changes_base(config: Any, task: Task) -> bool:
    """Whether the run's frozen tree is made from ``task.params`` by ``lowrank.init``: a PiSSA
    or LoftQ init (``config.lora.init``), or a base the task asks to quantize (``task.quant``).
    """
    return config.lora.init in ("pissa", "loftq") or task.quant is not None


def init_run(config: Any, task: Task) -> tuple[Any, TrainState]:
    """``(frozen, state)`` at step 0: the frozen tree the run trains over and its state.

    The frozen tree is ``task.params``, or, when :func:`changes_base`, what
    ``lowrank.init`` makes of them: the PiSSA residual, the LoftQ-quantized base, or the
    base quantized with ``task.quant``. Deterministic in ``config.seed``, so a resumed run
    rebuilds the same base.

    >>> from lowrank.train import toy
    >>> from lowrank.train.config import default_config
    >>> config = default_config()
    >>> config.lora.init = "pissa"
    >>> task = toy.classifier(config)
    >>> frozen, state = init_run(config, task)
    >>> bool((frozen["hidden_0"]["kernel"] != task.params["hidden_0"]["kernel"]).any())
    True
    """
    spec = lora_spec(config.lora)
    if not changes_base(config, task):
        return task.params, init_state(config, task)
    quantized = [p for p, leaf in jax.tree_util.tree_flatten_with_path(
        task.params, is_leaf=quant.is_quantized)[0] if quant.is_quantized(leaf)]
    if quantized:
        raise ValueError(
            f"config.lora.init={spec.init!r} (or Task.quant) makes the frozen base from float "
            f"weights, but the task's params are already quantized ({len(quantized)} leaves): "
            "give the task float params, with Task.quant=QuantSpec(...) to quantize them")
    _, tx = optimizer(config)
    init_key, step_key = jax.random.split(jax.random.key(config.seed))
    frozen, trainable = init_with_base(init_key, task.params, spec, quant=task.quant,
                                       layouts=task.layouts)
    trainable = cast_floating(trainable, resolve_dtype(config.param_dtype))
    return frozen, TrainState.create(trainable, tx, step_key, config.get("dropout_prng", "hash"))


def train(config: Any, task: Task | None = None) -> TrainResult:
    """Trains LoRA adapters as ``config`` says (see :func:`lowrank.train.default_config` for
    every field), resuming from the newest checkpoint in ``config.workdir`` if there is one.

    Args:
      config: a config from :func:`lowrank.train.default_config`, edited.
      task: the model, base weights, data and loss; default: built by ``config.task``.

    Raises:
      NonFiniteLoss: the loss became NaN or infinite (the checkpoints keep the last finite
        step).
      ValueError: a config value that cannot be used, or a checkpoint that does not fit this
        run (a different rank, targets or base), each named.

    >>> from lowrank.train.config import default_config
    >>> config = default_config()
    >>> config.steps, config.batch_size, config.quiet = 3, 8, True
    >>> result = train(config)
    >>> int(result.state.step), sorted(result.eval_metrics)
    (3, ['accuracy', 'loss', 'weight'])
    """
    distributed.initialize(config.get("distributed"))  # before anything touches a device
    check_config(config)
    task = task if task is not None else load_task(config)
    schedule, tx = optimizer(config)
    loss_fn = make_loss_fn(task.model, task.forward, task.loss,
                           compute_dtype=resolve_dtype(config.compute_dtype), remat=config.remat)
    runner, metric_names = _runner(config, train_loss(config, loss_fn), tx, schedule)
    # The base (PiSSA's residual, LoftQ's codes) is made once, even when resuming.
    frozen, first_state = init_run(config, task) if changes_base(config, task) else (
        task.params, None)
    abstract = jax.eval_shape(
        lambda: first_state if first_state is not None else init_state(config, task))
    meta = _json({
        "lora": config.lora.to_dict(),
        "adapters": ckpt_lib.adapter_summary(abstract.trainable),
        "base": {"source": task.source, "sha256": ckpt_lib.fingerprint(task.params)},
        "run": {"seed": config.seed, "batch_size": config.batch_size},  # fix the data order
    })
    workdir = pathlib.Path(config.workdir) if config.workdir else None
    checkpointer = writer = progress = None
    try:
        state = None
        if workdir is not None:
            checkpointer = ckpt_lib.Checkpointer(workdir / CHECKPOINTS,
                                                 keep=config.checkpoint.keep)
            state = _resume(checkpointer, config, abstract, meta)
        if state is None:
            state = first_state if first_state is not None else init_state(config, task)
        start = int(state.step)
        primary = distributed.is_primary()  # metrics, progress and exports: process 0 only
        if workdir is not None and primary:
            writer = MetricsWriter(workdir, start_step=start,
                                   tensorboard=config.log.tensorboard)
        progress = Progress(config.steps, start, quiet=config.quiet or not primary)
        selector = _selector(config, task, workdir if primary else None, start)
        loop = StepLoop(config, task, runner, metric_names, checkpointer=checkpointer,
                        writer=writer, progress=progress, meta=meta, start=start,
                        selector=selector)
        placed = loop.run(runner.place_state(state), runner.place_frozen(frozen),
                          jax.jit(make_eval_step(loss_fn)))
        final = runner.host_state(placed)
        if workdir is not None and config.export_adapters and primary:
            export_adapters(workdir / ADAPTERS, final.trainable, lora=meta["lora"],
                            base=meta["base"], ranks=(adalora_ranks(final.opt_state)
                                                      if config.lora.method == "adalora"
                                                      else None))
    finally:
        for resource in (progress, writer, checkpointer):
            if resource is not None:
                resource.close()
    return TrainResult(final, loop.last_metrics, loop.eval_metrics, start, loop.loop_seconds,
                       loop.loop_cpu_seconds, max(config.steps - start - 1, 0),
                       str(workdir) if workdir else None,
                       selector.best if selector is not None else None)


def _selector(config: Any, task: Task, workdir, start: int) -> Selector | None:
    """The run's best-point keeper when ``config.eval.select`` asks for one."""
    if config.eval.select is None:
        return None
    if task.eval_batches is None:
        raise ValueError(f"config.eval.select {config.eval.select!r} selects on the evaluation "
                         "split, but the task has no eval_batches")
    score_step = make_score_step(task.model, task.forward, task.loss,
                                 compute_dtype=resolve_dtype(config.compute_dtype))
    return Selector(config.eval.select, task.test_batches,
                    jax.jit(score_step) if score_step is not None else None, workdir, start)


def _resume(checkpointer, config, abstract: TrainState, meta: dict) -> TrainState | None:
    """The state of the newest intact checkpoint (None when there is none), checked to fit.

    A damaged step is moved aside with a warning and the one before it tried, unless
    ``config.checkpoint.fallback`` is False: then the damage is raised, naming the file.
    """
    latest = checkpointer.latest_step()
    if latest is None:
        return None
    if not config.checkpoint.resume:
        raise ValueError(
            f"{checkpointer.directory} (step {latest}) holds checkpoints and "
            "config.checkpoint.resume is False: use a new workdir, or resume"
        )
    while latest is not None:
        try:
            return _restore_step(checkpointer, latest, abstract, meta)
        except ckpt_lib.DamagedCheckpoint as e:
            if not config.checkpoint.fallback:
                raise
            aside = checkpointer.set_aside(latest)
            latest = checkpointer.latest_step()
            then = f"resuming from step {latest}" if latest is not None else "starting afresh"
            warnings.warn(f"{e}; moved it to {aside} and {then} (config.checkpoint.fallback="
                          "False refuses instead)", stacklevel=3)
    return None


def _restore_step(checkpointer, step: int, abstract: TrainState, meta: dict) -> TrainState:
    diffs = ckpt_lib.differences(checkpointer.read_meta(step), meta)
    if diffs:
        raise ValueError(f"cannot resume from {checkpointer.directory} (step {step}): this run "
                         "differs from it:\n  " + "\n  ".join(diffs))
    restored, _, _ = checkpointer.restore(abstract, step)
    return restored
