"""K training states as one: padded to a common shape, stacked along a leading member axis.

Members may differ in targets, rank and scale. The stack holds the union of their trainable
trees: at each adapted weight a ``LoraPair`` of the largest rank (each member's ``A`` and
``B`` zero-padded in the rank axis), and each full-rank trained leaf (a member that does not
train it holds the frozen value). A boolean ``mask`` says which entries a member really
trains; per-member ``multipliers`` carry the adapter scales where members disagree (the
stacked pair then has scale 1). Optimizer states are laid out the same way, so that
:func:`unstack_states` gives back, for each member, exactly the ``TrainState`` of its own run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp  # noqa: F401  (doctests)
import numpy as np
import optax
from flax import struct

from lowrank import paths, quant
from lowrank.lora import LoraPair
from lowrank.method import is_adapter
from lowrank.train.state import TrainState


@struct.dataclass
class StackedState:
    """The training state of K members, every leaf with a leading member axis of size K.

    Attributes:
      train: the members' ``TrainState`` s, padded to a common layout and stacked.
      mask: like ``train.trainable``, True where the member trains that entry (False in the
        padding, and everywhere in a target or leaf the member does not train).
      multipliers: ``{target path: [K]}``, each member's adapter scale at targets where the
        members' scales differ (the stacked ``LoraPair`` there has scale 1.0).

    >>> from lowrank.lora import LoraPair
    >>> def member(rank, seed):
    ...     pair = LoraPair(jnp.ones((4, rank)), jnp.zeros((rank, 3)), scale=8.0 / rank)
    ...     return TrainState.create({"d": {"kernel": pair}}, optax.sgd(0.1), jax.random.key(seed))
    >>> stacked = stack_states([member(1, 0), member(2, 1)], {}, [optax.sgd(0.1)] * 2)
    >>> stacked.train.trainable["d"]["kernel"].a.shape, stacked.multipliers["d/kernel"].tolist()
    ((2, 4, 2), [8.0, 4.0])
    """

    train: TrainState
    mask: Any
    multipliers: dict[str, jax.Array]

    @property
    def size(self) -> int:
        """K, the number of members."""
        return int(self.train.step.shape[0])


def fit(x: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` (on the host) cut or zero-padded at the end of each axis to ``shape``.

    >>> fit(np.ones((2, 1)), (2, 3)).tolist(), fit(np.arange(4.0).reshape(2, 2), (2, 1)).tolist()
    ([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], [[0.0], [2.0]])
    """
    x = np.asarray(x)
    if x.ndim != len(shape):
        raise ValueError(f"cannot fit an array of shape {x.shape} to {shape}: the number of "
                         "axes differs")
    if x.shape == tuple(shape):
        return x
    x = x[tuple(slice(0, n) for n in shape)]
    return np.pad(x, [(0, n - m) for n, m in zip(shape, x.shape, strict=True)])


def _by_key_path(tree: Any) -> dict[tuple, Any]:
    return dict(jax.tree_util.tree_flatten_with_path(tree)[0])


def transfer(template: Any, source: Any, fill: Callable[[tuple, Any], Any]) -> Any:
    """A tree shaped like ``template`` whose leaves (numpy arrays) come from ``source`` at the
    same key path (cut or zero-padded by :func:`fit` to the template leaf's shape and cast to
    its dtype), or from ``fill(key_path, template_leaf)`` where ``source`` has no such path.

    Key paths ignore static fields (a ``LoraPair``'s scale), so a member's tree and the
    stack's union tree match wherever they hold the same parameter.

    >>> transfer({"a": np.zeros(3), "b": np.zeros(1)}, {"a": np.ones(2)},
    ...          lambda path, leaf: leaf - 1)
    {'a': array([1., 1., 0.]), 'b': array([-1.])}
    """
    found = _by_key_path(jax.device_get(source))
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for key_path, leaf in flat:
        if key_path in found:
            value = fit(found[key_path], tuple(leaf.shape)).astype(leaf.dtype)
        else:
            value = np.asarray(fill(key_path, leaf), leaf.dtype)
        leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _union_trainable(trainables: Sequence[Mapping], frozen: Mapping) -> tuple[dict, dict]:
    """The stack's trainable tree (zeros in every pair, the frozen value in every full-rank
    leaf) and ``{path: [scale of each member]}`` where the members' scales differ."""
    flats = [paths.flatten(t) for t in trainables]
    frozen_flat = paths.flatten(paths.params_of(frozen))
    union: dict[str, Any] = {}
    multipliers: dict[str, jax.Array] = {}
    for p in sorted(set().union(*flats)):
        leaves = [f[p] for f in flats if p in f]
        pairs = [leaf for leaf in leaves if is_adapter(leaf)]
        if pairs and len(pairs) != len(leaves):
            raise ValueError(f"members disagree about {p!r}: some adapt it with a LoraPair, "
                             "others train it in full; stack them separately")
        if pairs:
            union[p], shared_scale = _union_pair(p, pairs)
            if not shared_scale:
                multipliers[p] = np.asarray(
                    [f[p].scale if p in f else 1.0 for f in flats], np.float32)
            continue
        shapes = {tuple(np.shape(leaf)) for leaf in leaves}
        if len(shapes) > 1:
            raise ValueError(f"members train {p!r} with different shapes {sorted(shapes)}")
        if len(leaves) < len(flats):  # a member that does not train it uses the frozen value
            base = frozen_flat.get(p)
            if base is None or quant.is_quantized(base):
                raise ValueError(
                    f"{p!r} is trained by some members only, and the frozen tree holds "
                    f"{'no' if base is None else 'a quantized'} value for the others: train it "
                    "in every member or in none")
            union[p] = np.asarray(jax.device_get(base), leaves[0].dtype)
        else:
            union[p] = jax.ShapeDtypeStruct(np.shape(leaves[0]), leaves[0].dtype)
    return paths.unflatten(union), multipliers


def _union_pair(path: str, pairs: Sequence[LoraPair]) -> tuple[LoraPair, bool]:
    """The zero leaf of the largest rank (the members' leaf type: a DoRA magnitude is kept),
    and whether all members share one scale (kept static then, so their arithmetic is that of
    their own runs to the bit)."""
    kinds = {pair.kind for pair in pairs}
    if len(kinds) > 1:
        raise ValueError(f"members' adapters at {path!r} use different methods "
                         f"{sorted(kinds)}; stack them separately")
    if not {"a", "b"} <= set(pairs[0].arrays()):  # the rank padding is of A and B
        raise ValueError(f"members' adapters at {path!r} are {pairs[0].kind} adapters, which "
                         "cannot be stacked (stacks pad the rank of LoRA-family A and B)")
    for field in ("equation", "dropout"):
        values = {getattr(pair, field) for pair in pairs}
        if len(values) > 1:
            raise ValueError(f"members' adapters at {path!r} differ in {field}: "
                             f"{sorted(values)}; a stack shares it")
    first = pairs[0]
    rank = max(pair.rank for pair in pairs)
    a_shape = first.a.shape[:-1] + (rank,)
    # B's rank axis sits before its output axes (and after any head axes shared with A).
    rank_axis = first.b.ndim - len(first.factorization.out) - 1
    b_shape = first.b.shape[:rank_axis] + (rank,) + first.b.shape[rank_axis + 1:]
    for pair in pairs:
        got_a = pair.a.shape[:-1] + (rank,)
        got_b = pair.b.shape[:rank_axis] + (rank,) + pair.b.shape[rank_axis + 1:]
        if (got_a, got_b) != (a_shape, b_shape):
            raise ValueError(f"members' adapters at {path!r} do not fit one weight: A "
                             f"{pair.a.shape} and B {pair.b.shape} against A {first.a.shape} "
                             f"and B {first.b.shape}")
    # Arrays beside A and B (a DoRA magnitude) do not depend on the rank: one shape for all.
    others = {k: v for k, v in first.arrays().items() if k not in ("a", "b")}
    for pair in pairs:
        for k, v in others.items():
            if np.shape(pair.arrays()[k]) != np.shape(v):
                raise ValueError(f"members' adapters at {path!r} do not fit one weight: {k} "
                                 f"{np.shape(pair.arrays()[k])} against {np.shape(v)}")
    scales = {pair.scale for pair in pairs}
    scale = scales.pop() if len(scales) == 1 else None
    abstract = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in others.items()}
    pair = first.replace(a=jax.ShapeDtypeStruct(a_shape, first.a.dtype),
                         b=jax.ShapeDtypeStruct(b_shape, first.b.dtype),
                         scale=1.0 if scale is None else scale, **abstract)
    return pair, scale is not None


def stack_states(
    states: Sequence[TrainState],
    frozen: Mapping,
    txs: Sequence[optax.GradientTransformation],
) -> StackedState:
    """Pads the members' states to one layout and stacks them (see :class:`StackedState`).

    Args:
      states: one ``TrainState`` per member, as its own run would start (e.g. from
        ``lowrank.train.init_state``).
      frozen: the shared frozen tree (values for full-rank leaves some members don't train).
      txs: each member's optimizer: the structure of its state on the stack's trainable
        tree (``jax.eval_shape``), filled with the member's own optimizer state; entries it
        lacks (targets or leaves it does not train) start at zero, as AdamW's moments do.
    """
    if not states:
        raise ValueError("stack_states needs at least one member state, got none")
    if len(txs) != len(states):
        raise ValueError(f"got {len(states)} states but {len(txs)} optimizers: one per member")
    union, multipliers = _union_trainable([s.trainable for s in states], frozen)
    # The union's full-rank leaves hold the frozen value (for members that don't train
    # them); everything else a member lacks starts at zero, as adapters' padding and AdamW's
    # moments do.
    fill = lambda path, leaf: leaf if isinstance(leaf, np.ndarray) else np.zeros(  # noqa: E731
        leaf.shape, leaf.dtype)
    zero = lambda path, leaf: np.zeros(leaf.shape, leaf.dtype)  # noqa: E731
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), union)
    members, masks = [], []
    for state, tx in zip(states, txs, strict=True):
        trainable = transfer(union, state.trainable, fill)
        opt_state = transfer(jax.eval_shape(tx.init, shapes), state.opt_state, zero)
        members.append(state.replace(trainable=trainable, opt_state=opt_state,
                                     step=np.asarray(state.step), rng=np.asarray(state.rng)))
        ones = jax.tree.map(lambda x: np.ones(np.shape(x), bool), state.trainable)
        masks.append(transfer(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, bool),
                                           shapes), ones, zero))
    stack = lambda *xs: np.stack(xs)  # noqa: E731
    return jax.device_put(StackedState(jax.tree.map(stack, *members),
                                       jax.tree.map(stack, *masks), multipliers))


def member_state(stacked: StackedState, index: int, template: TrainState) -> TrainState:
    """Member ``index``'s state in its own layout, that of ``template`` (its state at the
    start, or ``jax.eval_shape`` of it): its own ranks, targets and scales.

    >>> from lowrank.lora import LoraPair
    >>> def member(rank):
    ...     pair = LoraPair(jnp.ones((4, rank)), jnp.zeros((rank, 3)), scale=1.0 / rank)
    ...     return TrainState.create({"d": {"kernel": pair}}, optax.sgd(0.1), jax.random.key(0))
    >>> states = [member(1), member(2)]
    >>> stacked = stack_states(states, {}, [optax.sgd(0.1)] * 2)
    >>> member_state(stacked, 0, states[0]).trainable["d"]["kernel"].a.shape
    (4, 1)
    """
    one = jax.tree.map(lambda x: np.asarray(x)[index], jax.device_get(stacked.train))

    def missing(path, leaf):
        raise ValueError(f"the stack has no {paths.path_str(path)!r}: this template is not "
                         f"one of its members")

    return jax.device_put(transfer(template, one, missing))


def unstack_states(stacked: StackedState, templates: Sequence[TrainState]) -> list[TrainState]:
    """Every member's state in its own layout (see :func:`member_state`)."""
    if len(templates) != stacked.size:
        raise ValueError(f"the stack has {stacked.size} members but {len(templates)} "
                         "templates were given")
    stacked = jax.device_get(stacked)  # one transfer, then slicing on the host
    return [member_state(stacked, i, t) for i, t in enumerate(templates)]
