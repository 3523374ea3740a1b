"""PEFT LoRA adapters, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT names a LoRA pair after the module it adapts, ``base_model.model.<module>.lora_A.weight``
``[r, in]`` and ``...lora_B.weight`` ``[out, r]``; for our Dense kernel ``[in, out]`` these are
``a.T`` and ``b.T``. DoRA (``use_dora``) adds ``...<module>.lora_magnitude_vector`` ``[out]``
(no ``.weight``), our ``DoraPair.magnitude``. Full-rank trained modules (``modules_to_save``)
are stored under their own tensor names. Module names come from :mod:`lowrank.interop.naming`
(the models' one name map), target selection follows PEFT's own matching rules (ported in
:func:`lowrank.interop.peft_format.peft_targets`).

What PEFT cannot express, and :func:`save` refuses with an error: adapters on anything but a
Dense kernel (embeddings, convolutions, einsums), training part of a module (a bias or a norm
scale alone, or a weight that also has an adapter), a trained tied embedding, different
dropout rates per adapter, and LoRA mixed with DoRA (PEFT's ``use_dora`` is one switch). What
:func:`load` refuses: LoRA biases, ``bias != "none"``, ``fan_in_fan_out``, layer replication
and every other option that changes the computation.

>>> spec, adapters = load("path/to/peft-adapter", params, model)  # doctest: +SKIP
>>> save("out/", spec, adapters, model)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np

from lowrank import paths
from lowrank.adapters import check_fits, shape_of
from lowrank.dora import DoraPair
from lowrank.interop import naming
from lowrank.interop.peft_format import (  # noqa: F401 (CONFIG_FILE, WEIGHTS_FILE, read_config: re-exported)
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    alternation,
    check_tensor_names,
    linear_targets,
    pattern_value,
    peft_targets,
    read_config,
    read_tensors,
    saved_modules,
    stack_layers,
    write_adapter,
)
from lowrank.layers import MATRIX
from lowrank.lora import LoraPair
from lowrank.method import is_adapter
from lowrank.models import hf
from lowrank.spec import LoraSpec

MAGNITUDE = "lora_magnitude_vector"
# PEFT's task class for our models; others load as a plain PeftModel (task_type None), which
# also keeps PEFT from adding a classifier to modules_to_save on its own.
_TASK_TYPES = {"LlamaForCausalLM": "CAUSAL_LM"}


# ----------------------------------------------------------------------------- saving


def _alpha(spec: LoraSpec, path: str, pair: LoraPair) -> float:
    alpha = spec.alpha_for(path)
    if math.isclose(spec.scale_for(pair.rank, alpha), pair.scale, rel_tol=1e-9):
        return alpha
    return pair.scale * (math.sqrt(pair.rank) if spec.rslora else pair.rank)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: Mapping[str, Any]) -> Any:
    counts = collections.Counter(values.values())
    return max(counts, key=lambda v: (counts[v], -v))


def _check_pair(path: str, pair: LoraPair, stacked: bool) -> None:
    if type(pair) not in (LoraPair, DoraPair):
        raise ValueError(f"adapter at {path!r} is {type(pair).__name__} ({pair.kind}): PEFT "
                         "LoRA files hold LoRA and DoRA adapters only (VeRA and AdaLoRA files: "
                         "lowrank.interop.peft_vera, lowrank.interop.peft_adalora)")
    if naming.leaf_name(path) != "kernel" or pair.equation != MATRIX.equation:
        raise ValueError(
            f"adapter at {path!r} cannot be written as PEFT LoRA: PEFT files hold adapters of "
            "Linear weights (our Dense kernels); embeddings and other layers are not supported"
        )
    if pair.a.ndim != 2 + stacked:
        raise ValueError(
            f"adapter at {path!r} has A of shape {tuple(pair.a.shape)}: expected [in, r]"
            + (" with one leading layer axis" if stacked else "")
        )


def _module_tensors(
    flat: Mapping[str, Any], index: Mapping[str, naming.Slot], model: nn.Module
) -> tuple[dict[str, np.ndarray], list[str]]:
    """PEFT tensors of the full-rank trained leaves, and the modules they fill completely."""
    by_module = naming.modules(index)
    tensors: dict[str, np.ndarray] = {}
    saved = []
    trained = {(s.path, s.layer) for s in index.values() if s.path in flat}
    for module, members in by_module.items():
        have = [n for n, s in members.items() if (s.path, s.layer) in trained]
        if not have:
            continue
        lacking = [n for n in members if n not in have]
        if lacking:
            raise ValueError(
                f"trainable leaves {[members[n].path for n in have]} cannot be written as PEFT "
                f"modules_to_save: PEFT trains whole modules, and {module}.{lacking[0]} is not "
                "trained. Train all of the module's parameters, or merge the model instead"
            )
        if getattr(model.config, "tie_word_embeddings", False) and "embed_tokens" in module:
            raise ValueError(
                f"{module} is tied to the output layer: PEFT's modules_to_save does not keep "
                "the tie, so a trained tied embedding cannot be written as a PEFT adapter"
            )
        for n, s in members.items():
            value = naming.slice_of(flat[s.path], s)
            tensors[f"{PREFIX}{module}.{n}"] = np.asarray(hf.to_hf_tensor(s.path, value))
        saved.append(module)
    return tensors, saved


def save(
    directory: str | Path,
    spec: LoraSpec,
    adapters: Mapping,
    model: nn.Module,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes ``adapters`` as a PEFT LoRA adapter that ``PeftModel.from_pretrained`` loads
    onto the matching transformers model.

    Ranks and alphas come from the adapters themselves (``alpha = scale * r``, or
    ``scale * sqrt(r)`` with ``spec.rslora``); the most common pair becomes ``r`` and
    ``lora_alpha`` and the others go to ``rank_pattern`` / ``alpha_pattern`` under their full
    module names. ``target_modules`` is a list of module names when that selects exactly the
    adapted modules (PEFT's rules), else a regex of the full names. Full-rank trained leaves
    become ``modules_to_save`` when they make up whole modules.

    Args:
      directory: created if missing.
      spec: the ``LoraSpec`` the adapters were made with (its ``rslora`` and alphas).
      adapters: the trainable tree (``LoraPair`` at Dense kernels, looped or scanned).
      model: the model the adapters belong to (names the modules as transformers does).
      base_model_name_or_path: recorded in the config for PEFT's convenience.

    >>> save("out/peft", spec, adapters, model)  # doctest: +SKIP
    PosixPath('out/peft')
    """
    arch = hf.architecture_of(model)
    flat = paths.flatten(adapters)
    pairs = {p: v for p, v in flat.items() if is_adapter(v)}
    if not pairs:
        raise ValueError("adapters hold no LoraPair: a PEFT LoRA adapter needs at least one")
    kinds = {pair.kind for pair in pairs.values()}
    if len(kinds) > 1:
        raise ValueError(f"adapters mix {sorted(kinds)}: PEFT's use_dora is one switch for "
                         "every adapter of a file; save them as two adapters")
    use_dora = kinds == {"dora"}
    dropouts = {pair.dropout for pair in pairs.values()}
    if len(dropouts) > 1:
        raise ValueError(f"adapters use dropout rates {sorted(dropouts)}: PEFT has one rate")
    abstract = hf.abstract_params(model)
    check_fits(paths.flatten(abstract), flat)
    index = naming.tensor_index(model, abstract)
    slots_of: dict[str, list[tuple[str, naming.Slot]]] = collections.defaultdict(list)
    for key, slot in index.items():
        slots_of[slot.path].append((key, slot))

    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, pair in pairs.items():
        _check_pair(path, pair, hf.is_stacked(path, arch.layer_list))
        alpha = _number(_alpha(spec, path, pair))
        for key, slot in slots_of[path]:
            module = naming.module_of(key)
            tensors[f"{PREFIX}{module}.lora_A.weight"] = np.asarray(naming.slice_of(pair.a, slot)).T
            tensors[f"{PREFIX}{module}.lora_B.weight"] = np.asarray(naming.slice_of(pair.b, slot)).T
            if use_dora:
                tensors[f"{PREFIX}{module}.{MAGNITUDE}"] = np.asarray(
                    naming.slice_of(pair.magnitude, slot))
            ranks[module], alphas[module] = int(pair.rank), alpha
    leaves = {p: v for p, v in flat.items() if not is_adapter(v)}
    leaf_tensors, saved = _module_tensors(leaves, index, model)
    clash = sorted(set(saved) & set(ranks))
    if clash:
        raise ValueError(f"{clash[0]} has both an adapter and trained full-rank parameters: "
                         "PEFT cannot express that (modules_to_save excludes LoRA)")
    tensors.update(leaf_tensors)

    rank, alpha = _most_common(ranks), _most_common(alphas)
    adapted = sorted(ranks)
    all_modules = sorted(naming.modules(index))
    names = sorted({m.rpartition(".")[2] for m in adapted})
    config = {
        "peft_type": "LORA",
        "task_type": _TASK_TYPES.get(type(model).__name__),
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": bool(spec.rslora),
        "lora_dropout": float(dropouts.pop()),
        "target_modules": names,
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != alpha},
        "modules_to_save": saved or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": use_dora,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    assert saved_modules(config, all_modules) == sorted(saved), "modules_to_save mismatch"
    return write_adapter(directory, config, tensors, all_modules, adapted)





def load(directory: str | Path, params: Mapping, model: nn.Module) -> tuple[LoraSpec, dict]:
    """Reads a PEFT LoRA adapter onto our ``model``: ``(spec, adapters)``.

    Every module that the config targets (PEFT's matching rules, ``rank_pattern`` and
    ``alpha_pattern`` included) must have its ``lora_A``/``lora_B`` tensors (and
    ``lora_magnitude_vector`` with ``use_dora``: DoRA adapters), every tensor must
    belong to a targeted module or a ``modules_to_save`` module, and every shape must fit;
    otherwise a ValueError lists what is wrong. ``spec`` reproduces the adapter's structure
    (exact paths, ranks, alphas, rsLoRA, dropout, trained leaves).

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the model's params (arrays, quantized arrays or shapes; looped or scanned).
      model: the model (names the modules as transformers does).

    >>> spec, adapters = load("peft-adapter/", params, model)  # doctest: +SKIP
    >>> y = lowrank.apply(model, params, adapters, input_ids)  # doctest: +SKIP
    """
    directory = Path(directory)
    config = read_config(directory)
    tensors = read_tensors(directory)
    by_module = naming.modules(naming.tensor_index(model, params))
    targets, saved = linear_targets(directory, config, by_module, model, "LoRA")

    use_dora = config.get("use_dora", False)
    if use_dora not in (False, True):
        raise ValueError(f"{directory / CONFIG_FILE}: use_dora={use_dora!r} is not a boolean")
    expected = {f"{PREFIX}{m}.lora_{w}.weight" for m in targets for w in "AB"}
    expected |= {f"{PREFIX}{m}.{MAGNITUDE}" for m in targets if use_dora}
    expected |= {f"{PREFIX}{m}.{n}" for m in saved for n in by_module[m]}
    check_tensor_names(directory, tensors, expected, model)

    flat_params = paths.flatten(paths.params_of(params))
    rank0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    rslora, dropout = bool(config.get("use_rslora", False)), float(config.get("lora_dropout", 0))
    factors: dict[str, dict] = collections.defaultdict(dict)
    settings: dict[str, set] = collections.defaultdict(set)
    for m in targets:
        slot = by_module[m]["weight"]
        in_f, out_f = shape_of(flat_params[slot.path])[-2:]
        rank = pattern_value(config.get("rank_pattern") or {}, m, rank0)
        alpha = pattern_value(config.get("alpha_pattern") or {}, m, alpha0)
        a_key, b_key = f"{PREFIX}{m}.lora_A.weight", f"{PREFIX}{m}.lora_B.weight"
        for key, want in ((a_key, (rank, in_f)), (b_key, (out_f, rank))):
            if tuple(tensors[key].shape) != want:
                raise ValueError(
                    f"{key} has shape {tuple(tensors[key].shape)}; with r={rank} and the "
                    f"weight {slot.path!r} of shape [in={in_f}, out={out_f}] it must be {want}"
                )
        magnitude = None
        if use_dora:
            m_key = f"{PREFIX}{m}.{MAGNITUDE}"
            magnitude = tensors[m_key]
            if tuple(magnitude.shape) != (out_f,):
                raise ValueError(f"{m_key} has shape {tuple(magnitude.shape)}; DoRA keeps one "
                                 f"magnitude per output unit of {slot.path!r}: ({out_f},)")
        factors[slot.path][slot.layer] = (tensors[a_key].T, tensors[b_key].T, magnitude)
        settings[slot.path].add((rank, alpha))

    flat: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, per_layer in factors.items():
        if len(settings[path]) > 1:
            raise ValueError(f"layers of the scanned {path!r} have different (rank, alpha) "
                             f"{sorted(settings[path])}: load onto a model without scan_layers")
        (rank, alpha), = settings[path]
        a = stack_layers({i: f[0] for i, f in per_layer.items()}, path, flat_params, "LoRA")
        b = stack_layers({i: f[1] for i, f in per_layer.items()}, path, flat_params, "LoRA")
        scale = float(alpha) / (math.sqrt(rank) if rslora else rank)
        flat[path] = LoraPair(a, b, scale=scale, equation=MATRIX.equation, dropout=dropout)
        if use_dora:
            magnitude = stack_layers({i: f[2] for i, f in per_layer.items()}, path, flat_params,
                               "DoRA")
            flat[path] = DoraPair(**flat[path].arrays(), **flat[path].statics(),
                                  magnitude=magnitude)
        ranks[path], alphas[path] = rank, alpha
    trained = collections.defaultdict(dict)
    for m in saved:
        for n, slot in by_module[m].items():
            trained[slot.path][slot.layer] = hf.from_hf_tensor(slot.path,
                                                               tensors[f"{PREFIX}{m}.{n}"])
    for path, per_layer in trained.items():
        flat[path] = stack_layers(per_layer, path, flat_params, "modules_to_save weights")
    adapters = paths.unflatten(flat)
    check_fits(flat_params, flat)

    spec = LoraSpec(
        rank=rank0, alpha=alpha0, targets=alternation(factors), dropout=dropout,
        rslora=rslora, trainable=alternation(trained), method="dora" if use_dora else "lora",
        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != rank0},
        alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != alpha0},
    )
    return spec, adapters
