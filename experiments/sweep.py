"""A sweep: every override of the config's ``get_sweep(config)`` times ``--seeds`` seeds, each
run as its own ``experiments/run.py`` process (so its peak memory is its own, and a crash
costs one run).

    python experiments/sweep.py --config=configs/rank_ablation.py --seeds=2
    python experiments/sweep.py --config=configs/quant_ablation.py:tiny --config.steps=5

Runs whose config hash already has a finished row in the database (for this experiment) are
skipped, so an interrupted sweep is resumed by running the same command again. A failing run
is recorded with its traceback and the sweep goes on. ``--config.<key>=<value>`` overrides
apply to every run of the sweep.

``--backend=ray`` sends each pending run (or stack) to a Ray cluster instead
(``experiments/sweep_ray.py``; ``--address=auto|HOST:PORT``, else a private cluster on this
machine), the driver still the database's only writer:

    ray start --head --node-ip-address=127.0.0.1 --port=6379
    python experiments/sweep.py --config=configs/rank_ablation.py --backend=ray \
        --address=127.0.0.1:6379 --cpus_per_run=1 --artifacts=/shared/runs

Workers return each row, its metrics and predictions to the driver; the large files
(checkpoints, exported adapters) go under ``--artifacts`` (another name of ``--workdir``), a
path every node sees, so a retried task resumes from them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from configs import common  # noqa: E402
from lowrank import results  # noqa: E402

RUN = Path(__file__).resolve().with_name("run.py")
DEFAULT_DB = ROOT / "workdir" / "results.sqlite"

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line flags (defined only when this file runs as a script)."""
    flags.DEFINE_string("config", None, "configs/x.py[:variant] with a get_sweep")
    flags.DEFINE_integer("seeds", 1, "seeds 0 .. N-1 of every run of the sweep")
    flags.DEFINE_string("db", str(DEFAULT_DB), "results database (SQLite file)")
    flags.DEFINE_string("workdir", None, "where each run keeps its checkpoints, metrics and "
                        "exported adapters (run.py's --workdir); on Ray a path every node sees "
                        "(also spelt --artifacts)")
    flags.DEFINE_alias("artifacts", "workdir")
    flags.DEFINE_string("experiment", None,
                        "name rows are filed under (default: the config's stem)")
    flags.DEFINE_bool("dry_run", False, "list the runs and whether they are done")
    flags.DEFINE_integer("batch", 1, "train up to this many compatible runs (same model, data "
                         "and schedule) together as one stack (lowrank.stack); each still "
                         "writes its own row")
    flags.DEFINE_enum("backend", "local", ["local", "ray"],
                      "local: one run.py process after another; ray: Ray tasks")
    flags.DEFINE_string("address", None, "(ray) the cluster: HOST:PORT of its head, or 'auto' "
                        "(RAY_ADDRESS, or the cluster `ray start` made here); default: a private "
                        "one on this machine, bound to 127.0.0.1")
    flags.DEFINE_float("cpus_per_run", 1.0, "(ray) CPUs each task declares")
    flags.DEFINE_float("gpus_per_run", 0.0, "(ray) GPUs each task declares")
    flags.DEFINE_integer("max_retries", 3, "(ray) reruns of a task whose worker or node died")
    flags.DEFINE_integer("max_in_flight", None, "(ray) tasks submitted at once (default: as "
                         "many as the cluster's CPUs hold)")
    flags.DEFINE_integer("ray_num_cpus", None, "(ray, no --address) CPUs of the private cluster")


def cli_value(value) -> str:
    """How run.py's ``--config.<key>=`` flag spells ``value``.

    >>> cli_value(True), cli_value(1e-4), cli_value("a|b")
    ('True', '0.0001', 'a|b')
    """
    return repr(value) if isinstance(value, float) else str(value)


def expand(module, config, seeds: int) -> list[dict]:
    """The override dicts of every run: ``get_sweep(config)`` for seed 0, then for seed 1, ...
    (so a sweep cut short has every setting once before any twice).

    >>> import types
    >>> m = types.SimpleNamespace(get_sweep=lambda c: [{"lora.rank": 1}, {"lora.rank": 2}])
    >>> expand(m, None, 2)
    [{'lora.rank': 1, 'seed': 0}, {'lora.rank': 2, 'seed': 0}, {'lora.rank': 1, 'seed': 1}, \
{'lora.rank': 2, 'seed': 1}]
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    return [{**overrides, "seed": seed} for seed in range(seeds)
            for overrides in module.get_sweep(config)]


def _statuses(db: results.ResultsDB, config_hash: str) -> list[str]:
    return [r["status"] for r in db.rows(status=None) if r["config_hash"] == config_hash]


def groups_of(config, pending: list[tuple[dict, str]], batch: int) -> list[list[int]]:
    """Indices of ``pending`` runs grouped into stacks of at most ``batch`` compatible runs
    (one group per run when ``batch`` is 1, and for each run that trains nothing,
    ``method="none"``: it only evaluates its base).

    >>> from configs.common import load
    >>> _, c = load("configs/method_ablation.py:lm_tiny")
    >>> groups_of(c, [({"method": "none", "seed": s}, "") for s in (1, 2)], batch=3)
    [[0], [1]]
    """
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if batch == 1:
        return [[i] for i in range(len(pending))]
    from configs import tasks
    from lowrank import stack

    configs = [results.apply_overrides(config, o) for o, _ in pending]
    trained = [i for i, c in enumerate(configs) if c.get("method", "lora") != "none"]
    groups = stack.group_compatible([tasks.training_config(configs[i]) for i in trained],
                                    max_size=batch, member_keys=tasks.stack_member_keys(config))
    groups = [[trained[j] for j in group] for group in groups]
    groups += [[i] for i in range(len(configs)) if i not in set(trained)]
    return sorted(groups, key=lambda group: group[0])


def sweep(spec: str, base_args: list[str], *, seeds: int, db_path: str, experiment: str,
          workdir: str | None = None, dry_run: bool = False, batch: int = 1,
          ray_options: dict | None = None, runs: list[dict] | None = None) -> dict[str, int]:
    """Runs what is missing of the sweep of ``spec``; returns counts of done, skipped and
    failed runs.

    Args:
      spec: "configs/x.py[:variant]".
      base_args: ``--config.<key>=<value>`` overrides for every run.
      seeds: seeds per run.
      db_path: the results database.
      experiment: rows are filed (and skipped) under this name.
      workdir: passed on to run.py.
      dry_run: only list the runs.
      batch: train up to this many compatible runs together (``lowrank.stack``).
      ray_options: run on Ray (``experiments/sweep_ray.py``) with these keyword arguments
        of ``sweep_ray.run_groups`` (cpus_per_run, gpus_per_run, max_retries,
        max_in_flight) plus ``address`` and ``num_cpus`` for ``sweep_ray.connect``.
      runs: the override dicts to run (each with its ``seed``) instead of the config's
        ``get_sweep`` times ``seeds`` (``experiments/tune.py``'s second phase).
    """
    module, config = common.load(spec)
    if base_args:  # parsed as run.py parses them, so that the hashes agree
        config = parsed_config(spec, base_args)
    runs = expand(module, config, seeds) if runs is None else runs
    db = results.ResultsDB(db_path)
    finished = db.finished_hashes(experiment)
    todo = []
    for overrides in runs:
        h = results.config_hash(results.apply_overrides(config, overrides))
        todo.append((overrides, h, h in finished))
    counts = {"done": 0, "skipped": sum(done for _, _, done in todo), "failed": 0}
    if dry_run:
        for overrides, h, done in todo:
            print(f"{'done' if done else 'todo'}  {h}  {overrides}")
        db.close()
        return counts
    pending = [(o, h) for o, h, done in todo if not done]
    groups = groups_of(config, pending, batch)
    bar = tqdm(total=len(pending), desc=experiment, unit="run", dynamic_ncols=True)
    if ray_options is not None:
        try:
            _sweep_on_ray(groups, pending, config, spec, base_args, experiment, workdir, db,
                          bar, counts, dict(ray_options))
        finally:
            bar.close()
            db.close()
        return counts
    for group in groups:
        members = [pending[i] for i in group]
        bar.set_postfix_str(" | ".join(" ".join(f"{k}={v}" for k, v in o.items())
                                       for o, _ in members))
        args = [sys.executable, str(RUN), f"--config={spec}", *base_args,
                f"--db={db_path}", f"--experiment={experiment}"]
        if len(members) == 1:
            args += [f"--config.{k}={cli_value(v)}" for k, v in members[0][0].items()]
        else:
            args.append(f"--stack={json.dumps([o for o, _ in members])}")
        if workdir:
            args.append(f"--workdir={workdir}")
        before = [len(_statuses(db, h)) for _, h in members]
        start = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        tail = "\n".join(done.stderr.strip().splitlines()[-40:])
        finished_now = db.finished_hashes(experiment)
        for (overrides, h), n_before in zip(members, before, strict=True):
            statuses = _statuses(db, h)
            if h in finished_now:  # by this run.py, or by another sweep meanwhile
                counts["done"] += 1
                continue
            counts["failed"] += 1
            tqdm.write(f"run {overrides} failed (exit {done.returncode}):\n{tail[-2000:]}")
            if len(statuses) == n_before:  # it died before it could record itself
                db.write(results.apply_overrides(config, overrides), {}, status="failed",
                         experiment=experiment, wall_seconds=time.perf_counter() - start,
                         traceback=f"exit status {done.returncode}\n{tail}")
        bar.update(len(members))
    bar.close()
    db.close()
    return counts


def _sweep_on_ray(groups, pending, config, spec, base_args, experiment, workdir, db, bar,
                  counts, options) -> None:
    """Runs ``groups`` as Ray tasks, writing each row here as its task returns."""
    import experiments.sweep_ray as sweep_ray  # only now: Ray is an optional extra

    def on_result(members, rows, running, seconds):
        for overrides, row in zip(members, rows, strict=True):
            run_config = results.apply_overrides(config, overrides)
            try:
                db.write(run_config, row["metrics"], status=row["status"],
                         experiment=experiment, traceback=row["traceback"], **row["fields"])
            except results.DuplicateRunError:  # another sweep finished it meanwhile
                pass
            if row["status"] == "ok":
                counts["done"] += 1
            else:
                counts["failed"] += 1
                tqdm.write(f"run {overrides} failed:\n{row['traceback'][-2000:]}")
        bar.set_postfix_str(f"running={running} finished={counts['done']} "
                            f"failed={counts['failed']}")
        bar.update(len(members))

    sweep_ray.connect(options.pop("address", None), num_cpus=options.pop("num_cpus", None))
    try:
        sweep_ray.check_workers()
        sweep_ray.run_groups([[pending[i][0] for i in g] for g in groups], spec=spec,
                             base_args=base_args, experiment=experiment,
                             workdir=workdir and str(Path(workdir).resolve()),  # workers' cwd
                             on_result=on_result, **options)
    finally:
        sweep_ray.shutdown()


def parsed_config(spec: str, base_args: list[str]):
    """The config of ``spec`` with ``--config.<key>=<value>`` overrides, parsed by the same
    flags machinery as run.py."""
    from ml_collections import config_flags

    holder = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=holder)
    holder(["sweep", f"--config={spec}", *base_args])
    return holder.config


def run_cli(argv: list[str], run: Callable[..., dict[str, int]], name: str = "sweep.py") -> None:
    """The command line of ``sweep.py`` (and ``tune.py``, which shares its flags): checks the
    flags, calls ``run(spec, BASE_ARGS, seeds=, db_path=, experiment=, workdir=, dry_run=,
    batch=, ray_options=)``, prints the counts, and turns named bad input into one line."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config=configs/x.py[:variant] is required")
    experiment = FLAGS.experiment or common.experiment_name(FLAGS.config)
    ray_options = None
    if FLAGS.backend == "ray":
        ray_options = dict(address=FLAGS.address, num_cpus=FLAGS.ray_num_cpus,
                           cpus_per_run=FLAGS.cpus_per_run, gpus_per_run=FLAGS.gpus_per_run,
                           max_retries=FLAGS.max_retries, max_in_flight=FLAGS.max_in_flight)
    elif FLAGS.address is not None:
        raise app.UsageError("--address is for --backend=ray")
    try:
        counts = run(FLAGS.config, BASE_ARGS, seeds=FLAGS.seeds, db_path=FLAGS.db,
                     experiment=experiment, workdir=FLAGS.workdir, dry_run=FLAGS.dry_run,
                     batch=FLAGS.batch, ray_options=ray_options)
    except (OSError, ValueError, KeyError, results.ResultsDBError) as e:  # named bad input
        sys.exit(f"{name}: error: {e}")
    except ImportError as e:
        if e.name != "ray":
            raise
        sys.exit(f"{name}: error: --backend=ray needs Ray: pip install -e '.[ray]'")
    except RuntimeError as e:  # sweep_ray.RayBackendError, without importing it (nor Ray)
        if type(e).__name__ != "RayBackendError":
            raise
        sys.exit(f"{name}: error: {e}")
    print(f"{experiment}: {counts['done']} run, {counts['skipped']} already done, "
          f"{counts['failed']} failed")
    if counts["failed"]:
        sys.exit(1)


def main(argv: list[str]) -> None:
    run_cli(argv, sweep)


BASE_ARGS: list[str] = []


def split_argv(argv: list[str]) -> list[str]:
    """Takes the ``--config.<key>=<value>`` overrides out of ``argv`` (into ``BASE_ARGS``)
    and checks their keys; returns what absl should parse."""
    overrides = [a for a in argv if a.startswith("--config.")]
    spec = next((a for a in argv if a.startswith("--config=")), None)
    message = common.unknown_override([argv[0], *([spec] if spec else []), *overrides])
    if message is not None:
        print(f"{Path(argv[0]).name}: error: {message}", file=sys.stderr)
        sys.exit(2)
    BASE_ARGS[:] = overrides
    return FLAGS([a for a in argv if not a.startswith("--config.")])


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=split_argv)
