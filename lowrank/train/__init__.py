"""Training LoRA adapters: state, steps (jit, pmap, mesh), checkpoints, metrics, the loop.

>>> from lowrank import train as lt
>>> config = lt.default_config()
>>> config.steps, config.batch_size, config.quiet = 2, 8, True
>>> int(lt.train(config).state.step)
2
"""

from lowrank.train.checkpoint import (
    Checkpointer,
    DamagedCheckpoint,
    NotACheckpointDirectory,
    fingerprint,
)
from lowrank.train.config import default_config, lora_spec
from lowrank.train.evaluate import evaluate
from lowrank.train.export import export_adapters, load_adapters
from lowrank.train.loop import (
    TrainResult,
    adamw_arguments,
    check_config,
    init_state,
    optimizer,
    train,
)
from lowrank.train.losses import classification_loss, lm_loss
from lowrank.train.metrics import MetricsWriter, Progress, read_jsonl
from lowrank.train.parallel import (
    PMAP_AXIS,
    Runner,
    fsdp_shardings,
    jit_runner,
    make_mesh,
    mesh_runner,
    pmap_runner,
)
from lowrank.train.precision import cast_floating, resolve_dtype
from lowrank.train.schedules import make_schedule
from lowrank.train.state import TrainState
from lowrank.train.step import make_eval_step, make_loss_fn, make_train_step
from lowrank.train.stepping import NonFiniteLoss
from lowrank.train.task import Task, default_forward, load_task

__all__ = [
    "PMAP_AXIS",
    "Checkpointer",
    "DamagedCheckpoint",
    "MetricsWriter",
    "NonFiniteLoss",
    "NotACheckpointDirectory",
    "Progress",
    "Runner",
    "Task",
    "TrainResult",
    "TrainState",
    "adamw_arguments",
    "cast_floating",
    "check_config",
    "classification_loss",
    "default_config",
    "default_forward",
    "evaluate",
    "export_adapters",
    "fingerprint",
    "fsdp_shardings",
    "init_state",
    "jit_runner",
    "lm_loss",
    "load_adapters",
    "load_task",
    "lora_spec",
    "make_eval_step",
    "make_loss_fn",
    "make_mesh",
    "make_schedule",
    "make_train_step",
    "mesh_runner",
    "optimizer",
    "pmap_runner",
    "read_jsonl",
    "resolve_dtype",
    "train",
]
