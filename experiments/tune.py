"""A sweep under the results protocol: tune each setting's learning rate on the validation
split at seed 0, then run the other seeds at the chosen rate.

    python experiments/tune.py --config=configs/rank_ablation.py --seeds=3
    python experiments/tune.py --config=configs/rank_ablation.py:tiny --seeds=2 --dry_run
    python experiments/tune.py --config=configs/rank_ablation.py --seeds=3 --backend=ray \\
        --address=auto                                # both phases on a Ray cluster

Phase 1 is ``sweep.py --seeds=1`` over the config's whole grid (every learning rate of
``config.sweep.learning_rates``); phase 2 picks, per setting, the rate whose seed-0 run has the
best validation metric (``lowrank.tuning.choose``) and runs seeds 1 .. N-1 of it only. A config
with ``sweep.tune_rank`` tunes at that rank only: phase 1 runs the grid's LoRA runs at that rank
(and every run without a rank of its own, the baselines), phase 2 every seed of every rank at
the rate its rank family chose. Both phases skip what the database already holds, so rerunning
the command resumes it.
``experiments/report.py`` makes the same choice from the rows when it builds the tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "experiments"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import sweep as sweep_lib  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import common  # noqa: E402
from lowrank import results, tuning  # noqa: E402

FLAGS = flags.FLAGS


def _loaded(spec: str, base_args: list[str]):
    module, config = common.load(spec)
    return module, sweep_lib.parsed_config(spec, base_args) if base_args else config


def first_runs(spec: str, base_args: list[str]) -> list[dict]:
    """The phase-1 override dicts (seed 0): the whole grid, or with ``sweep.tune_rank`` the
    runs at that rank and those without a rank of their own.

    >>> len(first_runs("configs/rank_ablation.py", []))   # 5 targets x 2 scales x 4 rates + 6
    46
    """
    module, config = _loaded(spec, base_args)
    tune_rank = config.get("sweep", {}).get("tune_rank")
    return [{**overrides, "seed": 0} for overrides in module.get_sweep(config)
            if tune_rank is None or overrides.get("lora.rank", tune_rank) == tune_rank]


def chosen_runs(spec: str, base_args: list[str], *, db_path: str, experiment: str,
                seeds: int) -> list[dict]:
    """The phase-2 override dicts: every seed below ``seeds`` of each setting at the rate its
    cell chose from the rows (``lowrank.tuning.at_choice``; nothing for cells not yet run);
    the sweep skips the ones already done."""
    module, config = _loaded(spec, base_args)
    db = results.ResultsDB(db_path)
    try:
        frame = db.frame("ok")
    finally:
        db.close()
    frame = frame[frame["experiment"] == experiment] if not frame.empty else frame
    grid = module.get_sweep(config)
    planned = results.ResultsDB(":memory:")  # the grid's rows as the database stores them
    for overrides in grid:
        planned.write(results.apply_overrides(config, {**overrides, "seed": 0}), {},
                      experiment=experiment)
    keep = tuning.at_choice(frame, planned.frame("ok")) if grid else []
    return [{**overrides, "seed": seed} for seed in range(seeds)
            for overrides, kept in zip(grid, keep, strict=True) if kept]


def tune(spec: str, base_args: list[str], *, seeds: int, db_path: str, experiment: str,
         workdir: str | None = None, dry_run: bool = False, batch: int = 1,
         ray_options: dict | None = None) -> dict[str, int]:
    """Both phases (see the module docstring), each a :func:`sweep.sweep` (so on Ray with
    ``ray_options``); returns the counts of both together."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    kwargs = dict(db_path=db_path, experiment=experiment, workdir=workdir, dry_run=dry_run,
                  batch=batch, ray_options=ray_options)
    counts = sweep_lib.sweep(spec, base_args, seeds=1, runs=first_runs(spec, base_args),
                             **kwargs)
    second = chosen_runs(spec, base_args, db_path=db_path, experiment=experiment, seeds=seeds)
    if second:
        more = sweep_lib.sweep(spec, base_args, seeds=seeds, runs=second, **kwargs)
        counts = {k: counts[k] + more[k] for k in counts}
    return counts


def main(argv: list[str]) -> None:
    sweep_lib.run_cli(argv, tune, name="tune.py")


if __name__ == "__main__":
    sweep_lib.define_flags()
    app.run(main, flags_parser=sweep_lib.split_argv)
