"""The training config: every field ``train`` reads, with its default and meaning."""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from lowrank.spec import LoraSpec


def default_config() -> ml_collections.ConfigDict:
    """The default (locked) training config; assigning a key it lacks is an error that lists
    the keys it has. Add task-specific fields with ``with config.unlocked(): ...``.

    Fields:
      task: import path of the task factory, "package.module:function"; it is called with the
        config and returns a :class:`lowrank.train.Task` (model, base weights, data, loss).
      seed: seeds the adapter initialisation, the per-step PRNG keys and the data order.
      dropout_prng: the generator of the per-step keys' bits (dropout masks): "hash"
        (``lowrank.prng``: the same distribution, ~4-5x cheaper on CPU) or "threefry" (JAX's
        default bits). Keys, initialisation and data order do not depend on it.
      steps: optimizer steps in total (a resumed run continues up to it).
      batch_size: examples per optimizer step (over all devices and micro-batches).
      micro_batches: gradient accumulation: the batch is processed in this many equal parts
        and their gradients averaged (memory of one part, result of the whole batch).
      workdir: where checkpoints (``checkpoints/``), metrics (``metrics.jsonl``,
        ``tensorboard/``) and the adapters export (``adapters/``) go; None writes nothing.
      quiet: no progress bar (sweeps).
      compute_dtype: "auto" (float32 on CPU, bfloat16 on GPU/TPU), "float32", "bfloat16",
        "float16": the dtype of the forward and backward pass. On CPU "auto" is float32
        because XLA:CPU computes bfloat16 dots in float32 (measured on AVX512-BF16 and AMX
        CPUs: ``benchmarks/RESULTS.md``), so bfloat16 only adds conversions there.
      param_dtype: the dtype in which the trainable tree and its optimizer state are kept.
      remat: recompute the forward pass in the backward pass instead of storing activations.
      lora.*: the :class:`lowrank.LoraSpec` fields (rank, alpha, targets, exclude,
        rank_pattern and alpha_pattern as tuples of (regex, value) pairs, dropout, init,
        rslora, trainable, method). ``init`` "pissa" or "loftq" also makes the frozen base
        (``lowrank.init``; LoftQ quantizes it with the task's ``quant``).
      lora.adalora.*: with ``lora.method = "adalora"`` (``lora.rank`` is the initial rank),
        the budget of :func:`lowrank.adalora_budget.adalora_budget` (target_rank, tinit,
        tfinal, delta_t, beta1, beta2; ``total_steps`` is ``steps``) and the weight of
        :func:`lowrank.adalora.orthogonality_penalty` in the train loss (orth_reg_weight).
        The final ranks go to the export's ``adapters.json`` (``"ranks"``).
      optimizer.learning_rate, .schedule ("constant", "warmup_cosine", "linear"),
        .warmup_steps, .end_learning_rate, .weight_decay, .loraplus_ratio, .lr_multipliers
        (``(regex, multiplier)`` pairs: a head learning faster than the body), .clip_norm
        (None: no clipping), .b1, .b2, .eps: AdamW from :func:`lowrank.optim.adamw`.
      parallel.mode: "jit" (one device), "pmap" (data parallel over all devices) or "mesh"
        (jit over a (data, fsdp) mesh; the frozen base is split along fsdp).
      parallel.mesh_shape: (data, fsdp) sizes; one may be -1 for "the rest of the devices".
      checkpoint.every: save every this many steps (and always at the end).
      checkpoint.keep: how many of the newest checkpoints to keep.
      checkpoint.resume: continue from the newest checkpoint in the workdir if there is one
        (False with checkpoints present is an error, never a silent overwrite).
      checkpoint.fallback: a checkpoint that cannot be read (a truncated or overwritten file)
        is moved to ``checkpoints.damaged/`` with a warning naming the step and the file, and
        the previous one is used; False raises that error instead.
      eval.every: evaluate every this many steps; 0 evaluates only at the end.
      eval.select: None, or the metric ("accuracy", "loss", "perplexity") that picks the best
        evaluation point: at each one that improves it, the task's ``test_batches`` are
        scored (metrics and per-example scores), and ``TrainResult.best`` reports them
        (``lowrank.train.selection``).
      log.every: write the train metrics of every this many steps (checks every step's loss).
      log.tensorboard: also write TensorBoard event files.
      export_adapters: write the adapters-only export at the end.
      distributed.enabled: one run over several processes (``lowrank.train.distributed``;
        needs ``parallel.mode="mesh"``).
      distributed.coordinator_address, .num_processes, .process_id: ``HOST:PORT`` of process
        0, how many processes, this one's index; all None: detected as JAX detects them
        (SLURM, Open MPI).
      distributed.timeout_s: how long to wait for the coordinator and the other processes.

    >>> config = default_config()
    >>> config.lora.rank = 4
    >>> config.lora.rnak = 4
    Traceback (most recent call last):
    ...
    AttributeError: ...
    """
    spec = LoraSpec()
    config = ml_collections.ConfigDict()
    config.task = "lowrank.train.toy:classifier"
    config.seed = 0
    config.dropout_prng = "hash"
    config.steps = 100
    config.batch_size = 32
    config.micro_batches = 1
    config.workdir = placeholder(str)
    config.quiet = False
    config.compute_dtype = "auto"
    config.param_dtype = "float32"
    config.remat = False
    config.lora = ml_collections.ConfigDict(dict(
        rank=spec.rank,
        alpha=float(spec.alpha),
        targets=spec.targets,
        exclude=placeholder(str),
        rank_pattern=(),
        alpha_pattern=(),
        dropout=spec.dropout,
        init=spec.init,
        rslora=spec.rslora,
        trainable=placeholder(str),
        method=spec.method,
        adalora=ml_collections.ConfigDict(dict(
            target_rank=4, tinit=0, tfinal=0, delta_t=1, beta1=0.85, beta2=0.85,
            orth_reg_weight=0.5)),
    ))
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3,
        schedule="constant",
        warmup_steps=0,
        end_learning_rate=0.0,
        weight_decay=0.0,
        loraplus_ratio=1.0,
        lr_multipliers=(),
        clip_norm=placeholder(float),
        b1=0.9,
        b2=0.999,
        eps=1e-8,
    ))
    config.parallel = ml_collections.ConfigDict(dict(mode="jit", mesh_shape=(-1, 1)))
    config.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=3, resume=True,
                                                               fallback=True))
    config.eval = ml_collections.ConfigDict(dict(every=0, select=placeholder(str)))
    config.log = ml_collections.ConfigDict(dict(every=1, tensorboard=True))
    config.export_adapters = True
    config.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address=placeholder(str), num_processes=placeholder(int),
        process_id=placeholder(int), timeout_s=120))
    config.lock()
    return config


def lora_spec(lora: ml_collections.ConfigDict) -> LoraSpec:
    """The ``LoraSpec`` of ``config.lora``.

    >>> lora_spec(default_config().lora).rank
    8
    """
    fields = lora.to_dict()
    fields.pop("adalora", None)  # the budget's and the loss's, not the spec's
    for name in ("rank_pattern", "alpha_pattern"):
        fields[name] = tuple(tuple(pair) for pair in fields[name])
    return LoraSpec(**fields)
