"""Per-step metrics to a JSONL file and TensorBoard event files, and the progress bar."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping

from tensorboardX import SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary
from tqdm import tqdm  # not tqdm.auto: no ipywidgets needed in notebooks

JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def _drop_after(path: pathlib.Path, step: int) -> None:
    # A run killed after its last checkpoint logged steps that the resumed run logs again,
    # and perhaps half a line.
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and record.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(kept))


class MetricsWriter:
    """Appends ``{"step": s, **scalars}`` per record to ``<directory>/metrics.jsonl`` and
    writes the same scalars to TensorBoard under ``<directory>/tensorboard``.

    ``start_step``: records after it (left by a run killed after its last checkpoint) are
    dropped, so a resumed run's logs read as one run's. Call :meth:`flush` when saving a
    checkpoint, so that a killed run's logs reach at least its last checkpoint.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with MetricsWriter(d) as writer:
    ...     writer.write(1, {"loss": 0.5}, prefix="train/")
    >>> open(d + "/metrics.jsonl").read()
    '{"step": 1, "train/loss": 0.5}\\n'
    """

    def __init__(
        self, directory: str | pathlib.Path, *, start_step: int = 0, tensorboard: bool = True
    ):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / JSONL
        # Also at step 0: a run killed before its first checkpoint left records too.
        earlier = path.exists()
        if earlier:
            _drop_after(path, start_step)
        self._jsonl = path.open("a")
        self._tb = None
        if tensorboard:
            self._tb = SummaryWriter(str(self.directory / TENSORBOARD),
                                     purge_step=start_step + 1 if earlier else None)

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        """Records ``scalars`` (plain numbers) at ``step``."""
        record = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        if self._tb is not None:
            # One event holding every scalar: 5x cheaper than an add_scalar call per name.
            values = [Summary.Value(tag=name, simple_value=value) for name, value in record.items()]
            self._tb.file_writer.add_summary(Summary(value=values), step)

    def flush(self) -> None:
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_jsonl(directory: str | pathlib.Path) -> list[dict]:
    """The records of ``<directory>/metrics.jsonl``, in order.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with MetricsWriter(d, tensorboard=False) as w:
    ...     w.write(3, {"loss": 1.0})
    >>> read_jsonl(d)
    [{'step': 3, 'loss': 1.0}]
    """
    text = (pathlib.Path(directory) / JSONL).read_text()
    return [json.loads(line) for line in text.splitlines()]


class Progress:
    """A tqdm bar over steps showing loss and throughput (its ETA comes with tqdm); silent
    when ``quiet`` (sweeps).

    >>> with Progress(total=10, initial=0, quiet=True) as bar:
    ...     bar.update(1, {"loss": 0.5, "examples_per_second": 100.0})
    """

    def __init__(self, total: int, initial: int = 0, *, quiet: bool = False, unit: str = "step"):
        self._bar = tqdm(total=total, initial=initial, disable=quiet, unit=unit,
                         dynamic_ncols=True, mininterval=0.5)

    def update(self, steps: int, metrics: Mapping[str, float] | None = None) -> None:
        """Advances the bar by ``steps`` and shows the latest loss and throughput."""
        if metrics and not self._bar.disable:
            shown = {}
            if "loss" in metrics and math.isfinite(metrics["loss"]):
                shown["loss"] = f"{metrics['loss']:.4g}"
            for key, label in (("tokens_per_second", "tok/s"), ("examples_per_second", "ex/s")):
                if key in metrics:
                    shown[label] = f"{metrics[key]:.4g}"
                    break
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
