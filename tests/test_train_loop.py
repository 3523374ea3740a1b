"""train(config): metrics, progress, checkpoints, exact resume after SIGKILL, and bad input."""

import dataclasses
import math
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

import lowrank as lr
from lowrank import train as lt
from lowrank.train import toy

TASK = toy.classifier(ml_collections.ConfigDict({"batch_size": 16}))


def _config(workdir=None, steps=6, **lora):
    config = lt.default_config()
    config.steps, config.batch_size, config.quiet = steps, 16, True
    config.workdir = None if workdir is None else str(workdir)
    config.lora.rank, config.lora.targets = 2, r"hidden_\d+/kernel"
    config.lora.trainable = "head/bias"
    config.optimizer.learning_rate = 0.02
    for key, value in lora.items():
        config.lora[key] = value
    return config


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _tensorboard_scalars(directory: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files (TFRecords of Event protos), read back without TF."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_train_logs_checkpoints_evaluates_and_exports(tmp_path, capsys):
    config = _config(tmp_path, steps=20)
    config.quiet = False
    config.checkpoint.every, config.checkpoint.keep, config.eval.every = 5, 2, 10
    result = lt.train(config, TASK)
    assert int(result.state.step) == 20 and result.start_step == 0

    records = lt.read_jsonl(tmp_path)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    for key in ("train/learning_rate", "train/grad_norm", "train/examples_per_second"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert train[0]["train/learning_rate"] == pytest.approx(0.02)
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and evals[-1]["eval/weight"] == 64
    tensorboard = _tensorboard_scalars(tmp_path / "tensorboard")
    assert [step for step, _ in tensorboard["train/loss"]] == list(range(1, 21))
    np.testing.assert_allclose([v for _, v in tensorboard["train/loss"]],
                               [r["train/loss"] for r in train], rtol=1e-6)
    assert [step for step, _ in tensorboard["eval/accuracy"]] == [10, 20]

    # the adapters learned: eval loss is below that of the untrained adapters (= the base)
    untrained = lr.init_adapters(jax.random.key(0), TASK.params, lt.lora_spec(config.lora))
    loss_fn = lt.make_loss_fn(TASK.model, TASK.forward, TASK.loss)
    eval_step = jax.jit(lt.make_eval_step(loss_fn))
    before = lt.evaluate(eval_step, untrained, TASK.params, TASK.eval_batches())
    assert result.eval_metrics["loss"] < before["loss"] - 0.05

    checkpointer = lt.Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.all_steps() == [15, 20]  # every 5, the last 2 kept
    meta = checkpointer.read_meta()
    checkpointer.close()
    assert meta["base"]["sha256"] == lt.fingerprint(TASK.params)
    assert meta["base"]["source"].startswith("lowrank.train.toy:classifier(")
    assert meta["adapters"]["hidden_0/kernel"]["rank"] == 2
    assert not any(p.name == "frozen" for p in (tmp_path / "checkpoints").rglob("*"))

    exported = lt.load_adapters(tmp_path / "adapters")
    assert jax.tree.structure(exported) == jax.tree.structure(result.trainable)
    assert _leaves_equal(exported, result.trainable)

    err = capsys.readouterr().err
    assert "20/20" in err and "loss=" in err and "ex/s" in err

    # a finished run resumes to itself: nothing is trained again
    again = lt.train(_config(tmp_path, steps=20), TASK)
    assert again.start_step == 20 and _leaves_equal(again.trainable, result.trainable)


def test_lm_task_reports_perplexity_and_tokens_per_second_quietly(capsys):
    config = _config(steps=3)
    config.lora.targets, config.lora.trainable = r"hidden_\d+/kernel", None
    task = toy.lm(ml_collections.ConfigDict({"batch_size": 16}))
    result = lt.train(config, task)
    assert result.eval_metrics["perplexity"] == pytest.approx(math.exp(result.eval_metrics["loss"]))
    assert result.metrics["weight"] == 16 * 8  # target tokens per step
    assert result.metrics["tokens_per_second"] == pytest.approx(
        result.metrics["weight"] / result.metrics["step_seconds"])
    assert capsys.readouterr().err == ""  # quiet: no progress bar


def test_resuming_with_different_lora_settings_or_base_names_the_difference(tmp_path):
    lt.train(_config(tmp_path, steps=2), TASK)
    with pytest.raises(ValueError, match=r"lora\.rank: checkpoint has 2, this run has 4"):
        lt.train(_config(tmp_path, steps=4, rank=4), TASK)
    with pytest.raises(ValueError, match=r"lora\.targets: checkpoint has 'hidden_\\\\d\+/kernel"):
        lt.train(_config(tmp_path, steps=4, targets=r"hidden_0/kernel"), TASK)
    other_base = dataclasses.replace(TASK, params=jax.tree.map(lambda x: x + 1, TASK.params))
    with pytest.raises(ValueError, match=r"base\.sha256: checkpoint has"):
        lt.train(_config(tmp_path, steps=4), other_base)
    changed_seed = _config(tmp_path, steps=4)
    changed_seed.seed = 1
    with pytest.raises(ValueError, match=r"run\.seed: checkpoint has 0, this run has 1"):
        lt.train(changed_seed, TASK)
    config = _config(tmp_path, steps=4)
    config.checkpoint.resume = False
    with pytest.raises(ValueError, match="holds checkpoints and config.checkpoint.resume is False"):
        lt.train(config, TASK)
    assert lt.train(_config(tmp_path, steps=4), TASK).start_step == 2  # the same run goes on


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    def batch(seed, step):
        b = TASK.train_batch(seed, step)
        return {**b, "inputs": b["inputs"] * np.float32("nan")} if step == 5 else b

    config = _config(tmp_path, steps=10)
    config.checkpoint.every = 2
    with pytest.raises(lt.NonFiniteLoss, match=r"loss is nan at step 6 .*last good checkpoint "
                                               r"is step 4"):
        lt.train(config, dataclasses.replace(TASK, train_batch=batch))
    checkpointer = lt.Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.all_steps() == [2, 4]
    abstract = jax.eval_shape(lambda: lt.init_state(config, TASK))
    state, _, _ = checkpointer.restore(abstract)
    checkpointer.close()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
    assert all(math.isfinite(r["train/loss"]) for r in lt.read_jsonl(tmp_path))


def test_a_checkpoint_directory_that_is_not_one_is_refused(tmp_path):
    as_file = tmp_path / "a"
    as_file.mkdir()
    (as_file / "checkpoints").write_text("not a directory")
    with pytest.raises(lt.NotACheckpointDirectory,
                       match=rf"{re.escape(str(as_file / 'checkpoints'))} is not a checkpoint "
                             r"directory: it is a file; expected a directory of orbax step"):
        lt.train(_config(as_file), TASK)
    foreign = tmp_path / "b" / "checkpoints"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("")
    with pytest.raises(lt.NotACheckpointDirectory, match=r"it holds notes\.txt; expected"):
        lt.train(_config(tmp_path / "b"), TASK)
    partial = tmp_path / "c" / "checkpoints" / "5"
    (partial / "state").mkdir(parents=True)
    with pytest.raises(lt.NotACheckpointDirectory,
                       match=r"5 is not a lowrank training checkpoint: it lacks config, meta"):
        lt.train(_config(tmp_path / "c"), TASK)


def test_bad_config_values_are_named():
    config = lt.default_config()
    with pytest.raises(AttributeError, match="rnak"):
        config.lora.rnak = 4
    config = _config()
    config.micro_batches = 3
    with pytest.raises(ValueError, match="batch_size 16 does not split into config.micro_batches"):
        lt.train(config, TASK)
    config = _config()
    config.parallel.mode = "threads"
    with pytest.raises(ValueError, match=r"'threads' is not one of \('jit', 'pmap', 'mesh'\)"):
        lt.train(config, TASK)
    config = _config()
    config.task = "lowrank.train.toy.classifier"
    with pytest.raises(ValueError, match="not an import path: expected 'package.module:function'"):
        lt.train(config)
    config = _config()
    config.compute_dtype = "float8"
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        lt.train(config, TASK)
    short = dataclasses.replace(TASK, train_batch=lambda seed, step: TASK.train_batch(seed, 0)
                                and {k: v[:8] for k, v in TASK.train_batch(seed, step).items()})
    with pytest.raises(ValueError, match=r"'inputs' has shape \(8, 16\): expected a leading axis "
                                         r"of config.batch_size = 16"):
        lt.train(_config(), short)


def test_adamw_arguments_map_every_optimizer_field_but_the_schedule():
    """One mapping of config.optimizer for single runs and stacks: a field added to the config
    but not to it would be silently ignored by both."""
    from lowrank import stack

    assert stack.adamw_arguments is lt.adamw_arguments
    schedule_fields = {"learning_rate", "schedule", "warmup_steps", "end_learning_rate"}
    config = lt.default_config()
    changed = {"weight_decay": 0.1, "loraplus_ratio": 4.0, "clip_norm": 0.5, "b1": 0.8,
               "b2": 0.95, "eps": 1e-6, "lr_multipliers": (("head/.*", 10.0),)}
    assert set(config.optimizer) - schedule_fields == set(changed)
    for name, value in changed.items():
        config.optimizer[name] = value
    assert lt.adamw_arguments(config, 0.25) == {"learning_rate": 0.25, **changed}


# --- a run killed with SIGKILL and resumed equals one that never stopped ---------------------

KILL_STEPS = 40


def kill_config(workdir):
    config = _config(workdir, steps=KILL_STEPS)
    config.checkpoint.every, config.checkpoint.keep = 4, 3
    config.lora.dropout = 0.1  # the per-step PRNG stream must resume exactly too
    return config


KILL_SCRIPT = """
import dataclasses, sys, time
sys.path.insert(0, sys.argv[2])
from test_train_loop import TASK, kill_config
from lowrank import train as lt

def slow_batch(seed, step):  # slow enough to be killed in the middle
    time.sleep(0.05)
    return TASK.train_batch(seed, step)

task = dataclasses.replace(TASK, train_batch=slow_batch, eval_batches=None)
lt.train(kill_config(sys.argv[1]), task)
"""


def _checkpoint_steps(directory: pathlib.Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_a_run_killed_with_sigkill_resumes_bit_identical(tmp_path):
    workdir = tmp_path / "run"
    tests_dir = str(pathlib.Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(workdir), tests_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while max(_checkpoint_steps(workdir / "checkpoints"), default=0) < 8:
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_checkpoint_steps(workdir / "checkpoints"))
    assert 8 <= killed_at < KILL_STEPS

    task = dataclasses.replace(TASK, eval_batches=None)
    resumed = lt.train(kill_config(workdir), task)
    assert resumed.start_step == killed_at and int(resumed.state.step) == KILL_STEPS
    uninterrupted = lt.train(kill_config(None), task)
    assert _leaves_equal(resumed.trainable, uninterrupted.trainable)
    assert _leaves_equal(resumed.state.opt_state, uninterrupted.state.opt_state)
    steps = [r["step"] for r in lt.read_jsonl(workdir) if "train/loss" in r]
    assert steps == list(range(1, KILL_STEPS + 1))  # logs read as one run's
