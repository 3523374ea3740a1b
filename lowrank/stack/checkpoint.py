"""Checkpoints of a stack: the whole :class:`~lowrank.stack.StackedState` (every member's
trainable tree and optimizer state, the masks and scale multipliers) in one orbax step folder,
written and resumed by the single-run :class:`lowrank.train.checkpoint.Checkpointer`, so that a
preempted stack resumes instead of restarting.

Next to the state, each step keeps what the members' results need from the steps before it
(their last train metrics and the first step whose loss was not finite), and the ``meta`` that
a resumed stack must match: each member's config hash and the frozen base's sha256.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import jax

from lowrank import results
from lowrank.train import checkpoint as ckpt_lib

CHECKPOINTS = "checkpoints"


def stack_meta(configs: Sequence[Any], params: Any) -> dict:
    """What a stack's checkpoints are checked against when it resumes: its members' config
    hashes (in order) and the frozen base's sha256.

    >>> import numpy as np
    >>> meta = stack_meta([{"seed": 0}, {"seed": 1}], {"w": np.zeros(2)})
    >>> len(meta["run"]["members"]), len(meta["base"]["sha256"])
    (2, 64)
    """
    return {"run": {"members": [results.config_hash(c) for c in configs]},
            "base": {"sha256": ckpt_lib.fingerprint(params)}}


class StackCheckpoints:
    """Saves and resumes a stack in ``<workdir>/checkpoints``, keeping the last ``keep``.

    >>> import tempfile, numpy as np, jax.numpy as jnp
    >>> ckpt = StackCheckpoints(tempfile.mkdtemp(), [{"seed": 0}], {"w": np.zeros(2)}, keep=2)
    >>> ckpt.restore({"w": jnp.zeros(2)}) is None
    True
    >>> ckpt.save(2, {"w": jnp.ones(2)}, {"last_metrics": [{"loss": 0.5}]})
    >>> state, step, progress = ckpt.restore({"w": jnp.zeros(2)})
    >>> state["w"].tolist(), step, progress["last_metrics"]
    ([1.0, 1.0], 2, [{'loss': 0.5}])
    >>> ckpt.close()
    """

    def __init__(self, workdir: str | pathlib.Path, configs: Sequence[Any], params: Any, *,
                 keep: int = 3):
        self.meta = stack_meta(configs, params)
        self.checkpointer = ckpt_lib.Checkpointer(pathlib.Path(workdir) / CHECKPOINTS,
                                                  keep=keep)

    def restore(self, template: Any) -> tuple[Any, int, dict] | None:
        """``(state, step, progress)`` of the newest checkpoint, or None when there is none;
        ``template`` (the stack's fresh state) gives the structure.

        Raises:
          ValueError: the checkpoints are of a different stack (members or base), named.
        """
        step = self.checkpointer.latest_step()
        if step is None:
            return None
        diffs = ckpt_lib.differences(self.checkpointer.read_meta(step), self.meta)
        if diffs:
            raise ValueError(f"cannot resume the stack from {self.checkpointer.directory} "
                             f"(step {step}): it differs from it:\n  " + "\n  ".join(diffs))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
        state, progress, _ = self.checkpointer.restore(abstract, step)
        return state, step, progress

    def save(self, step: int, state: Any, progress: dict) -> None:
        """Writes checkpoint ``step`` (in the background) with ``progress`` (JSON-ready)."""
        self.checkpointer.save(step, state, config=progress, meta=self.meta)

    def close(self) -> None:
        """Waits for saves in flight."""
        self.checkpointer.close()
