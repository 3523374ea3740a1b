"""Learning-rate schedules by name: constant, warmup + cosine, linear (all optax schedules)."""

from __future__ import annotations

import optax

SCHEDULES = ("constant", "warmup_cosine", "linear")


def make_schedule(
    name: str,
    learning_rate: float,
    *,
    steps: int,
    warmup_steps: int = 0,
    end_learning_rate: float = 0.0,
) -> optax.Schedule:
    """An optax schedule over ``steps`` optimizer steps.

    Every schedule starts with ``warmup_steps`` of linear warmup from 0 (none when 0), then:
    "constant" stays at ``learning_rate``; "warmup_cosine" follows a cosine down to
    ``end_learning_rate`` at ``steps``; "linear" falls in a straight line to
    ``end_learning_rate`` at ``steps``.

    >>> schedule = make_schedule("linear", 1.0, steps=10, warmup_steps=2)
    >>> [round(float(schedule(s)), 3) for s in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {name!r}; accepted: {SCHEDULES}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"schedule steps must be an integer >= 1, got {steps!r}")
    if not 0 <= warmup_steps <= steps:
        raise ValueError(f"warmup_steps must be in [0, steps={steps}], got {warmup_steps!r}")
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, steps, end_value=end_learning_rate
        )
    if name == "constant":
        after = optax.constant_schedule(learning_rate)
    else:
        after = optax.linear_schedule(learning_rate, end_learning_rate, steps - warmup_steps)
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])
