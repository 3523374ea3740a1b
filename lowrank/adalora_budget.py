"""AdaLoRA's rank budget as an optax transform: sensitivity averages and masks in its state.

:func:`adalora_budget` wraps the optimizer (AdamW, say) and does what PEFT's ``RankAllocator``
does after each ``optimizer.step()`` (``update_and_allocate``):

1. while ``step < total_steps - tfinal``, it updates, for every entry of every ``P``,
   ``lambda`` and ``Q``, the importance ``I = |w * g|`` (``w`` the value after the update,
   ``g`` the gradient), its average ``S = beta1 S + (1 - beta1) I`` and its uncertainty
   ``U = beta2 U + (1 - beta2) |I - S|``;
2. on the steps :func:`budget_schedule` says (every ``delta_t`` steps between ``tinit`` and
   ``total_steps - tfinal``, and always at ``total_steps - tfinal``), it scores each rank
   ``i`` of each matrix as ``S U`` of ``lambda_i`` plus the means of ``S U`` over ``P[:, i]``
   and over ``Q[i]``, keeps the ``budget`` best ranks of all matrices together and sets the
   other ``lambda`` entries to zero;
3. after ``total_steps - tfinal``, it keeps the last ranks (zeroing the others every step).

The budget falls from ``r_init`` per matrix to ``target_rank`` per matrix on a cubic
schedule. Shapes never change (a masked rank is a zero ``lambda`` and a ``False`` in
``state.keep``), so the step compiles once. One difference from PEFT, on ties only: PEFT masks
every score ``<=`` the k-th smallest, this masks exactly k (the budget is then exact).

>>> import jax, jax.numpy as jnp, optax, lowrank as lr
>>> from lowrank.adalora import AdaLoraTriplet
>>> leaf = AdaLoraTriplet(jnp.ones((4, 3)), jnp.ones((3, 2)), e=jnp.ones(3), init_rank=3)
>>> tx = adalora_budget(optax.sgd(0.1), target_rank=1, total_steps=4, tfinal=1)
>>> params, state = {"w": leaf}, tx.init({"w": leaf})
>>> for _ in range(4):
...     grads = jax.tree.map(jnp.ones_like, params)
...     updates, state = tx.update(grads, state, params)
...     params = optax.apply_updates(params, updates)
>>> int(params["w"].active_ranks()), ranks(state)
(1, {'w': 1})

References:
  Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (AdaLoRA),
  ICLR 2023, https://arxiv.org/abs/2303.10512; PEFT's ``tuners/adalora/layer.py``
  (``RankAllocator``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import paths
from lowrank.adalora import is_triplet, triplets


def budget_schedule(step: int, *, init_budget: int, target_budget: int, total_steps: int,
                    tinit: int = 0, tfinal: int = 0, delta_t: int = 1) -> tuple[int, bool]:
    """PEFT's ``RankAllocator.budget_schedule``: ``(budget, mask now)`` at ``step``.

    Up to ``tinit``: the whole initial budget, no masking; after ``total_steps - tfinal``:
    the target; between, ``target + (init - target) (1 - (step - tinit) / (total_steps -
    tfinal - tinit))^3`` (rounded down), masking every ``delta_t`` steps.

    >>> [budget_schedule(s, init_budget=24, target_budget=8, total_steps=10, tinit=2,
    ...                  tfinal=2)[0] for s in range(11)]
    [24, 24, 24, 17, 12, 10, 8, 8, 8, 8, 8]
    """
    if step <= tinit:
        return init_budget, False
    if step > total_steps - tfinal:
        return target_budget, True
    coeff = 1 - (step - tinit) / (total_steps - tfinal - tinit)
    return int((init_budget - target_budget) * coeff ** 3 + target_budget), step % delta_t == 0


class AdaLoraState(NamedTuple):
    """:func:`adalora_budget`'s state.

    Attributes:
      count: the number of updates so far (PEFT's ``global_step`` of the next one).
      inner: the wrapped optimizer's state.
      sensitivity: ``S``, a tree of the AdaLoRA leaves (the same classes, averages in place
        of the arrays; None elsewhere).
      uncertainty: ``U``, the same.
      keep: per AdaLoRA leaf, a bool per rank (per layer of a stack): the ranks the last
        masking kept (all True before the first).
    """

    count: jax.Array
    inner: optax.OptState
    sensitivity: Any
    uncertainty: Any
    keep: Any


def _only_triplets(tree: Any, fn) -> Any:
    return jax.tree.map(lambda v: fn(v) if is_triplet(v) else None, tree, is_leaf=is_triplet)


def _score(s, u) -> jax.Array:
    """The score of each rank of one leaf: ``S U`` of lambda plus the means over P and Q."""
    sa, sb, se = (s.a * u.a, s.b * u.b, s.e * u.e)
    return se + jnp.mean(sa, axis=-2) + jnp.mean(sb, axis=-1)


def adalora_budget(
    inner: optax.GradientTransformation,
    *,
    target_rank: int,
    total_steps: int,
    tinit: int = 0,
    tfinal: int = 0,
    delta_t: int = 1,
    beta1: float = 0.85,
    beta2: float = 0.85,
) -> optax.GradientTransformation:
    """AdaLoRA's budget allocation around the optimizer ``inner`` (see the module docstring);
    its ``update`` needs ``params``. The defaults are PEFT's ``AdaLoraConfig``'s.

    Args:
      inner: the optimizer (its updates are what the masking edits).
      target_rank: PEFT's ``target_r``: the final budget is this times the number of
        AdaLoRA matrices (each layer of a stack is one).
      total_steps: the steps of the run (PEFT's ``total_step``).
      tinit: steps at the full initial budget first.
      tfinal: steps at the final ranks last (with 0, as in PEFT, the last masking is on the
        cubic schedule's last ``delta_t`` step, a little above the target).
      delta_t: steps between two maskings.
      beta1, beta2: the averages' decay (sensitivity, uncertainty).

    >>> tx = adalora_budget(optax.adam(1e-3), target_rank=2, total_steps=100, tfinal=10)
    """
    for name, value, low in (("target_rank", target_rank, 1), ("total_steps", total_steps, 1),
                             ("tinit", tinit, 0), ("tfinal", tfinal, 0),
                             ("delta_t", delta_t, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"adalora_budget: {name} must be an integer >= {low}, got "
                             f"{value!r}")
    if tinit >= total_steps - tfinal:
        raise ValueError(f"adalora_budget: tinit={tinit} >= total_steps - tfinal = "
                         f"{total_steps - tfinal} leaves no budgeting phase; lower tinit or "
                         "tfinal, or raise total_steps")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0 < beta < 1:
            raise ValueError(f"adalora_budget: {name} must be in (0, 1), got {beta!r}")
    final = total_steps - tfinal

    def init_fn(params):
        found = triplets(params)
        if not found:
            raise ValueError("adalora_budget: the params hold no AdaLoRA leaf "
                             "(LoraSpec(method='adalora'))")
        too_small = {p: v.rank for p, v in found.items() if v.rank < target_rank}
        if too_small:
            raise ValueError(f"adalora_budget: target_rank {target_rank} exceeds the rank of "
                             f"{sorted(too_small.items())}")
        zeros = _only_triplets(params, lambda v: jax.tree.map(
            lambda x: jnp.zeros(x.shape, jnp.float32), v))
        keep = _only_triplets(params, lambda v: jnp.ones(v.e.shape, bool))
        return AdaLoraState(jnp.zeros((), jnp.int32), inner.init(params), zeros,
                            jax.tree.map(jnp.zeros_like, zeros), keep)

    def update_fn(grads, state, params=None):
        if params is None:
            raise ValueError("adalora_budget needs params: call tx.update(grads, state, params)")
        updates, inner_state = inner.update(grads, state.inner, params)
        step = state.count
        leaves = triplets(params)
        init_budget = sum(v.e.size for v in leaves.values())
        target_budget = target_rank * sum(v.e.size // v.rank for v in leaves.values())
        # PEFT's schedule in float64 on the host, looked up by the traced step.
        table = [budget_schedule(s, init_budget=init_budget, target_budget=target_budget,
                                 total_steps=total_steps, tinit=tinit, tfinal=tfinal,
                                 delta_t=delta_t) for s in range(final + 1)]
        budgets = jnp.asarray([b for b, _ in table], jnp.int32)
        mask_now = jnp.asarray([m for _, m in table[:final]] + [True])  # forced at `final`
        index = jnp.minimum(step, final)
        mask_now = mask_now[index] & (step <= final)

        new_params = optax.apply_updates(params, updates)
        flat_new, flat_grads = paths.flatten(new_params), paths.flatten(grads)
        flat_s, flat_u = paths.flatten(state.sensitivity), paths.flatten(state.uncertainty)
        averaging = step < final
        s_out, u_out = dict(flat_s), dict(flat_u)
        for p in leaves:
            w, g = flat_new[p], flat_grads[p]
            ipt = jax.tree.map(lambda x, y: jnp.abs(x.astype(jnp.float32) * y), w, g)
            s1 = jax.tree.map(lambda s, i: beta1 * s + (1 - beta1) * i, flat_s[p], ipt)
            u1 = jax.tree.map(lambda u, i, s: beta2 * u + (1 - beta2) * jnp.abs(i - s),
                              flat_u[p], ipt, s1)
            s_out[p] = jax.tree.map(lambda new, old: jnp.where(averaging, new, old), s1,
                                    flat_s[p])
            u_out[p] = jax.tree.map(lambda new, old: jnp.where(averaging, new, old), u1,
                                    flat_u[p])

        # The (init - budget) lowest-scoring ranks of all matrices together are masked.
        scores = [_score(s_out[p], u_out[p]) for p in leaves]
        flat_scores = jnp.concatenate([s.reshape(-1) for s in scores])
        position = jnp.argsort(jnp.argsort(flat_scores))
        kept = position >= init_budget - budgets[index]
        flat_keep = paths.flatten(state.keep)
        keep_out, offset = dict(flat_keep), 0
        for p, s in zip(leaves, scores, strict=True):
            chosen = kept[offset: offset + s.size].reshape(s.shape)
            offset += s.size
            keep_out[p] = jnp.where(mask_now, chosen, flat_keep[p])

        masking = mask_now | (step > final)
        flat_updates = dict(paths.flatten(updates))
        for p, leaf in leaves.items():
            u = flat_updates[p]
            zeroed = jnp.where(keep_out[p], u.e, -leaf.e.astype(u.e.dtype))
            flat_updates[p] = u.replace(e=jnp.where(masking, zeroed, u.e))

        # The averages restart after the final masking, as PEFT's reset_ipt.
        restart = step == final
        s_out = {p: jax.tree.map(lambda x: jnp.where(restart, 0.0, x), v) if v is not None
                 else v for p, v in s_out.items()}
        u_out = {p: jax.tree.map(lambda x: jnp.where(restart, 0.0, x), v) if v is not None
                 else v for p, v in u_out.items()}
        unflat = _like(state.sensitivity)
        return (_like(updates)(flat_updates),
                AdaLoraState(step + 1, inner_state, unflat(s_out), unflat(u_out),
                             _like(state.keep)(keep_out)))

    return optax.GradientTransformation(init_fn, update_fn)


def _like(tree: Any):
    """Rebuilds a tree of ``tree``'s structure from ``{path: leaf}`` (paths.flatten's)."""
    flat = paths.flatten(tree)

    def rebuild(values: Mapping[str, Any]) -> Any:
        return paths.unflatten({p: values[p] for p in flat})

    return rebuild


def find_state(opt_state: Any) -> AdaLoraState:
    """The :class:`AdaLoraState` inside an optimizer state (chained or not)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
        x, AdaLoraState)) if isinstance(s, AdaLoraState)]
    if len(found) != 1:
        raise ValueError(f"the optimizer state holds {len(found)} AdaLoraState; expected one "
                         "(an optimizer made with lowrank.adalora_budget.adalora_budget)")
    return found[0]


def ranks(opt_state: Any) -> dict[str, int | list[int]]:
    """The rank each AdaLoRA matrix keeps (its last masking's): ``{path: rank}``, or a list
    with one rank per layer for the leaves of a ``nn.scan`` stack.

    >>> keep = {"w": jnp.array([True, False, True])}
    >>> ranks(AdaLoraState(jnp.int32(0), (), None, None, keep))
    {'w': 2}
    """
    keep = paths.flatten(find_state(opt_state).keep)
    out: dict[str, Any] = {}
    for p, k in keep.items():
        counts = np.asarray(jax.device_get(k)).sum(axis=-1)
        out[p] = int(counts) if counts.ndim == 0 else counts.reshape(-1).tolist()
    return out


def rank_table(rank_of: Mapping[str, int | list[int]]) -> list[dict[str, Any]]:
    """One row per matrix (each layer of a stack on its own): ``{"path", "layer", "rank"}``,
    the layer taken from a ``layers_<i>`` part of the path when there is one.

    >>> rank_table({"layers_1/q/kernel": 3, "s/kernel": [2, 5]})  # doctest: +NORMALIZE_WHITESPACE
    [{'path': 'layers_1/q/kernel', 'layer': 1, 'rank': 3},
     {'path': 's/kernel', 'layer': 0, 'rank': 2}, {'path': 's/kernel', 'layer': 1, 'rank': 5}]
    """
    rows = []
    for p, r in rank_of.items():
        if isinstance(r, list):
            rows += [{"path": p, "layer": i, "rank": int(v)} for i, v in enumerate(r)]
        else:
            layer = next((int(part.rpartition("_")[2]) for part in p.split(paths.SEP)
                          if part.rpartition("_")[2].isdigit()), None)
            rows.append({"path": p, "layer": layer, "rank": int(r)})
    return rows


def _matrix_name(path: str) -> str:
    """The weight's name without its layer: ``encoder/layer_3/attention/query/kernel`` ->
    ``attention/query``."""
    parts = [q for q in path.split(paths.SEP) if not q.rpartition("_")[2].isdigit()
             and q not in ("kernel", "params")]
    return paths.SEP.join(parts[-2:])


def plot_rank_allocation(rank_of: Mapping[str, int | list[int]], ax: Any = None) -> Any:
    """The AdaLoRA paper's rank-allocation figure: a heat map of the final rank, one column
    per layer and one row per kind of matrix, each cell annotated. Returns the matplotlib Axes.

    >>> ax = plot_rank_allocation({"layers_0/q/kernel": 3, "layers_1/q/kernel": 1})
    >>> ax.get_xlabel()
    'layer'
    """
    import matplotlib.pyplot as plt

    rows = rank_table(rank_of)
    names = sorted({_matrix_name(r["path"]) for r in rows})
    layers = sorted({r["layer"] if r["layer"] is not None else 0 for r in rows})
    grid = np.full((len(names), len(layers)), np.nan)
    for r in rows:
        grid[names.index(_matrix_name(r["path"])),
             layers.index(r["layer"] if r["layer"] is not None else 0)] = r["rank"]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(3.0, 0.6 * len(layers) + 2), 0.5 * len(names) + 1.5))
    image = ax.imshow(grid, cmap="YlGn", aspect="auto", vmin=0)
    ax.set_xticks(range(len(layers)), [str(i) for i in layers])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("layer")
    for (i, j), v in np.ndenumerate(grid):
        if not math.isnan(v):
            ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=8)
    ax.figure.colorbar(image, ax=ax, label="final rank")
    return ax
