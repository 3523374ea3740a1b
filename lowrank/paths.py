"""Parameter paths: '/'-joined names of the leaves of a nested-dict pytree.

A path such as ``"encoder/layer_0/attention/self/query/kernel"`` is what ``LoraSpec`` regexes
match against, what error messages name, and what PEFT names are translated from.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax

SEP = "/"


def key_name(key: Any) -> str:
    """The name of one entry of a ``jax.tree_util`` key path.

    >>> key_name(jax.tree_util.DictKey("kernel"))
    'kernel'
    """
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(key_path: tuple) -> str:
    """Joins a ``jax.tree_util`` key path into a '/'-separated string.

    >>> path, _ = jax.tree_util.tree_flatten_with_path({"a": {"b": 1}})[0][0]
    >>> path_str(path)
    'a/b'
    """
    return SEP.join(key_name(k) for k in key_path)


def flatten(tree: Mapping, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """Flattens a nested dict into ``{path: leaf}`` in deterministic (sorted-key) order.

    Only dicts are descended into, so pytree leaves such as ``QuantizedArray`` or
    ``LoraPair`` stay whole.

    >>> flatten({"dense": {"kernel": 1, "bias": 2}})
    {'dense/bias': 2, 'dense/kernel': 1}
    """
    del is_leaf  # dict-only traversal already keeps custom nodes whole
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k in sorted(node, key=str):
                walk(node[k], f"{prefix}{SEP}{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(tree, "")
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten`.

    >>> unflatten({"dense/kernel": 1, "dense/bias": 2})
    {'dense': {'kernel': 1, 'bias': 2}}
    """
    root: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split(SEP)
        node = root
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return root


def params_of(tree: Mapping) -> Mapping:
    """Accepts either a params tree or flax ``variables`` (``{"params": ...}``) and returns params.

    >>> params_of({"params": {"w": 1}})
    {'w': 1}
    """
    if isinstance(tree, Mapping) and set(tree) == {"params"}:
        return tree["params"]
    return tree


def select(paths: list[str] | Mapping[str, Any], pattern: str | None) -> list[str]:
    """The paths that ``re.fullmatch`` the pattern (none when the pattern is None).

    >>> select(["a/kernel", "a/bias"], r".*kernel")
    ['a/kernel']
    """
    if pattern is None:
        return []
    regex = re.compile(pattern)
    return [p for p in paths if regex.fullmatch(p)]


def first_match(path: str, patterns: Mapping[str, Any] | tuple, default: Any) -> Any:
    """The value of the first ``(regex, value)`` whose regex fullmatches ``path``.

    >>> first_match("l0/query/kernel", {r".*query.*": 4}, 8)
    4
    """
    items = patterns.items() if isinstance(patterns, Mapping) else patterns
    for pattern, value in items:
        if re.fullmatch(pattern, path):
            return value
    return default


def candidates_hint(paths: list[str], limit: int = 20) -> str:
    """A short listing of paths for error messages.

    >>> candidates_hint(["a", "b"])
    'a, b'
    """
    shown = ", ".join(paths[:limit])
    more = len(paths) - limit
    return shown + (f", ... ({more} more)" if more > 0 else "")


def tree_paths(tree: Any) -> list[str]:
    """All leaf paths of any pytree (custom nodes are descended into).

    >>> tree_paths({"a": [1, 2]})
    ['a/0', 'a/1']
    """
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
