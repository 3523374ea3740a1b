"""Hyper-parameters tuned on the validation split, chosen from the results database's rows.

A sweep that tries a grid of learning rates (or any other keys) for every setting files one
row per (setting, rate, seed). :func:`choose` picks, per setting ("cell": every config field
but the tuned keys and the seed), the rate whose run at the tuning seed has the best
validation metric; :func:`tuned` keeps only the rows at the chosen rates, all seeds. The sweep
driver (``experiments/tune.py``) and the tables (``experiments/report.py``) both call it, so
the rows that are reported are the ones the protocol selected, and nothing is chosen on test.

A rank ablation may tune once per rank family instead: rows whose config sets
``sweep.tune_rank`` choose their rate among the runs at that rank, and every rank of the family
(the rows equal but for ``lora.rank`` and the ``lora.alpha`` a scale convention derives from it)
runs at that rate, so that rank varies at a fixed step size, as the LoRA and rsLoRA papers
compare ranks.

>>> import pandas as pd
>>> frame = pd.DataFrame({
...     "experiment": ["e"] * 4, "seed": [0, 0, 1, 1], "config_hash": list("abcd"),
...     "config.rank": [4] * 4, "config.optimizer.learning_rate": [1e-3, 3e-3, 1e-3, 3e-3],
...     "config.seed": [0, 0, 1, 1], "metric.val_accuracy": [0.8, 0.9, 0.95, 0.7]})
>>> tuned(frame)["config_hash"].tolist()   # seed 0 chose 3e-3; seed 1 runs at it
['b', 'd']
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from lowrank.results import HASHED_UNLESS_DEFAULT, unhashed

LEARNING_RATE = "config.optimizer.learning_rate"
TUNE_RANK = "config.sweep.tune_rank"
RANK = "config.lora.rank"
RANK_FAMILY = (RANK, "config.lora.alpha")
"""The fields a row with ``sweep.tune_rank`` leaves out of its cell: one rate serves every rank
(and the alpha each rank's scale convention sets)."""


def _absent(key: str, value: Any) -> bool:
    """Whether a row's field counts as not set: missing (NaN, None), one the config hash
    leaves out (``results.UNHASHED``: the sweep's grids, the workdir; a grid widened between
    passes must not split a setting), or at the default of a field added after older rows
    were written (``results.HASHED_UNLESS_DEFAULT``: those rows lack it), so old and new rows
    of one setting fall in one cell, as their hashes do."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    name = key.removeprefix("config.")
    if unhashed(name):
        return True
    if name not in HASHED_UNLESS_DEFAULT:
        return False
    default = HASHED_UNLESS_DEFAULT[name]
    return value == default or (isinstance(value, str) and value == json.dumps(default))


def _tune_rank(row: Any) -> Any:
    value = row.get(TUNE_RANK)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _canonical(value: Any) -> Any:
    """One spelling per value: a column that pandas widened to float (a NaN in another row)
    or a numpy scalar labels its setting as the plain int or bool does."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, bool) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    return value


def _cell(row: Any, tuned_keys: Sequence[str]) -> str:
    skip = {*tuned_keys, "config.seed", *(RANK_FAMILY if _tune_rank(row) else ())}
    fields = {k: _canonical(v) for k, v in row.items() if k.startswith("config.")
              and k not in skip and not _absent(k, v)}
    return json.dumps([row.get("experiment"), sorted(fields.items())], default=str)


def cells(frame: Any, tuned_keys: Sequence[str] = (LEARNING_RATE,)) -> Any:
    """One label per row naming its setting: the experiment and every config field but
    ``tuned_keys`` and the seed (a Series aligned with ``frame``)."""
    import pandas as pd

    if frame.empty:
        return pd.Series([], dtype=object)
    return frame.apply(lambda row: _cell(row, tuned_keys), axis=1)


def choose(frame: Any, *, tuned_keys: Sequence[str] = (LEARNING_RATE,),
           metric: str = "metric.val_accuracy", mode: str = "max",
           tiebreak: str = "metric.val_loss", seed: int = 0) -> dict[str, tuple]:
    """``{cell: chosen values of tuned_keys}``: per cell, the values whose run at ``seed``
    has the best ``metric`` (``mode`` "max" or "min"; ties go to the lower ``tiebreak``, then
    to the first row). Cells without a run at ``seed`` choose by the mean over their seeds; a
    cell of rows with ``sweep.tune_rank`` chooses among its runs at that rank (all of them if
    it has none there).

    >>> import pandas as pd
    >>> ranks = pd.DataFrame({"experiment": ["e"] * 3, "seed": [0] * 3,
    ...     "config.sweep.tune_rank": [8] * 3, "config.lora.rank": [8, 8, 64],
    ...     "config.lora.alpha": [16, 16, 128], "config.optimizer.learning_rate": [1, 3, 3],
    ...     "metric.val_accuracy": [0.9, 0.8, 0.99]})
    >>> [int(v[0]) for v in choose(ranks).values()]   # rank 8's better rate, for rank 64 too
    [1]
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode {mode!r} is not 'max' or 'min'")
    missing = [k for k in (*tuned_keys, metric) if k not in frame]
    if frame.empty or missing:
        return {}
    labels = cells(frame, tuned_keys)
    sign = -1.0 if mode == "max" else 1.0
    chosen: dict[str, tuple] = {}
    for cell, group in frame.groupby(labels, sort=False):
        tune_rank = _tune_rank(group.iloc[0])
        if tune_rank and RANK in group and (group[RANK] == tune_rank).any():
            group = group[group[RANK] == tune_rank]
        at_seed = group[group["seed"] == seed]
        pool = at_seed if not at_seed.empty else group
        scores = pool.groupby(list(tuned_keys), sort=False).agg(
            score=(metric, "mean"),
            tie=(tiebreak, "mean") if tiebreak in pool else (metric, "size"))
        scores["score"] = sign * scores["score"]
        best = scores.sort_values(["score", "tie"], kind="stable").index[0]
        chosen[cell] = best if isinstance(best, tuple) else (best,)
    return chosen


SELECTED_ON = {"accuracy": ("metric.val_accuracy", "max"), "loss": ("metric.val_loss", "min"),
               "perplexity": ("metric.val_perplexity", "min")}
"""A run's ``config.eval.select`` -> the validation column its rate is chosen on, and which
way is better: the rate is chosen on the metric the run chose its best point on."""
SELECT = "config.eval.select"


def tuned(frame: Any, *, tuned_keys: Sequence[str] = (LEARNING_RATE,),
          metric: str | None = None, **kwargs: Any) -> Any:
    """The rows of ``frame`` at each cell's chosen values (every seed), with a column
    ``grid_size`` (how many values the cell tried) and ``grid_edge`` ("high" / "low" when the
    choice is the largest / smallest of three or more values tried). ``metric`` None: each row's
    ``config.eval.select`` names it (:data:`SELECTED_ON`; validation accuracy for rows without
    one). Without ``metric`` (runs that did not evaluate on validation) or a tuned key in
    ``frame``, ``frame`` as it is: nothing to choose.

    >>> import pandas as pd
    >>> lm = pd.DataFrame({"experiment": ["e"] * 2, "seed": [0, 0], "config_hash": list("ab"),
    ...     "config.eval.select": ["perplexity"] * 2, "config.optimizer.learning_rate": [1, 3],
    ...     "metric.val_perplexity": [9.0, 8.0], "metric.val_loss": [2.2, 2.1]})
    >>> tuned(lm)["config_hash"].tolist()   # the lower validation perplexity
    ['b']
    """
    if metric is None:
        if SELECT in frame and frame[SELECT].isin(list(SELECTED_ON)).any():
            import pandas as pd

            parts = [tuned(frame[frame[SELECT] == select], tuned_keys=tuned_keys,
                           metric=column, **{"mode": mode, **kwargs})
                     for select, (column, mode) in SELECTED_ON.items()
                     if (frame[SELECT] == select).any()]
            rest = frame[~frame[SELECT].isin(list(SELECTED_ON))]
            if len(rest):
                parts.append(tuned(rest, tuned_keys=tuned_keys,
                                   metric=SELECTED_ON["accuracy"][0], **kwargs))
            return pd.concat(parts).sort_index()
        metric = SELECTED_ON["accuracy"][0]
    if frame.empty or metric not in frame or any(k not in frame for k in tuned_keys):
        return frame
    untuned = frame[list(tuned_keys)].isna().any(axis=1) | frame[metric].isna()
    if untuned.any():  # rows without the tuned keys or the metric: nothing to choose among
        import pandas as pd

        rest = frame[~untuned]
        kept = tuned(rest, tuned_keys=tuned_keys, metric=metric, **kwargs) if len(rest) else rest
        return pd.concat([kept, frame[untuned]]).sort_index()
    chosen = choose(frame, tuned_keys=tuned_keys, metric=metric, **kwargs)
    labels = cells(frame, tuned_keys)
    values = frame[list(tuned_keys)].apply(tuple, axis=1)
    keep = [chosen.get(label) == value for label, value in zip(labels, values, strict=True)]
    out = frame[keep].copy()
    out["grid_size"] = [frame[labels == label][list(tuned_keys)].drop_duplicates().shape[0]
                        for label in labels[keep]]
    out["grid_edge"] = [_edge(frame[labels == label][tuned_keys[0]], value[0])
                        if len(tuned_keys) == 1 else ""
                        for label, value in zip(labels[keep], values[keep], strict=True)]
    return out


def at_choice(frame: Any, candidates: Any, *,
              tuned_keys: Sequence[str] = (LEARNING_RATE,)) -> list[bool]:
    """Whether each row of ``candidates`` (settings to run: their experiment and config fields,
    no metrics) has the values its cell chose from the runs in ``frame`` (on the validation
    metric its ``config.eval.select`` names, :data:`SELECTED_ON`); False where the cell has
    chosen nothing yet. A sweep's second phase runs the seeds of these.

    >>> import pandas as pd
    >>> done = pd.DataFrame({"experiment": ["e"] * 2, "seed": [0, 0],
    ...     "config.sweep.tune_rank": [8] * 2, "config.lora.rank": [8] * 2,
    ...     "config.lora.alpha": [16] * 2, "config.optimizer.learning_rate": [1, 3],
    ...     "metric.val_accuracy": [0.9, 0.8]})
    >>> todo = pd.DataFrame({"experiment": ["e"] * 3, "config.sweep.tune_rank": [8] * 3,
    ...     "config.lora.rank": [64, 64, 8], "config.lora.alpha": [128, 128, 16],
    ...     "config.optimizer.learning_rate": [1, 3, 1]})
    >>> at_choice(done, todo)
    [True, False, True]
    """
    import pandas as pd

    chosen: dict[str, tuple] = {}
    if frame.empty:
        return [False] * len(candidates)
    selects = frame[SELECT] if SELECT in frame else pd.Series(None, index=frame.index)
    selects = selects.where(selects.isin(list(SELECTED_ON)), "accuracy")
    for select, (metric, mode) in SELECTED_ON.items():
        rows = frame[selects == select]
        if not rows.empty:
            chosen.update(choose(rows, tuned_keys=tuned_keys, metric=metric, mode=mode))
    values = candidates[list(tuned_keys)].apply(tuple, axis=1)
    return [chosen.get(label) == value
            for label, value in zip(cells(candidates, tuned_keys), values, strict=True)]


def _edge(tried: Any, chosen: Any) -> str:
    """"high" / "low" when ``chosen`` is the largest / smallest of three or more values
    ``tried`` (the best value may lie beyond the grid), else ""."""
    values = sorted(set(tried))
    if len(values) < 3:
        return ""
    return "high" if chosen == values[-1] else "low" if chosen == values[0] else ""
