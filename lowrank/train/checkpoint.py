"""Training checkpoints with orbax: the state, the config and what the run was trained on.

A step folder holds three items: ``state`` (trainable tree, optimizer state, step, rng),
``config`` (the run's config as JSON) and ``meta`` (the LoRA settings, the adapter shapes, and
the frozen base's source and sha256). The frozen base itself is never written: a resumed run
must bring the same base, which the hash checks.

A step that cannot be read (a truncated or overwritten file) raises ``DamagedCheckpoint``,
naming the step and the file; :meth:`Checkpointer.set_aside` moves such a step out of the
directory (to ``<directory>.damaged/``, never deleting it) so that the previous one is used.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lowrank import paths
from lowrank.method import is_adapter

FORMAT = "lowrank-train-checkpoint"
ITEMS = ("state", "config", "meta")
_STEP_DIR = re.compile(r"\d+")
_TMP_DIR = re.compile(r".*\d+\.orbax-checkpoint-tmp.*")


class NotACheckpointDirectory(ValueError):
    """The checkpoint path holds something other than lowrank training checkpoints."""


class DamagedCheckpoint(ValueError):
    """Checkpoint ``step`` cannot be read: ``file`` is truncated, overwritten or missing."""

    def __init__(self, step: int, file: pathlib.Path, error: BaseException):
        self.step, self.file = step, file
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        super().__init__(f"checkpoint step {step} is damaged: cannot read {file} ({reason})")


# The JSON files of a step (orbax's own _CHECKPOINT_METADATA is optional to it), and the
# files tensorstore names in its errors about the arrays.
_JSON_FILES = ("config/metadata", "meta/metadata", "state/_METADATA")
_NAMED_FILE = re.compile(r'local file "([^"]+)"')


def damaged_file(step_dir: pathlib.Path, error: BaseException) -> pathlib.Path | None:
    """The file of ``step_dir`` that ``error`` (raised reading it) comes from, or None when
    the error is not about a file (a state that does not fit, say).

    >>> import tempfile
    >>> step = pathlib.Path(tempfile.mkdtemp())
    >>> (step / "meta").mkdir(); _ = (step / "meta" / "metadata").write_text("{")
    >>> damaged_file(step, ValueError("Expecting value")).name
    'metadata'
    """
    for name in _JSON_FILES:
        file = step_dir / name
        if not file.is_file():
            return file
        try:
            json.loads(file.read_bytes())
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            return file
    named = _NAMED_FILE.findall(str(error))
    files = [pathlib.Path(n) for n in named if pathlib.Path(n).is_file()]
    if files:
        return files[-1]  # the innermost: "reading X in database Y: reading file Z"
    return step_dir if named else None


def fingerprint(tree: Any) -> str:
    """sha256 over the structure, paths, dtypes, shapes and bytes of every array of ``tree``,
    in ``jax.tree_util`` path order (stable for nested dicts: their keys are sorted).

    >>> fingerprint({"w": np.zeros(2)}) == fingerprint({"w": np.zeros(2)})
    True
    >>> fingerprint({"w": np.zeros(2)}) == fingerprint({"w": np.ones(2)})
    False
    """
    digest = hashlib.sha256(repr(jax.tree.structure(tree)).encode())
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{paths.path_str(key_path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def adapter_summary(trainable: Mapping) -> dict[str, dict]:
    """What the trainable tree is made of, by path: rank, shapes and scale of each adapter,
    shape of each full-rank leaf (JSON-ready; compared when resuming).

    >>> from lowrank.lora import LoraPair
    >>> adapter_summary({"d": {"kernel": LoraPair(np.ones((4, 2)), np.ones((2, 3)))}})
    {'d/kernel': {'rank': 2, 'a': [4, 2], 'b': [2, 3], 'scale': 1.0}}
    """
    out = {}
    for p, leaf in paths.flatten(trainable).items():
        if is_adapter(leaf):
            out[p] = leaf.summary()
        else:
            out[p] = {"shape": list(np.shape(leaf))}
    return out


def differences(saved: Mapping, current: Mapping) -> list[str]:
    """The ways ``current`` meta differs from ``saved`` meta, one line each.

    >>> differences({"lora": {"rank": 4}}, {"lora": {"rank": 8}})
    ['lora.rank: checkpoint has 4, this run has 8']
    """
    lines = []
    for section in ("lora", "adapters", "base", "run"):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new), key=str):
            if key not in new:
                lines.append(f"{section}.{key}: in the checkpoint, not in this run")
            elif key not in old:
                lines.append(f"{section}.{key}: in this run, not in the checkpoint")
            elif old[key] != new[key]:
                lines.append(f"{section}.{key}: checkpoint has {old[key]!r}, this run has "
                             f"{new[key]!r}")
    return lines


def _check_directory(directory: pathlib.Path) -> None:
    expected = ("expected a directory of orbax step folders (such as 100/), each holding the "
                f"items {', '.join(ITEMS)}")
    if directory.exists() and not directory.is_dir():
        raise NotACheckpointDirectory(f"{directory} is not a checkpoint directory: it is a "
                                      f"file; {expected}")
    if not directory.is_dir():
        return
    foreign = sorted(e.name for e in directory.iterdir()
                     if not (e.is_dir() and (_STEP_DIR.fullmatch(e.name)
                                             or _TMP_DIR.fullmatch(e.name))))
    if foreign:
        raise NotACheckpointDirectory(
            f"{directory} is not a checkpoint directory: it holds {', '.join(foreign[:10])}; "
            + expected
        )
    steps = {int(d.name): d for d in directory.iterdir() if _STEP_DIR.fullmatch(d.name)}
    missing = {s: [i for i in ITEMS if not (d / i).is_dir()] for s, d in steps.items()}
    complete = [s for s, lacks in missing.items() if not lacks]
    for step, lacks in sorted(missing.items()):
        # An older step than a complete one, half gone: orbax was deleting it (keep=K) when
        # the run was killed. It is left for orbax to finish deleting.
        if lacks and not any(c > step for c in complete):
            raise NotACheckpointDirectory(
                f"{steps[step]} is not a lowrank training checkpoint: it lacks "
                f"{', '.join(lacks)}; {expected}"
            )


class Checkpointer:
    """Saves and restores training checkpoints in ``directory``, keeping the last ``keep``.

    Saving costs the caller only a copy of the state to host memory: orbax's own work (files,
    metadata, deleting old steps) runs on a worker thread, one save after another; a failed save
    raises at the next call. In a run over several processes every process saves (orbax's
    rule), in the calling thread. Call :meth:`close` at the end.

    >>> import tempfile, jax.numpy as jnp
    >>> ckpt = Checkpointer(tempfile.mkdtemp() + "/ckpt", keep=2)
    >>> ckpt.save(1, {"w": jnp.ones(2)}, config={"seed": 0}, meta={"lora": {}})
    >>> ckpt.latest_step()
    1
    >>> state, config, meta = ckpt.restore(jax.eval_shape(lambda: {"w": jnp.ones(2)}))
    >>> state["w"].tolist(), config
    ([1.0, 1.0], {'seed': 0})
    >>> ckpt.close()
    """

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"checkpoint keep must be an integer >= 1, got {keep!r}")
        self.directory = pathlib.Path(directory).absolute()
        _check_directory(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "lowrank-checkpoint")
        self._pending: concurrent.futures.Future | None = None

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        self._finish_pending()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete checkpoint's step, oldest first."""
        self._finish_pending()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, *, config: Mapping, meta: Mapping) -> None:
        """Writes checkpoint ``step`` in the background (after any save still in flight)."""
        # Small (adapters and their optimizer state), and orbax then takes about half the time.
        host_state = jax.device_get(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(host_state),
            config=ocp.args.JsonSave(dict(config)),
            meta=ocp.args.JsonSave({"format": FORMAT, **meta}),
        )
        self._finish_pending()
        if jax.process_count() > 1:
            # orbax issues collectives while saving; from a worker thread they could run in a
            # different order than the steps' own on another process, and deadlock.
            self.manager.save(step, args=args, force=True)
            self.manager.wait_until_finished()
            return
        self._pending = self._worker.submit(self.manager.save, step, args=args, force=True)

    def read_meta(self, step: int | None = None) -> dict:
        """The ``meta`` item of checkpoint ``step`` (default: the latest).

        Raises:
          DamagedCheckpoint: a file of the step cannot be read (named).
        """
        step = self._step(step)
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self._read(step, args)["meta"]

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """``(state, config, meta)`` of checkpoint ``step`` (default: the latest).

        ``abstract_state`` (``jax.eval_shape`` of the state's initialisation) gives the tree
        structure and the static fields (``LoraPair.scale``...) that arrays alone do not hold.

        Raises:
          DamagedCheckpoint: a file of the step cannot be read (named).
        """
        step = self._step(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            config=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        got = self._read(step, args)
        return jax.device_put(got["state"]), got["config"], got["meta"]

    def _read(self, step: int, args: Any) -> Any:
        try:
            return self.manager.restore(step, args=args)
        except Exception as e:
            file = damaged_file(self.directory / str(step), e)
            if file is None:
                raise
            raise DamagedCheckpoint(step, file, e) from e

    def set_aside(self, step: int) -> pathlib.Path:
        """Moves step folder ``step`` out of the directory, to
        ``<directory>.damaged/<step>[.<n>]`` (kept for inspection, never deleted), and
        returns where it went; the previous step is then the latest.
        """
        self._finish_pending()
        aside = self.directory.with_name(self.directory.name + ".damaged")
        aside.mkdir(exist_ok=True)
        target, n = aside / str(step), 1
        while target.exists():
            target, n = aside / f"{step}.{n}", n + 1
        (self.directory / str(step)).rename(target)
        self.manager.reload()  # orbax caches the steps it found
        return target

    def wait(self) -> None:
        """Blocks until every save in flight is on disk."""
        self._finish_pending()
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for saves in flight and releases the manager."""
        try:
            self.wait()
        finally:
            self._worker.shutdown()
            self.manager.close()

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises a failed save here

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; steps: {self.all_steps()}"
            )
        return step
