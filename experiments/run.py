"""One experiment run: train, evaluate, and write one row to the results database.

    python experiments/run.py --config=configs/finetune_bbc.py
    python experiments/run.py --config=configs/rank_ablation.py:tiny --config.lora.rank=4 \\
        --config.adapt=all --config.seed=1 --db=workdir/results.sqlite --workdir=workdir/runs

The row holds every config field (flattened), the evaluation metrics (with
``config.eval.select``: the test split's at the best validation point, ``val_*`` the
validation metrics there, ``best_step``, and each test example's scores as JSON in
``predictions``, for paired tests), trainable and base
parameters, bits per base parameter, seconds per step (compilation excluded), peak memory
(the device's peak where JAX reports one, else the process's peak resident memory), seed,
git commit and config hash. A run that raises writes a "failed" row with its traceback.

A run already finished (an "ok" row for the same experiment, config hash and seed) is not run
again: run.py says so and writes nothing; ``--replace`` trains it again from scratch (its old
workdir moved aside, never deleted) and replaces the row.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so configs name their tasks as "configs.tasks:..."
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import common, tasks  # noqa: E402
from lowrank import results, stack  # noqa: E402
from lowrank.assets import cache_dir  # noqa: E402
from lowrank.train import (  # noqa: E402
    distributed,
    evaluate,
    export_adapters,
    make_eval_step,
    make_loss_fn,
    read_jsonl,
    resolve_dtype,
    train,
)
from lowrank.train.checkpoint import fingerprint  # noqa: E402
from lowrank.train.selection import (  # noqa: E402
    BestPoint,
    make_score_step,
    per_example_scores,
)

DEFAULT_DB = ROOT / "workdir" / "results.sqlite"

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line flags (defined only when this file runs as a script, so that tests
    can import it next to sweep.py)."""
    config_flags.DEFINE_config_file("config", None, "configs/x.py[:variant]")
    flags.DEFINE_string("db", str(DEFAULT_DB), "results database (SQLite file)")
    flags.DEFINE_string(
        "workdir", None, "where each run keeps checkpoints and metrics (<workdir>/<experiment>/"
        "<config hash>); default: nothing but the database row is written")
    flags.DEFINE_string(
        "experiment", None, "name the row is filed under (default: the config file's stem)")
    flags.DEFINE_string(
        "stack", None, "a JSON list of override dicts: train those runs of --config together "
        "as one stack (experiments/sweep.py --batch writes it)")
    flags.DEFINE_bool(
        "replace", False, "train a run that already has a finished row again (from scratch) "
        "and replace that row")
    flags.DEFINE_bool(
        "compilation_cache", True, "reuse compiled steps across processes (runs that differ "
        "only in seed compile once)")


def git_commit() -> str:
    """HEAD of the repository this file is in ("unknown" outside git).

    >>> len(git_commit()) in (7, 40) or git_commit() == "unknown"
    True
    """
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def peak_memory_mb() -> float:
    """The device's peak bytes in use where JAX reports it (GPU/TPU), else the peak resident
    memory of this process (CPU: weights, activations and the runtime together).

    >>> peak_memory_mb() > 0
    True
    """
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, after checking the ``--config.<key>`` overrides by name."""
    message = common.unknown_override(argv)
    if message is not None:
        print(f"{Path(argv[0]).name}: error: {message}", file=sys.stderr)
        sys.exit(2)
    return FLAGS(argv)


def _row(config, result, info, start: float, stack_size: int = 1) -> tuple[dict, dict]:
    """The database fields and metrics of one finished run (``stack_size`` runs trained
    together share their step time: each row gets its amortised share)."""
    metrics = {**(result.eval_metrics or {})}
    best = getattr(result, "best", None)
    if best is not None:  # the protocol's numbers: the test split at the best validation point
        metrics = {f"final_val_{k}": v for k, v in metrics.items()}
        metrics.update({f"val_{k}": v for k, v in best.validation.items()})
        metrics.update(best.test or {})
        metrics["best_step"] = best.step
    metrics = {k: v for k, v in metrics.items() if not k.endswith("weight")}
    metrics["train_loss"] = result.metrics.get("loss", _logged_loss(result.workdir))
    metrics["weight_rmse"] = info.weight_rmse
    metrics["quant_bits_per_param"] = info.quant_bits_per_param
    fields = dict(
        trainable_params=tasks.count_trainable(result.trainable),
        base_params=info.base_params,
        bits_per_param=info.bits_per_param,
        # None, not 0, when no step was timed (a run resumed from its final checkpoint).
        step_seconds=(result.loop_seconds / result.timed_steps / stack_size
                      if result.timed_steps else None),
        peak_memory_mb=peak_memory_mb(),
        wall_seconds=(time.perf_counter() - start) / stack_size,
        git_commit=git_commit(),
    )
    scores = best.scores if best is not None else getattr(result, "scores", None)
    if scores is not None:
        fields["predictions"] = json.dumps(scores, separators=(",", ":"))
    return fields, metrics


def _logged_loss(workdir: str | None) -> float:
    """The last training loss in ``workdir``'s metrics log (NaN without one): what a run
    resumed from its final checkpoint reports, having trained no step itself."""
    try:
        losses = [r["train/loss"] for r in read_jsonl(workdir) if "train/loss" in r]
    except (OSError, TypeError, ValueError):
        return math.nan
    return losses[-1] if losses else math.nan


def evaluate_base(config, task) -> types.SimpleNamespace:
    """The evaluation metrics of the task's frozen base as stored (``method="none"``: no
    adapters, nothing trained) and its per-example scores on the evaluation split (each
    window's loss, for paired tests between bases), shaped like the ``TrainResult`` fields
    :func:`_row` reads. Under ``config.eval.select`` with a test split, the test split's
    metrics and scores are reported as a trained run's are (the base is its own best point).
    """
    dtype = resolve_dtype(config.compute_dtype)
    eval_step = jax.jit(make_eval_step(make_loss_fn(task.model, task.forward, task.loss,
                                                    compute_dtype=dtype)))
    score_step = make_score_step(task.model, task.forward, task.loss, compute_dtype=dtype)
    score_step = None if score_step is None else jax.jit(score_step)

    def measure(batches):
        metrics = evaluate(eval_step, {}, task.params, batches())
        scores = (None if score_step is None else
                  per_example_scores(score_step, {}, task.params, batches()))
        return metrics, scores

    metrics, scores = measure(task.eval_batches)
    best = None
    if config.eval.get("select", None) and task.test_batches is not None:
        best = BestPoint(0, metrics, *measure(task.test_batches))
    return types.SimpleNamespace(eval_metrics=metrics, metrics={"loss": math.nan},
                                 trainable={}, loop_seconds=0.0, timed_steps=0, workdir=None,
                                 scores=scores, best=best)


def already_finished(db, config, experiment: str) -> str | None:
    """Why ``config`` need not run (its finished row, in words), or None.

    >>> db = results.ResultsDB(":memory:")
    >>> already_finished(db, {"seed": 0}, "e") is None
    True
    """
    row = db.finished_row(config, experiment)
    if row is None:
        return None
    return (f"{db.path} already holds finished run {row['id']} (experiment {experiment!r}, "
            f"config hash {row['config_hash']}, seed {row['seed']}, finished "
            f"{row['finished_at']}): nothing run or written; --replace trains it again and "
            "replaces that row")


def _move_aside(directory: Path) -> Path | None:
    """Renames ``directory`` to the first free ``<name>.replaced-<n>`` (None if absent)."""
    if not directory.exists():
        return None
    n = 1
    while directory.with_name(f"{directory.name}.replaced-{n}").exists():
        n += 1
    target = directory.with_name(f"{directory.name}.replaced-{n}")
    directory.rename(target)
    return target


def _write_failure(db, config, experiment: str, start: float, error: str) -> None:
    if jax.process_index() != 0:  # a run over several processes: its process 0 writes
        return
    db.write(config, {}, status="failed", experiment=experiment, traceback=error,
             git_commit=git_commit(), wall_seconds=time.perf_counter() - start)


def measure(config, resolved, start: float) -> tuple[dict, dict]:
    """Trains ``resolved`` (``tasks.training_config(config)``, its workdir set) and returns the
    row's fields and metrics, writing no database: what ``run`` writes, and what a sweep's Ray
    worker sends back to the driver (the database's one writer).

    >>> from configs.finetune_bbc import get_config
    >>> fields, metrics = measure(get_config("tiny"), tasks.training_config(get_config("tiny")),
    ...                           time.perf_counter())  # doctest: +SKIP
    """
    distributed.initialize(resolved.get("distributed"))  # before the task touches a device
    task, info = tasks.build(resolved)
    result = evaluate_base(resolved, task) if config.method == "none" else train(resolved, task)
    return _row(config, result, info, start)


def measure_stacked(configs: list, start: float, workdir: str | None = None,
                    export_dirs: list[str | None] | None = None
                    ) -> list[tuple[dict, dict] | str]:
    """Trains compatible ``configs`` as one stack, checkpointing in ``workdir`` (and resuming
    from it) when given, and returns per run its row's fields and metrics, or the error that
    voided it (a string): what ``run_stacked`` writes, writing no database. Each run with a
    directory in ``export_dirs`` has its final adapters exported there, as a run trained alone
    exports them (``lowrank.train.export_adapters``).

    >>> from configs.finetune_bbc import get_config
    >>> rows = measure_stacked([get_config("tiny")] * 2, time.perf_counter())  # doctest: +SKIP
    """
    resolved = [tasks.training_config(c) for c in configs]
    task, info = tasks.build(resolved[0])
    outs = stack.train_stacked(resolved, task, member_keys=tasks.stack_member_keys(configs[0]),
                               workdir=workdir)
    base = {"source": task.source, "sha256": fingerprint(task.params)} if any(
        export_dirs or ()) else None
    for config, out, directory in zip(resolved, outs, export_dirs or [None] * len(outs),
                                      strict=True):
        if directory and not isinstance(out, Exception):
            export_adapters(directory, out.trainable, lora=config.lora.to_dict(), base=base)
    return [f"{type(out).__name__}: {out}" if isinstance(out, Exception)
            else _row(config, out, info, start, stack_size=len(configs))
            for config, out in zip(configs, outs, strict=True)]


def stack_workdir(workdir: str | None, experiment: str, configs: list) -> str | None:
    """Where a stack of ``configs`` keeps its checkpoints: ``<workdir>/<experiment>/stack-<h>``,
    ``h`` a hash of its members' config hashes (so the same stack finds them again).

    >>> stack_workdir("w", "e", [{"seed": 0}]).startswith("w/e/stack-")
    True
    >>> stack_workdir(None, "e", [{"seed": 0}]) is None
    True
    """
    if not workdir:
        return None
    members = results.config_hash({"members": [results.config_hash(c) for c in configs]})
    return str(Path(workdir) / experiment / f"stack-{members}")


def run(config, *, db_path: str | Path, experiment: str, workdir: str | None = None,
        replace: bool = False) -> dict:
    """Trains and evaluates ``config`` and writes its row to ``db_path``; returns the row's
    fields (a failed run writes its traceback and re-raises).

    Raises:
      results.DuplicateRunError: the run already has a finished row (before anything is
        trained or written), unless ``replace``: then it is trained again from scratch, its
        old workdir moved aside to ``<dir>.replaced-<n>``, and its row replaced.

    >>> from configs.finetune_bbc import get_config
    >>> row = run(get_config("tiny"), db_path=":memory:", experiment="t")  # doctest: +SKIP
    """
    start = time.perf_counter()
    db = results.ResultsDB(db_path)
    try:
        finished = already_finished(db, config, experiment)
        if finished and not replace:
            raise results.DuplicateRunError(finished)
        resolved = tasks.training_config(config)
        if workdir:
            resolved.workdir = str(Path(workdir) / experiment / results.config_hash(config))
            if finished:
                _move_aside(Path(resolved.workdir))
        fields, metrics = measure(config, resolved, start)
        if jax.process_index() == 0:  # one row for a run over several processes
            db.write(config, metrics, experiment=experiment, replace=replace, **fields)
        return {"config_hash": results.config_hash(config), **fields, **metrics}
    except results.DuplicateRunError:
        raise
    except Exception:
        _write_failure(db, config, experiment, start, traceback.format_exc())
        raise
    finally:
        db.close()


def run_stacked(configs: list, *, db_path: str | Path, experiment: str,
                workdir: str | None = None, replace: bool = False) -> list[dict]:
    """Trains compatible ``configs`` as one stack (``lowrank.stack``: one compiled program over
    one frozen base) and writes one row per run; a member that fails gets a "failed" row.
    Members that already have a finished row are left out (saying so) unless ``replace``.

    >>> from configs.finetune_bbc import get_config
    >>> two = [get_config("tiny")] * 2
    >>> rows = run_stacked(two, db_path=":memory:", experiment="t")  # doctest: +SKIP
    """
    start = time.perf_counter()
    db = results.ResultsDB(db_path)
    rows = []
    if not replace:
        pending = []
        for config in configs:
            finished = already_finished(db, config, experiment)
            if finished:
                print(f"run.py: {finished}", file=sys.stderr)
            else:
                pending.append(config)
        if not pending:
            db.close()
            return rows
        configs = pending
    try:
        exports = [str(Path(workdir) / experiment / results.config_hash(c) / "adapters")
                   if workdir and c.get("export_adapters", False) else None for c in configs]
        outs = measure_stacked(configs, start, stack_workdir(workdir, experiment, configs),
                               exports)
        for config, out in zip(configs, outs, strict=True):
            if isinstance(out, str):
                _write_failure(db, config, experiment, start, out)
                continue
            fields, metrics = out
            db.write(config, metrics, experiment=experiment, replace=replace, **fields)
            rows.append({"config_hash": results.config_hash(config), **fields, **metrics})
        return rows
    except results.DuplicateRunError:
        raise
    except Exception:
        for config in configs:
            _write_failure(db, config, experiment, start, traceback.format_exc())
        raise
    finally:
        db.close()


def enable_compilation_cache() -> None:
    """Persists compiled programs under the lowrank cache, so a rerun (or another seed of the
    same config) skips compilation."""
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax_compilation_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config=configs/x.py[:variant] is required")
    if FLAGS.compilation_cache:
        enable_compilation_cache()
    spec = FLAGS["config"].config_filename
    experiment = FLAGS.experiment or common.experiment_name(spec)
    if FLAGS.stack:
        try:
            configs = [results.apply_overrides(FLAGS.config, o) for o in json.loads(FLAGS.stack)]
        except (KeyError, ValueError) as e:
            raise app.UsageError(f"--stack: {e}") from None
    try:
        if FLAGS.stack:
            rows = run_stacked(configs, db_path=FLAGS.db, experiment=experiment,
                               workdir=FLAGS.workdir, replace=FLAGS.replace)
        else:
            rows = [run(FLAGS.config, db_path=FLAGS.db, experiment=experiment,
                        workdir=FLAGS.workdir, replace=FLAGS.replace)]
    except results.DuplicateRunError as e:
        print(f"run.py: {e}", file=sys.stderr)
        return
    except results.ResultsDBError as e:
        sys.exit(f"run.py: error: {e}")
    except Exception as e:  # the traceback is in the database's "failed" row
        sys.exit(f"run.py: error: the run failed: {type(e).__name__}: {e} (its traceback is in "
                 f"{FLAGS.db}, status 'failed')")
    for row in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in row.items()}))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    define_flags()
    app.run(main, flags_parser=parse_flags)
