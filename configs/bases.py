"""The frozen base of a task, as the config stores it: compressed to low rank
(``config.compress``) and/or quantized (``config.quant``), with the facts about it
(:class:`BaseInfo`) that the results database keeps. Shared by the task factories of
``configs/bbc_task.py`` and ``configs/lm_task.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lowrank as lr
from configs.common import QUANT_TARGETS
from lowrank import compression, quant
from lowrank import frozen as frozen_leaves
from lowrank.train import Task

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


def count_trainable(trainable: Any) -> int:
    """Parameters of a trainable tree (both factors of each adapter, every full-rank leaf).

    >>> count_trainable({"head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}})
    9
    """
    return sum(int(np.size(x)) for x in jax.tree.leaves(trainable))


def quant_spec(config: Any, family: str) -> quant.QuantSpec | None:
    q = config.quant
    if q.fmt == "none":
        return None
    return quant.QuantSpec(q.fmt, block_size=q.block_size, double_quant=q.double_quant,
                           targets=QUANT_TARGETS[family])


def for_loftq(task: Task, params: dict, config: Any, family: str) -> Task:
    """With ``lora.init="loftq"`` the run quantizes the float base itself (LoftQ fits the
    adapters to that quantization's error): the task keeps the float params and says how to
    quantize them. (The base's statistics stay those of plain quantization.)"""
    spec = quant_spec(config, family)
    if config.lora.init != "loftq" or spec is None:
        return task
    return dataclasses.replace(task, params=params, quant=spec, seeded_params=None)


def stored_base(params: dict, config: Any, family: str,
              calibration: Any = None) -> tuple[dict, BaseInfo]:
    spec = quant_spec(config, family)
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
