"""The step loop of ``train``: dispatch steps, read their metrics in chunks, log, checkpoint,
evaluate.

The host reads metrics a chunk at a time (every ``FETCH_EVERY`` steps, always leaving the
newest step in flight), each step's metrics packed into one vector, so that it rarely waits
for the device and spends little time per step; at a checkpoint it reads everything first, so
a step is saved only once its loss is known to be finite.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from lowrank.train.evaluate import evaluate

FETCH_EVERY = 10


class NonFiniteLoss(FloatingPointError):
    """Training stopped on a NaN or infinite loss; the checkpoints hold only finite steps."""


def pack_metrics(train_step):
    """``train_step`` returning its metrics as one float32 vector (one transfer to read), and
    the list that receives their names (in vector order) when the step is traced.

    >>> step, names = pack_metrics(lambda s, f, b: (s, {"loss": jnp.float32(2.0)}))
    >>> step(0, None, None)[1].tolist(), names
    ([2.0], ['loss'])
    """
    names: list[str] = []

    def packed(state, frozen, batch):
        state, metrics = train_step(state, frozen, batch)
        names[:] = sorted(metrics)  # fixed at trace time, like the vector's layout
        return state, jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in names])

    return packed, names


class StepLoop:
    """Runs steps ``start .. config.steps - 1`` on a runner whose step packs its metrics,
    checkpointing every ``config.checkpoint.every`` steps and after the last."""

    def __init__(self, config, task, runner, metric_names, *, checkpointer, writer, progress,
                 meta, start, selector=None):
        self.config, self.task, self.runner = config, task, runner
        self.metric_names = metric_names
        self.checkpointer, self.writer, self.progress = checkpointer, writer, progress
        self.meta, self.start, self.selector = meta, start, selector
        self.config_json = json.loads(config.to_json_best_effort())
        self.last_metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] | None = None
        self.loop_seconds = self.loop_cpu_seconds = 0.0
        self._first_read = None  # when the first step's metrics arrived (compile included)
        self._last_read = None
        self._cpu_at_first_read = self._cpu_at_last_read = 0.0

    def run(self, placed, frozen, eval_step):
        config, runner = self.config, self.runner
        every = config.checkpoint.every if self.checkpointer is not None else 0
        pending: list[tuple[int, Any]] = []
        self._last_read = time.perf_counter()
        for i in range(self.start, config.steps):
            placed, metrics = runner.step(placed, frozen, self._batch(i))
            pending.append((i + 1, metrics))
            done = i + 1
            save = every and (done % every == 0 or done == config.steps)
            run_eval = config.eval.every and done % config.eval.every == 0
            if save or run_eval or done == config.steps:
                self._read(pending)
                pending = []
            elif len(pending) > (FETCH_EVERY if self._first_read is not None else 1):
                self._read(pending[:-1])  # the newest step keeps the device busy meanwhile
                pending = pending[-1:]
            if save:
                self.checkpointer.save(done, runner.host_state(placed),
                                       config=self.config_json, meta=self.meta)
                if self.writer is not None:
                    self.writer.flush()
            if run_eval:
                self._evaluate(placed, frozen, eval_step, done)
        if self._first_read is not None:
            self.loop_seconds = self._last_read - self._first_read
            self.loop_cpu_seconds = self._cpu_at_last_read - self._cpu_at_first_read
        if self.task.eval_batches is not None and (
            not config.eval.every or config.steps % config.eval.every
        ):
            self._evaluate(placed, frozen, eval_step, config.steps)
        return placed

    def _batch(self, i: int):
        """Batch ``i`` placed on the devices; in a multi-process run, from this process's
        rows alone when the task can build them (``Task.train_rows``)."""
        config, task, runner = self.config, self.task, self.runner
        if runner.local_rows is None or task.train_rows is None:
            batch = task.train_batch(config.seed, i)
            if i == self.start:
                _check_batch(batch, config.batch_size, i)
            return runner.place_batch(batch)
        rows = runner.local_rows(config.batch_size)
        batch = task.train_rows(config.seed, i, rows)
        if i == self.start:
            _check_batch(batch, rows.stop - rows.start, i, f"train_rows(seed, {i}, {rows})")
        return runner.place_local_batch(batch, config.batch_size)

    def _read(self, chunk: list[tuple[int, Any]]) -> None:
        vectors = jax.device_get([self.runner.host_metrics(m) for _, m in chunk])
        now, cpu = time.perf_counter(), time.process_time()
        seconds = (now - self._last_read) / len(chunk)
        self._last_read, self._cpu_at_last_read = now, cpu
        if self._first_read is None:
            self._first_read, self._cpu_at_first_read = now, cpu
        for (step, _), vector in zip(chunk, vectors, strict=True):
            metrics = dict(zip(self.metric_names, map(float, vector), strict=True))
            if not math.isfinite(metrics["loss"]):
                self._stop_on_non_finite(step, metrics["loss"])
            metrics["step_seconds"] = seconds
            metrics["examples_per_second"] = self.config.batch_size / seconds
            if self.task.loss == "lm" and "weight" in metrics:
                metrics["tokens_per_second"] = metrics["weight"] / seconds
            if self.writer is not None and (step % self.config.log.every == 0
                                            or step == self.config.steps):
                self.writer.write(step, metrics, prefix="train/")
            self.last_metrics = metrics
        self.progress.update(len(chunk), self.last_metrics)

    def _stop_on_non_finite(self, step: int, loss: float) -> None:
        where = "no checkpoint was written (config.workdir is None)"
        if self.checkpointer is not None:
            self.checkpointer.wait()
            last = self.checkpointer.latest_step()
            where = (f"the last good checkpoint is step {last} in {self.checkpointer.directory}"
                     if last is not None else
                     f"no checkpoint was written before it in {self.checkpointer.directory}")
        raise NonFiniteLoss(
            f"the training loss is {loss} at step {step} (computed on the batch of step "
            f"{step - 1}): training stopped; {where}. Try a lower learning rate, gradient "
            "clipping (optimizer.clip_norm), or check that batch"
        )

    def _evaluate(self, placed, frozen, eval_step, step: int) -> None:
        if self.task.eval_batches is None:
            return
        trainable, frozen_view = self.runner.eval_view(placed, frozen)
        self.eval_metrics = evaluate(eval_step, trainable, frozen_view, self.task.eval_batches())
        if self.writer is not None:
            self.writer.write(step, self.eval_metrics, prefix="eval/")
        if self.selector is not None and self.selector.observe(
                step, self.eval_metrics, eval_step, trainable, frozen_view):
            best = self.selector.best
            if self.writer is not None and best.test is not None:
                self.writer.write(step, best.test, prefix="test/")


def _check_batch(batch, batch_size: int, step: int, call: str | None = None) -> None:
    for name, value in batch.items():
        shape = jnp.shape(value)
        if not shape or shape[0] != batch_size:
            expected = ("config.batch_size" if call is None else "its rows' count")
            raise ValueError(
                f"task.{call or f'train_batch(seed, {step})'} entry {name!r} has shape "
                f"{shape}: expected a leading axis of {expected} = {batch_size}"
            )
