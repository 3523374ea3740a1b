"""PEFT AdaLoRA adapters, both ways (``peft_type: ADALORA``).

PEFT stores, per adapted module, ``base_model.model.<module>.lora_A`` ``[k, in]``,
``.lora_E`` ``[k, 1]`` and ``.lora_B`` ``[out, k]`` (no ``.weight``), where ``k`` is the
rank the module kept: the config's ``rank_pattern`` maps ``<module>.lora_E`` to one bool per
initial rank (``init_r`` of them), and the file holds only the kept ones. The scale is
``lora_alpha / (init_r + 1e-5)`` whatever ``k`` is. Our :class:`~lowrank.adalora.AdaLoraTriplet`
keeps the initial rank (shapes stay static): loading pads the kept ranks with zeros to
``init_r`` (a zero ``lambda`` adds nothing), saving writes the nonzero ``lambda`` entries.

The budget settings (``target_r``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``,
``orth_reg_weight``, ``total_step``) do not change what a saved adapter computes; :func:`save`
writes those it is given, :func:`load` returns them. Refused by name: full-rank trained modules
(``modules_to_save``), adapters on anything but Linear layers (our Dense kernels), and every
option :func:`lowrank.interop.peft_format.read_config` refuses for LoRA.

>>> spec, adapters, budget = load("path/to/adalora-adapter", params, model)  # doctest: +SKIP
>>> save("out/", adapters, model, total_steps=1000, target_rank=4)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from lowrank import paths
from lowrank.adalora import AdaLoraTriplet, scale_of
from lowrank.adapters import check_fits, shape_of
from lowrank.interop import naming
from lowrank.interop.peft_format import (
    CONFIG_FILE,
    PREFIX,
    alternation,
    check_tensor_names,
    linear_targets,
    only_adapters,
    read_config,
    read_tensors,
    stack_layers,
    write_adapter,
)
from lowrank.layers import MATRIX
from lowrank.models import hf
from lowrank.spec import LoraSpec

# AdaLoRA's own options: the budget's (returned by load) and the initial rank.
BUDGET = {"target_r": "target_rank", "tinit": "tinit", "tfinal": "tfinal",
          "deltaT": "delta_t", "beta1": "beta1", "beta2": "beta2",
          "orth_reg_weight": "orth_reg_weight", "total_step": "total_steps"}
_READS = {"init_r", "use_rslora", *BUDGET}


def _kept(config: Mapping, module: str, init_r: int, where: Path) -> np.ndarray:
    pattern = (config.get("rank_pattern") or {}).get(f"{module}.lora_E")
    if pattern is None:
        return np.ones(init_r, bool)
    kept = np.asarray(pattern, bool)
    if kept.shape != (init_r,):
        raise ValueError(f"{where}: rank_pattern[{module + '.lora_E'!r}] has {kept.size} "
                         f"entries; init_r={init_r} needs one bool per initial rank")
    return kept


def load(directory: str | Path, params: Mapping, model: nn.Module
         ) -> tuple[LoraSpec, dict, dict[str, Any]]:
    """Reads a PEFT AdaLoRA adapter onto ``model``: ``(spec, adapters, budget)``.

    ``spec`` is ``LoraSpec(method="adalora")`` with the initial rank and alpha; ``adapters``
    hold :class:`~lowrank.adalora.AdaLoraTriplet` leaves at the initial rank (the masked
    ranks zero); ``budget`` holds the file's budget settings under
    :func:`lowrank.adalora_budget.adalora_budget`'s names (and ``orth_reg_weight``).

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the model's params (arrays, quantized arrays or shapes; looped or scanned).
      model: the model (names the modules as transformers does).

    >>> spec, adapters, budget = load("adalora-adapter/", params, model)  # doctest: +SKIP
    """
    directory = Path(directory)
    config = read_config(directory, peft_type="ADALORA", reads=_READS)
    where = directory / CONFIG_FILE
    tensors = read_tensors(directory)
    by_module = naming.modules(naming.tensor_index(model, params))
    targets, saved = linear_targets(directory, config, by_module, model, "AdaLoRA")
    if saved:
        raise ValueError(f"{where}: modules_to_save is not supported for AdaLoRA files")
    expected = {f"{PREFIX}{m}.lora_{w}" for m in targets for w in "AEB"}
    check_tensor_names(directory, tensors, expected, model)
    init_r = int(config.get("init_r", 12))
    alpha = config.get("lora_alpha", 8)
    dropout = float(config.get("lora_dropout", 0.0))
    flat_params = paths.flatten(paths.params_of(params))
    per_path: dict[str, dict] = {}
    for m in targets:
        slot = by_module[m]["weight"]
        in_f, out_f = shape_of(flat_params[slot.path])[-2:]
        kept = _kept(config, m, init_r, where)
        k = int(kept.sum())
        got = {w: tensors[f"{PREFIX}{m}.lora_{w}"] for w in "AEB"}
        for w, want in (("A", (k, in_f)), ("E", (k, 1)), ("B", (out_f, k))):
            if tuple(got[w].shape) != want:
                raise ValueError(f"{PREFIX}{m}.lora_{w} has shape {tuple(got[w].shape)}; with "
                                 f"{k} kept ranks and the weight {slot.path!r} [in={in_f}, "
                                 f"out={out_f}] it must be {want}")
        a, e, b = (np.zeros((in_f, init_r), np.float32), np.zeros(init_r, np.float32),
                   np.zeros((init_r, out_f), np.float32))
        a[:, :k], e[:k], b[:k] = np.asarray(got["A"]).T, np.asarray(got["E"])[:, 0], \
            np.asarray(got["B"]).T
        per_path.setdefault(slot.path, {})[slot.layer] = (a, e, b)

    flat: dict[str, Any] = {}
    for path, layers in per_path.items():
        a, e, b = (stack_layers({i: v[j] for i, v in layers.items()}, path, flat_params, "AdaLoRA")
                   for j in range(3))
        flat[path] = AdaLoraTriplet(jnp.asarray(a), jnp.asarray(b), e=jnp.asarray(e),
                                    scale=scale_of(alpha, init_r), equation=MATRIX.equation,
                                    dropout=dropout, init_rank=init_r)
    check_fits(flat_params, flat)
    spec = LoraSpec(rank=init_r, alpha=alpha if alpha > 0 else init_r,
                    targets=alternation(flat), dropout=dropout, method="adalora")
    budget = {ours: config[theirs] for theirs, ours in BUDGET.items() if theirs in config}
    return spec, paths.unflatten(flat), budget


def save(directory: str | Path, adapters: Mapping, model: nn.Module, *,
         total_steps: int, target_rank: int, tinit: int = 0, tfinal: int = 0,
         delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85,
         orth_reg_weight: float = 0.5, base_model_name_or_path: str | None = None) -> Path:
    """Writes AdaLoRA ``adapters`` as a PEFT AdaLoRA adapter (``PeftModel.from_pretrained``
    loads it): each module's nonzero ``lambda`` ranks, and a ``rank_pattern`` saying which.

    The budget arguments are recorded as PEFT's ``AdaLoraConfig`` (which requires
    ``total_step``); they do not change the adapter's outputs.

    Args:
      directory: created if missing.
      adapters: the trainable tree (AdaLoRA leaves at Dense kernels, looped or scanned; one
        initial rank, alpha and dropout for all, as PEFT's config has).
      model: the model the adapters belong to (names the modules as transformers does).

    >>> save("out/adalora", adapters, model, total_steps=100, target_rank=2)  # doctest: +SKIP
    PosixPath('out/adalora')
    """
    hf.architecture_of(model)  # refuses a model transformers has no names for
    flat = only_adapters(adapters, AdaLoraTriplet, "AdaLoRA")
    settings = {(v.init_rank, round(v.scale * (v.init_rank + 1e-5), 6), v.dropout)
                for v in flat.values()}
    if len(settings) > 1:
        raise ValueError(f"adapters differ in (init_rank, alpha, dropout) {sorted(settings)}: "
                         "PEFT's AdaLoraConfig has one of each")
    (init_r, alpha, dropout), = settings
    abstract = hf.abstract_params(model)
    check_fits(paths.flatten(abstract), flat)
    index = naming.tensor_index(model, abstract)
    tensors: dict[str, np.ndarray] = {}
    pattern: dict[str, list[bool]] = {}
    for key, slot in index.items():
        leaf = flat.get(slot.path)
        if leaf is None:
            continue
        if naming.leaf_name(slot.path) != "kernel" or leaf.equation != MATRIX.equation:
            raise ValueError(f"adapter at {slot.path!r} is not on a Linear weight: PEFT "
                             "AdaLoRA files hold Linear adapters only")
        if leaf.a.ndim != 2 + (slot.layer is not None):
            raise ValueError(f"adapter at {slot.path!r} has A {tuple(leaf.a.shape)}; expected "
                             "[in, r] (with one leading layer axis when scanned)")
        a, e, b = (np.asarray(naming.slice_of(x, slot), np.float32)
                   for x in (leaf.a, leaf.e, leaf.b))
        kept = e != 0
        module = naming.module_of(key)
        tensors[f"{PREFIX}{module}.lora_A"] = a.T[kept]
        tensors[f"{PREFIX}{module}.lora_E"] = e[kept][:, None]
        tensors[f"{PREFIX}{module}.lora_B"] = b.T[:, kept]
        pattern[f"{module}.lora_E"] = kept.tolist()
    modules = sorted(p.rpartition(".")[0] for p in pattern)
    all_modules = sorted(naming.modules(index))
    config = {
        "peft_type": "ADALORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "init_r": int(init_r),
        "target_r": int(target_rank),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": float(dropout),
        "target_modules": sorted({m.rpartition(".")[2] for m in modules}),
        "rank_pattern": pattern,
        "tinit": int(tinit), "tfinal": int(tfinal), "deltaT": int(delta_t),
        "beta1": float(beta1), "beta2": float(beta2),
        "orth_reg_weight": float(orth_reg_weight), "total_step": int(total_steps),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return write_adapter(directory, config, tensors, all_modules, modules)
