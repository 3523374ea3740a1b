"""``LoraSpec``: which parameters get adapters, by which method, of what rank and scale,
initialised how."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

from lowrank import paths
from lowrank.method import Method, method_class, method_names

INITS = ("kaiming", "gaussian", "pissa", "loftq")


def _as_pairs(value: Mapping | tuple | None, name: str) -> tuple[tuple[str, float], ...]:
    items = value.items() if isinstance(value, Mapping) else (value or ())
    pairs = tuple((str(k), v) for k, v in items)
    for pattern, _ in pairs:
        _check_regex(pattern, name)
    return pairs


def _check_regex(pattern: str | None, name: str) -> None:
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"LoraSpec.{name}: {pattern!r} is not a valid regex ({e})") from None


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how.

    Patterns are Python regexes that must ``re.fullmatch`` a '/'-joined parameter path
    (``"encoder/layer_0/attention/self/query/kernel"``).

    Attributes:
      rank: default rank r of every adapter.
      alpha: default alpha; the adapter output is scaled by ``alpha / r`` (``alpha / sqrt(r)``
        with ``rslora``).
      targets: regex of the weights that get a low-rank adapter; None for none (only the
        ``trainable`` leaves are trained: a head-only or full fine-tuning baseline).
      exclude: regex of weights removed from ``targets``.
      rank_pattern: ``{regex: rank}`` overrides, first match wins (as PEFT's ``rank_pattern``).
      alpha_pattern: ``{regex: alpha}`` overrides, first match wins.
      dropout: dropout rate on the adapter's input, active only when ``apply`` gets a
        ``lora_rng``.
      init: "kaiming" (A kaiming-uniform as in PEFT, B = 0), "gaussian" (A ~ N(0, (1/r)^2) as
        in PEFT, B = 0), or "pissa" / "loftq" (which also change the frozen base).
      rslora: scale by ``alpha / sqrt(r)``.
      trainable: regex of extra full-rank leaves to train as they are (a classifier head,
        biases, norms).
      loftq_iters: alternating steps of the LoftQ initialisation.
      method: the method of every target no rule claims: "lora", "dora" (DoRA, Liu et
        al. 2024: LoRA plus a trainable magnitude per output unit), "vera" (VeRA, Kopiczko
        et al. 2024: shared frozen projections, two trainable vectors) or "adalora" (AdaLoRA,
        Zhang et al. 2023: an SVD-form update whose ranks a budget masks; ``rank`` is the
        initial rank), built from the fields above by the method's ``from_spec`` (VeRA takes
        rank and dropout).
      rules: ordered ``(regex, method object)`` pairs, first match wins, choosing the method
        per target (``[(r".*attention.*", LoRA(rank=8)), (r".*mlp.*", DoRA(rank=4))]``);
        each must match some target. ``targets`` still says which weights are adapted.

    >>> spec = LoraSpec(rank=8, alpha=16, targets=r".*/(query|value)/kernel")
    >>> spec.scale_for(8)
    2.0
    >>> LoraSpec(method="dora").method_for("l0/query/kernel").name
    'dora'
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str | None = r".*kernel"
    exclude: str | None = None
    rank_pattern: tuple = ()
    alpha_pattern: tuple = ()
    dropout: float = 0.0
    init: str = "kaiming"
    rslora: bool = False
    trainable: str | None = None
    loftq_iters: int = 1
    method: str = "lora"
    rules: tuple = ()

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "rank_pattern", _as_pairs(self.rank_pattern, "rank_pattern"))
        set_(self, "alpha_pattern", _as_pairs(self.alpha_pattern, "alpha_pattern"))
        set_(self, "rules", _as_pairs(self.rules, "rules"))
        for pattern, method in self.rules:
            if not isinstance(method, Method):
                raise ValueError(f"LoraSpec.rules[{pattern!r}]: {method!r} is not a method "
                                 "object (such as lowrank.LoRA(rank=8) or lowrank.DoRA(rank=4))")
        if self.method not in method_names():
            raise ValueError(f"LoraSpec.method {self.method!r} is not one of {method_names()}")
        for name in ("targets", "exclude", "trainable"):
            _check_regex(getattr(self, name), name)
        if self.targets is None and self.trainable is None:
            raise ValueError("LoraSpec has neither targets nor trainable leaves: nothing to train")
        ranks = [("rank", self.rank)] + [(f"rank_pattern[{p!r}]", r) for p, r in self.rank_pattern]
        for where, r in ranks:
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise ValueError(f"LoraSpec.{where}: rank must be an integer >= 1, got {r!r}")
        alphas = [("alpha", self.alpha)] + [
            (f"alpha_pattern[{p!r}]", a) for p, a in self.alpha_pattern
        ]
        for where, a in alphas:
            if not isinstance(a, (int, float)) or not a > 0:
                raise ValueError(f"LoraSpec.{where}: alpha must be a number > 0, got {a!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraSpec.init: {self.init!r} is not one of {INITS}")
        if not isinstance(self.loftq_iters, int) or self.loftq_iters < 1:
            raise ValueError(
                f"LoraSpec.loftq_iters must be an integer >= 1, got {self.loftq_iters!r}"
            )

    def rank_for(self, path: str) -> int:
        """The rank of the adapter at ``path``.

        >>> LoraSpec(rank=8, rank_pattern={r".*value.*": 2}).rank_for("l0/value/kernel")
        2
        """
        return paths.first_match(path, self.rank_pattern, self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha of the adapter at ``path``.

        >>> LoraSpec(alpha=16, alpha_pattern={r".*value.*": 4}).alpha_for("l0/query/kernel")
        16
        """
        return paths.first_match(path, self.alpha_pattern, self.alpha)

    def method_for(self, path: str) -> Method:
        """The method object of the target at ``path``: the first matching rule, else
        ``method`` with this spec's rank, alpha, dropout, init and rsLoRA for ``path``.

        >>> LoraSpec(rank=8, rank_pattern={r".*value.*": 2}).method_for("l0/value/kernel").rank
        2
        """
        rule = paths.first_match(path, self.rules, None)
        if rule is not None:
            return rule
        return method_class(self.method).from_spec(self, path)

    def scale_for(self, rank: int, alpha: float | None = None) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

        >>> LoraSpec(alpha=16, rslora=True).scale_for(16)
        4.0
        """
        alpha = self.alpha if alpha is None else alpha
        return float(alpha) / (math.sqrt(rank) if self.rslora else rank)
