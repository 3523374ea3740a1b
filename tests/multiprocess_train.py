"""One process of a multi-process training run, for tests/test_multiprocess.py:

    python tests/multiprocess_train.py OUT.npz WORKDIR STEPS [PROCESS_ID NUM_PROCESSES PORT]

trains the toy classifier with parallel.mode="mesh" over a (data=2, fsdp=2) mesh (its CPU
devices come from JAX_NUM_CPU_DEVICES) and, on process 0, writes the final trainable leaves
to OUT.npz.
"""

import sys

import jax
import numpy as np

from lowrank.train import default_config, train


def main(out, workdir, steps, *distributed):
    config = default_config()
    config.steps, config.batch_size, config.quiet = int(steps), 16, True
    config.parallel.mode, config.parallel.mesh_shape = "mesh", (2, 2)
    config.checkpoint.every, config.eval.every = 2, 0
    config.workdir = workdir if workdir != "-" else None
    config.log.tensorboard = False
    if distributed:
        process_id, count, port = map(int, distributed)
        config.distributed.enabled = True
        config.distributed.coordinator_address = f"127.0.0.1:{port}"
        config.distributed.num_processes, config.distributed.process_id = count, process_id
    result = train(config)
    if jax.process_index() == 0:
        leaves = jax.tree_util.tree_flatten_with_path(result.state.trainable)[0]
        np.savez(out, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves},
                 start_step=result.start_step, step=int(result.state.step),
                 loss=result.metrics.get("loss", np.nan))


if __name__ == "__main__":
    main(*sys.argv[1:])
