"""PEFT's adapter directory, shared by every method's reader and writer (LoRA and DoRA in
:mod:`lowrank.interop.peft`, VeRA in :mod:`~lowrank.interop.peft_vera`, AdaLoRA in
:mod:`~lowrank.interop.peft_adalora`): its file names, the options lowrank honours, PEFT's
own rules for which modules an ``adapter_config.json`` selects (ported from PEFT's
``check_target_module_exists``), and the checks every reader makes on what a directory holds.

>>> peft_targets({"target_modules": ["v_proj"]}, ["model.layers.0.self_attn.v_proj"])
['model.layers.0.self_attn.v_proj']
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import safetensors.flax

from lowrank import paths
from lowrank.adapters import shape_of
from lowrank.files import BadFileError, read_json, read_safetensors
from lowrank.interop import naming

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Options with a fixed accepted value: any other value changes the computation.
_FIXED: dict[str, tuple] = {
    "peft_type": ("LORA",),
    "bias": ("none",),
    "fan_in_fan_out": (False,),
    "lora_bias": (False,),
    "use_qalora": (False,),
    "ensure_weight_tying": (False,),
}
_READ = {
    "use_dora", "r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout",
    "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
    "layers_pattern", "task_type",
}
# How the adapter was made or where it came from: no effect on what a saved adapter computes.
_INFORMATIONAL = {
    "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "init_lora_weights", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config",
}
# Heads PEFT's task models add to modules_to_save on their own.
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


# ----------------------------------------------------------------------------- PEFT's rules


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key ``k`` for which
    ``(.*\\.)?(k)$`` matches the module name from its start.

    >>> pattern_value({"v_proj": 2}, "model.layers.0.self_attn.v_proj", 8)
    2
    >>> pattern_value({"layers.1.self_attn.v_proj": 2}, "model.layers.0.self_attn.v_proj", 8)
    8
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _in_list(module: str, names: Iterable[str]) -> bool:
    return any(module == n or module.endswith("." + n) for n in names)


def _layer_index(module: str, layers_pattern: Any) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match:
                break
    return int(match["idx"]) if match else None


def peft_targets(config: Mapping, modules: Iterable[str]) -> list[str]:
    """The modules that PEFT's ``check_target_module_exists`` selects for LoRA.

    ``target_modules`` as a string is a regex that must fullmatch the module name; as a list,
    a name matches a module equal to it or ending in ``.name``, optionally restricted to
    ``layers_to_transform``. ``exclude_modules`` and ``modules_to_save`` take precedence.

    >>> peft_targets({"target_modules": ["query"]},
    ...              ["encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense"])
    ['encoder.layer.0.attention.self.query']
    """
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    saved = config.get("modules_to_save") or []
    out = []
    for m in modules:
        if exclude and (re.fullmatch(exclude, m) if isinstance(exclude, str)
                        else _in_list(m, exclude)):
            continue
        if any(re.match(rf"(^|.*\.){s}($|\..*)", m) for s in saved):
            continue
        if isinstance(targets, str):
            found = bool(re.fullmatch(targets, m))
        else:
            found = _in_list(m, targets)
            layers = config.get("layers_to_transform")
            if found and layers is not None and layers != []:
                index = _layer_index(m, config.get("layers_pattern"))
                wanted = [layers] if isinstance(layers, int) else layers
                found = index is not None and index in wanted
        if found:
            out.append(m)
    return out


def saved_modules(config: Mapping, modules: Iterable[str]) -> list[str]:
    """The modules PEFT trains in full: those whose name ends with a ``modules_to_save`` entry
    (plus the heads a task type adds, as PEFT's task models do). As in PEFT, names that match
    nothing are an error only when no name matches anything.

    >>> saved_modules({"modules_to_save": ["classifier", "score"]}, ["bert.pooler.dense",
    ...                                                              "classifier"])
    ['classifier']
    """
    modules = list(modules)
    names = list(config.get("modules_to_save") or [])
    names += [h for h in _TASK_HEADS.get(config.get("task_type"), ()) if h not in names]
    found = [m for m in modules if any(m.endswith(n) for n in names)]
    if names and not found:
        raise ValueError(f"modules_to_save {names} matches no module; modules: "
                         + _listing(modules))
    return found



# ----------------------------------------------------------------------------- writing


def only_adapters(adapters: Mapping, cls: type, method: str) -> dict[str, Any]:
    """The flattened ``adapters``, refusing anything but ``cls`` leaves (a file of one
    method's adapters holds no other method and no full-rank leaves) and an empty tree.

    >>> import numpy as np
    >>> from lowrank.lora import LoraPair
    >>> only_adapters({"w": np.ones(2)}, LoraPair, "VeRA")
    Traceback (most recent call last):
    ...
    ValueError: 'w' is a full-rank leaf: a PEFT VeRA file holds VeRA adapters only ...
    """
    flat = paths.flatten(adapters)
    others = [p for p, v in flat.items() if not isinstance(v, cls)]
    if others:
        kind = getattr(flat[others[0]], "kind", "a full-rank leaf")
        raise ValueError(f"{others[0]!r} is {kind}: a PEFT {method} file holds {method} "
                         "adapters only (no modules_to_save, no other methods)")
    if not flat:
        raise ValueError(f"adapters hold no {method} leaf")
    return flat


def write_adapter(directory: str | Path, config: dict, tensors: Mapping[str, Any],
                  all_modules: list[str], adapted: list[str]) -> Path:
    """Writes a PEFT adapter directory: ``config`` (its ``target_modules`` kept as module
    names when PEFT's rules then select exactly ``adapted``, else a regex of their full names)
    and ``tensors``.

    >>> import tempfile
    >>> import numpy as np
    >>> out = write_adapter(tempfile.mkdtemp(), {"target_modules": ["q"]},
    ...                     {"x": np.zeros(2, np.float32)}, ["a.q", "b.q"], ["a.q"])
    >>> print(json.loads((out / CONFIG_FILE).read_text())["target_modules"])
    (a\\.q)
    """
    if peft_targets(config, all_modules) != adapted:
        config["target_modules"] = "(" + "|".join(re.escape(m) for m in adapted) + ")"
    # PEFT's own matching rules must select exactly what is written.
    assert peft_targets(config, all_modules) == adapted, "target_modules selects other modules"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    safetensors.flax.save_file(
        {k: jnp.asarray(v) for k, v in sorted(tensors.items())},
        str(directory / WEIGHTS_FILE), metadata={"format": "pt"},
    )
    return directory



# ----------------------------------------------------------------------------- loading


def read_config(directory: str | Path, *, peft_type: str = "LORA",
                reads: Iterable[str] = ()) -> dict:
    """The parsed ``adapter_config.json``, checked for options lowrank cannot honour (a
    ``peft_type`` other than ``peft_type``; an option outside LoRA's and ``reads`` that is set).

    >>> read_config("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    FileNotFoundError: ...
    """
    file = Path(directory) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: a PEFT adapter directory holds {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}"
        )
    config = read_json(file, "PEFT's adapter config")
    if not isinstance(config, dict):
        raise BadFileError(f"{file}: expected a JSON object of PEFT options, got "
                           f"{type(config).__name__}")
    fixed = {**_FIXED, "peft_type": (peft_type,)}
    for name, accepted in fixed.items():
        if name in config and config[name] not in accepted:
            raise ValueError(
                f"{file}: {name}={config[name]!r} is not supported; accepted: "
                + " or ".join(repr(a) for a in accepted)
            )
    for name, value in config.items():
        if name in _FIXED or name in _READ or name in _INFORMATIONAL or name in reads:
            continue
        if value not in (None, False, {}, [], ""):
            raise ValueError(
                f"{file}: PEFT option {name}={value!r} is not supported (lowrank reads plain "
                f"LoRA; the options it reads are {sorted(_READ)})"
            )
    if config.get("target_modules") in (None, "all-linear"):
        raise ValueError(
            f"{file}: target_modules={config.get('target_modules')!r} is not supported; "
            "accepted: a list of module names or a regex (as PEFT writes after training)"
        )
    return config


def read_tensors(directory: Path) -> dict[str, Any]:
    file = directory / WEIGHTS_FILE
    if not file.is_file():
        found = sorted(p.name for p in directory.iterdir())
        hint = " (pickled adapter_model.bin is not read)" if "adapter_model.bin" in found else ""
        raise FileNotFoundError(f"{file} does not exist{hint}; found: {found}")
    return read_safetensors(file, "PEFT's adapter weights")


def _listing(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit
                                      else "")


def alternation(items: Iterable[str]) -> str | None:
    items = sorted(items)
    return "(" + "|".join(re.escape(p) for p in items) + ")" if items else None


def stack_layers(per_layer: Mapping[int | None, Any], path: str, params: Mapping, what: str) -> Any:
    """One array from the slices of a scanned stack (or the array of a looped weight)."""
    if None in per_layer:
        return per_layer[None]
    layers = shape_of(params[path])[0]
    if len(per_layer) != layers:
        raise ValueError(f"the adapter holds {what} for {len(per_layer)} of the {layers} layers "
                         f"of the scanned {path!r}: load it onto a model built without "
                         "scan_layers")
    return jnp.stack([per_layer[i] for i in range(layers)])


def linear_targets(directory: Path, config: Mapping, by_module: Mapping[str, Any],
                   model: nn.Module, method: str) -> tuple[list[str], list[str]]:
    """``(targets, modules_to_save)`` of a PEFT config over ``model``'s modules
    (:func:`lowrank.interop.naming.modules`), refusing targets that match nothing or are not
    Linear layers (our Dense kernels), naming ``method``.

    >>> linear_targets(Path("x"), {"target_modules": ["q"]}, {"a.q": {}}, None, "LoRA")
    Traceback (most recent call last):
    ...
    ValueError: target_modules selects a.q, which are not Linear layers: ...
    """
    all_modules = sorted(by_module)
    targets = peft_targets(config, all_modules)
    if not targets:
        raise ValueError(f"{directory / CONFIG_FILE}: target_modules="
                         f"{config.get('target_modules')!r} matches no module of "
                         f"{type(model).__name__}; modules: {_listing(all_modules)}")
    not_linear = [m for m in targets if "weight" not in by_module[m]
                  or naming.leaf_name(by_module[m]["weight"].path) != "kernel"]
    if not_linear:
        raise ValueError(f"target_modules selects {_listing(not_linear)}, which are not Linear "
                         f"layers: lowrank reads {method} on Linear layers only")
    return targets, saved_modules(config, all_modules)


def check_tensor_names(directory: Path, tensors: Mapping[str, Any], expected: set[str],
                       model: nn.Module) -> None:
    """Raises a ValueError listing the tensors the config implies and the file lacks, and
    those no targeted module takes.

    >>> check_tensor_names(Path("x"), {"a": 1}, {"a"}, None)
    """
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    problems = []
    if missing:
        problems.append(f"lacks {len(missing)} tensor(s) that {CONFIG_FILE} implies: "
                        + _listing(missing))
    if unexpected:
        problems.append(f"has {len(unexpected)} tensor(s) that no targeted module of "
                        f"{type(model).__name__} takes: " + _listing(unexpected))
    if problems:
        raise ValueError(f"{directory / WEIGHTS_FILE} " + "; and ".join(problems))
