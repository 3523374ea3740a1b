"""What one peers run measures: a list of variants, their groups, and which pairs are compared.

A variant is one worker process: a framework ("ours" or the "peer") at a configuration
(``full``, ``lora_qv``, ``lora_all``, ``qlora_all``), with the model's dropout on or off, in
float32 or bfloat16; ours also has a path ("step": ``lowrank.train``'s step; "recipe": the
README's plain-JAX recipe), a dropout PRNG (``lowrank.prng``) and XLA flags (a per-process
setting, read when JAX starts). Ratios compare variants of one *cell* (configuration,
dropout, dtype): every ours variant against the peer, and the PRNG and XLA-flag variants
(ours-only A/Bs) against ours at the baseline PRNG and flags (the first of each list).

>>> vs = expand(["lora_qv"], [True], ["float32"], ["step", "recipe"], ["threefry", "hash"],
...             ["none", "onednn"])
>>> [v.name for v in vs]  # doctest: +NORMALIZE_WHITESPACE
['peer:lora_qv:dropout:float32:-:-:-', 'ours:lora_qv:dropout:float32:step:threefry:none',
 'ours:lora_qv:dropout:float32:recipe:threefry:none',
 'ours:lora_qv:dropout:float32:step:hash:none', 'ours:lora_qv:dropout:float32:step:threefry:onednn']
>>> [(kind, num.prng, num.xla) for kind, num, den in pairs(vs, "threefry", "none")
...  if kind != "ours/peer"]
[('prng', 'hash', 'none'), ('xla', 'threefry', 'onednn')]
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

CONFIGS = {"full": "full", "lora_qv": "lora", "lora_all": "lora", "qlora_all": "qlora"}
"""Configuration -> lowrank_steps mode."""
DTYPES = ("float32", "bfloat16")
PATHS = ("step", "recipe")
PRNGS = ("threefry", "hash")
XLA_FLAGS = {"none": "", "onednn": "--xla_cpu_use_onednn=true",
             "xnnpack": "--xla_cpu_use_xnnpack=true"}
"""Named XLA flag sets; any other name starting with ``--`` is taken as the flags themselves."""
NONE = "-"  # the peer's path, PRNG and XLA flags


@dataclasses.dataclass(frozen=True)
class Variant:
    """One worker: ``framework`` "ours" or "peer"; ``path``, ``prng``, ``xla`` are ours only.

    >>> v = Variant.parse("ours:full:nodropout:bfloat16:recipe:threefry:none")
    >>> v.dropout, v.cell, Variant.parse(v.name) == v
    (False, ('full', False, 'bfloat16'), True)
    """

    framework: str
    config: str
    dropout: bool
    dtype: str = "float32"
    path: str = NONE
    prng: str = NONE
    xla: str = NONE

    @property
    def name(self) -> str:
        return ":".join((self.framework, self.config, "dropout" if self.dropout else "nodropout",
                         self.dtype, self.path, self.prng, self.xla))

    @property
    def cell(self) -> tuple[str, bool, str]:
        """What the peer and ours must share to be compared: (config, dropout, dtype)."""
        return self.config, self.dropout, self.dtype

    @classmethod
    def parse(cls, name: str) -> Variant:
        framework, config, dropout, dtype, path, prng, xla = name.split(":", 6)
        return cls(framework, config, dropout == "dropout", dtype, path, prng, xla)


def xla_flags(name: str) -> str:
    """The flags of XLA variant ``name``.

    >>> xla_flags("onednn"), xla_flags("--xla_cpu_enable_fast_math=true")
    ('--xla_cpu_use_onednn=true', '--xla_cpu_enable_fast_math=true')
    """
    if name in XLA_FLAGS:
        return XLA_FLAGS[name]
    if name.startswith("--"):
        return name
    raise ValueError(f"XLA flag set {name!r} is not one of {list(XLA_FLAGS)} nor starts with --")


def expand(configs: Sequence[str], dropouts: Sequence[bool], dtypes: Sequence[str],
           paths: Sequence[str], prngs: Sequence[str], xlas: Sequence[str]) -> list[Variant]:
    """Every variant of a run, cell by cell: the peer; ours on each path at the baseline PRNG
    and flags (``prngs[0]``, ``xlas[0]``); then on the first path each other PRNG (dropout on
    only: with it off no bits are drawn) and each other flag set."""
    for name, given, known in (("configs", configs, CONFIGS), ("dtypes", dtypes, DTYPES),
                               ("paths", paths, PATHS), ("prngs", prngs, PRNGS)):
        unknown = sorted(set(given) - set(known))
        if unknown or not given:
            raise ValueError(f"--{name} {list(given)}: unknown {unknown}; accepted: {list(known)}")
    for x in xlas:
        xla_flags(x)
    out = []
    for config, dropout, dtype in itertools.product(configs, dropouts, dtypes):
        out.append(Variant("peer", config, dropout, dtype))
        ours = [Variant("ours", config, dropout, dtype, p, prngs[0], xlas[0]) for p in paths]
        if dropout:
            ours += [Variant("ours", config, dropout, dtype, paths[0], p, xlas[0])
                     for p in prngs[1:]]
        ours += [Variant("ours", config, dropout, dtype, paths[0], prngs[0], x) for x in xlas[1:]]
        out += ours
    return out


def groups(variants: Sequence[Variant], max_workers: int) -> list[list[Variant]]:
    """Whole cells packed in order into groups of at most ``max_workers`` (the workers alive at
    once; rounds alternate within a group, and every compared pair is within a cell).

    >>> vs = expand(["full", "lora_qv"], [False], ["float32"], ["step"], ["threefry"], ["none"])
    >>> [len(g) for g in groups(vs, 3)], [len(g) for g in groups(vs, 4)]
    ([2, 2], [4])
    """
    cells: dict[tuple, list[Variant]] = {}
    for v in variants:
        cells.setdefault(v.cell, []).append(v)
    out: list[list[Variant]] = []
    for cell, members in cells.items():
        if len(members) > max_workers:
            raise ValueError(f"cell {cell} has {len(members)} variants, more than "
                             f"--max-workers {max_workers}: raise it or ask for fewer variants")
        if out and len(out[-1]) + len(members) <= max_workers:
            out[-1] += members
        else:
            out.append(list(members))
    return out


def pairs(variants: Sequence[Variant], base_prng: str,
          base_xla: str) -> list[tuple[str, Variant, Variant]]:
    """``(kind, numerator, denominator)`` of every ratio: "ours/peer" for each ours variant,
    "prng" and "xla" for each A/B variant against ours at the baseline; pairs whose
    denominator is not among ``variants`` (a worker that failed) are left out."""
    present = set(variants)
    out = []
    for v in variants:
        if v.framework != "ours":
            continue
        candidates = [("ours/peer", Variant("peer", *v.cell))]
        if v.prng != base_prng:
            candidates.append(("prng", dataclasses.replace(v, prng=base_prng)))
        if v.xla != base_xla:
            candidates.append(("xla", dataclasses.replace(v, xla=base_xla)))
        out += [(kind, v, den) for kind, den in candidates if den in present]
    return out
