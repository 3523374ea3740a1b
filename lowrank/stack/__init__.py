"""Many adapters in one compiled program: K LoRA runs trained together over one frozen base.

The members' trainable trees and optimizer states are stacked along a leading axis and the
single-run step is ``jax.vmap``-ed over them, with the frozen (possibly quantized) base and
the batch broadcast. Members may differ in rank (zero-padded to the largest, with a mask),
targets and trained leaves (masked), alpha (a per-member multiplier), seed, learning rate and
schedule, weight decay and Adam's constants; each member's result equals that of its own run.

>>> from lowrank import stack
>>> from lowrank.train import default_config
>>> configs = [default_config() for _ in range(3)]
>>> for config, rank in zip(configs, (1, 4, 8)):
...     config.steps, config.batch_size, config.quiet, config.lora.rank = 2, 8, True, rank
>>> stack.group_compatible(configs)
[[0, 1, 2]]
>>> results = stack.train_stacked(configs)
>>> [r.trainable["hidden_0"]["kernel"].rank for r in results]
[1, 4, 8]
"""

from lowrank.stack.layout import StackedState, member_state, stack_states, unstack_states
from lowrank.stack.runs import (
    MEMBER_KEYS,
    check_compatible,
    group_compatible,
    shared_fields,
    train_stacked,
    unstackable,
)
from lowrank.stack.step import (
    make_stacked_eval_step,
    make_stacked_train_step,
    masked_updates,
    member_loss_fn,
    with_multipliers,
)
from lowrank.train.loop import adamw_arguments  # kept here too: stacks are built with it

__all__ = [
    "MEMBER_KEYS",
    "StackedState",
    "adamw_arguments",
    "check_compatible",
    "group_compatible",
    "make_stacked_eval_step",
    "make_stacked_train_step",
    "masked_updates",
    "member_loss_fn",
    "member_state",
    "shared_fields",
    "stack_states",
    "train_stacked",
    "unstack_states",
    "unstackable",
    "with_multipliers",
]
