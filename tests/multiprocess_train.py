"""One process of a multi-process training run, for tests/test_multiprocess.py:

    python tests/multiprocess_train.py OUT.npz WORKDIR STEPS [PROCESS_ID NUM_PROCESSES PORT]

trains the toy classifier with parallel.mode="mesh" over a (data=2, fsdp=2) mesh (its CPU
devices come from JAX_NUM_CPU_DEVICES), checkpointing every 2 steps in WORKDIR ("-": none),
and, on process 0, writes the final state's leaves to OUT.npz. With PARK_AT_STEP=k set, each
process, asked for the batch of step k, waits for a checkpoint on disk, prints PARKED and
sleeps (to be killed); TIMEOUT_S sets config.distributed.timeout_s. Each process prints the
rows of the global batch it asked the task for (``Task.train_rows``; none in one process).
"""

import dataclasses
import os
import pathlib
import sys
import time

import jax
import numpy as np

from lowrank.train import default_config, distributed, toy, train

ROWS_ASKED = set()  # the (start, stop) rows this process asked the task for


def _parked_at(task, step, checkpoints):
    def park(i):
        if i == step:  # wait, once a checkpoint is on disk, for the test to kill us
            deadline = time.time() + 120
            while time.time() < deadline and not any(
                    d.name.isdigit() for d in checkpoints.glob("*")):
                time.sleep(0.1)
            print("PARKED", flush=True)
            time.sleep(600)

    def train_batch(seed, i):
        park(i)
        return task.train_batch(seed, i)

    def train_rows(seed, i, rows):
        park(i)
        ROWS_ASKED.add((rows.start, rows.stop))
        return task.train_rows(seed, i, rows)

    return dataclasses.replace(task, train_batch=train_batch, train_rows=train_rows)


def main(out, workdir, steps, *setup):
    config = default_config()
    config.steps, config.batch_size, config.quiet = int(steps), 16, True
    config.parallel.mode, config.parallel.mesh_shape = "mesh", (2, 2)
    config.checkpoint.every, config.eval.every = 2, 0
    config.workdir = workdir if workdir != "-" else None
    config.log.tensorboard = False
    if setup:
        process_id, count, port = map(int, setup)
        config.distributed.enabled = True
        config.distributed.coordinator_address = f"127.0.0.1:{port}"
        config.distributed.num_processes, config.distributed.process_id = count, process_id
        config.distributed.timeout_s = int(os.environ.get("TIMEOUT_S", 120))
    distributed.initialize(config.distributed)  # before the task touches a device
    park_at = int(os.environ.get("PARK_AT_STEP", -1))
    task = _parked_at(toy.classifier(config), park_at, pathlib.Path(workdir) / "checkpoints")
    result = train(config, task)
    print("ROWS", jax.process_index(), sorted(ROWS_ASKED), flush=True)
    if jax.process_index() == 0:
        leaves = jax.tree_util.tree_flatten_with_path(result.state)[0]
        np.savez(out, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves},
                 start_step=result.start_step, step=int(result.state.step),
                 loss=result.metrics.get("loss", np.nan))


if __name__ == "__main__":
    main(*sys.argv[1:])
