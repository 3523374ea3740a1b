"""Adapters-only export for sharing: ``adapters.safetensors`` plus ``adapters.json``.

The safetensors file holds the arrays (``<path>/<field>`` for each adapter leaf's arrays,
``<path>/a`` and ``<path>/b`` for LoRA; ``<path>`` for each full-rank trained leaf); the JSON
file holds what arrays cannot: each adapter's statics (scale, einsum equation, dropout) and
kind (``"lora"`` when absent), the LoRA settings, and the base the adapters were trained on
(source and sha256). Neither file needs orbax, JAX or pickle to read.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from safetensors.flax import save_file

from lowrank import paths
from lowrank.files import read_json, read_safetensors
from lowrank.lora import LoraPair  # noqa: F401  (doctests)
from lowrank.method import adapter_class, is_adapter

FORMAT = "lowrank-adapters"
WEIGHTS = "adapters.safetensors"
INDEX = "adapters.json"


def export_adapters(
    directory: str | pathlib.Path,
    trainable: Mapping,
    *,
    lora: Mapping | None = None,
    base: Mapping | None = None,
    ranks: Mapping | None = None,
) -> pathlib.Path:
    """Writes the trainable tree to ``directory`` (created if needed); returns the directory.

    Args:
      trainable: the adapters tree (adapter leaves and full-rank leaves).
      lora: the LoRA settings to record (e.g. the ``config.lora`` fields).
      base: where the frozen base came from, e.g. ``{"source": ..., "sha256": ...}``.
      ranks: the final rank of each adapted matrix, recorded as ``"ranks"`` (AdaLoRA's,
        from :func:`lowrank.adalora_budget.ranks`).

    >>> import tempfile
    >>> pair = LoraPair(jnp.ones((4, 2)), jnp.zeros((2, 3)), scale=2.0)
    >>> out = export_adapters(tempfile.mkdtemp(), {"d": {"kernel": pair}})
    >>> load_adapters(out)["d"]["kernel"].scale
    2.0
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays, pairs, leaves = {}, {}, []
    for p, leaf in paths.flatten(trainable).items():
        if is_adapter(leaf):
            arrays.update({f"{p}/{k}": jnp.asarray(v) for k, v in leaf.arrays().items()})
            pairs[p] = leaf.statics() | ({} if leaf.kind == "lora" else {"kind": leaf.kind})
        else:
            arrays[p] = jnp.asarray(leaf)
            leaves.append(p)
    save_file(arrays, str(directory / WEIGHTS))
    index = {"format": FORMAT, "version": 1, "pairs": pairs, "leaves": leaves,
             "lora": dict(lora or {}), "base": dict(base or {})}
    if ranks is not None:
        index["ranks"] = dict(ranks)
    (directory / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
    return directory


def read_index(directory: str | pathlib.Path) -> dict:
    """The JSON half of an export (settings and base), checked to be one.

    >>> import tempfile
    >>> read_index(export_adapters(tempfile.mkdtemp(), {"w": jnp.ones(2)}))["leaves"]
    ['w']
    """
    path = pathlib.Path(directory) / INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: expected an adapters export ({INDEX} and {WEIGHTS}) "
            "written by lowrank.train.export_adapters"
        )
    index = read_json(path, "an adapters export's index")
    found = index.get("format") if isinstance(index, dict) else type(index).__name__
    if found != FORMAT:
        raise ValueError(f"{path} is not a lowrank adapters export: format is {found!r}, "
                         f"expected {FORMAT!r}")
    return index


def load_adapters(directory: str | pathlib.Path) -> dict:
    """The trainable tree written by :func:`export_adapters`, adapter statics included.

    >>> import tempfile
    >>> load_adapters(export_adapters(tempfile.mkdtemp(), {"w": jnp.ones(2)}))["w"].tolist()
    [1.0, 1.0]
    """
    index = read_index(directory)
    arrays: dict[str, Any] = read_safetensors(pathlib.Path(directory) / WEIGHTS,
                                              "an adapters export's arrays")
    flat: dict[str, Any] = {}
    for p, statics in index["pairs"].items():
        statics = dict(statics)
        cls = adapter_class(statics.pop("kind", "lora"))
        names = {k.rpartition("/")[2] for k in arrays if k.rpartition("/")[0] == p}
        flat[p] = cls.from_arrays({k: arrays[f"{p}/{k}"] for k in sorted(names)}, statics)
    for p in index["leaves"]:
        flat[p] = arrays[p]
    return paths.unflatten(flat)
