"""A process's share of a global batch: ``Task.train_rows`` gives exactly the rows of
``Task.train_batch`` for every task the project ships, and ``distributed.local_batch`` refuses
rows of the wrong count. (The 2-process run that uses them: tests/test_multiprocess.py.)"""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lowrank.train import distributed, toy
from lowrank.train.parallel import make_mesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import common, tasks  # noqa: E402


def _toy(factory):
    import ml_collections

    return factory(ml_collections.ConfigDict({"batch_size": 8}))


def _bbc_tiny():
    _, config = common.load("configs/finetune_bbc.py:tiny")
    return tasks.build(tasks.training_config(config))[0]


@pytest.mark.parametrize("make", [lambda: _toy(toy.classifier), lambda: _toy(toy.lm), _bbc_tiny],
                         ids=["toy-classifier", "toy-lm", "bbc-tiny"])
def test_train_rows_are_the_rows_of_train_batch(make):
    task = make()
    for seed, step in [(0, 0), (1, 3), (2, 41)]:  # 41: a later epoch of every dataset here
        whole = task.train_batch(seed, step)
        for rows in (slice(0, 4), slice(4, 8), slice(2, 6)):
            part = task.train_rows(seed, step, rows)
            assert sorted(part) == sorted(whole)
            for name in whole:
                np.testing.assert_array_equal(part[name], np.asarray(whole[name])[rows])


def test_local_batch_refuses_rows_of_the_wrong_count():
    sharding = NamedSharding(make_mesh((-1, 1)), P(("data", "fsdp")))
    batch = {"inputs": np.ones((3, 2))}
    with pytest.raises(ValueError, match=r"'inputs' has shape \(3, 2\): this process \(index 0\) "
                                         r"holds rows 0:4 of the global batch of 4"):
        distributed.local_batch(batch, sharding, 4)
    placed = distributed.local_batch({"inputs": np.arange(8.0).reshape(4, 2)}, sharding, 4)
    np.testing.assert_array_equal(jax.device_get(placed["inputs"]),
                                  np.arange(8.0).reshape(4, 2))
