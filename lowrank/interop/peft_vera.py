"""PEFT VeRA adapters, both ways (``peft_type: VERA``, ``save_projection=True``).

PEFT stores the shared frozen projections once, ``base_model.vera_A`` ``[r, max_in]`` and
``base_model.vera_B`` ``[max_out, r]`` (sized to the largest adapted layer, sliced per layer),
and per adapted module ``base_model.model.<module>.vera_lambda_d`` ``[r]`` and
``.vera_lambda_b`` ``[out]``. PEFT's projections come from torch's generator, which JAX cannot
reproduce, so :func:`load` puts them in the frozen tree (``"@vera"``, see
:mod:`lowrank.vera`) and returns that tree with the adapters. :func:`save` writes the
projections the adapters run with: the frozen tree's, or, for adapters made here, those
regenerated from their seed; PEFT then loads them from the file (``save_projection=True``).

Refused by name: files without the projections (``save_projection=False``: PEFT would
regenerate them with torch), ``modules_to_save``, VeRA on anything but Linear layers, and
every option :func:`lowrank.interop.peft_format.read_config` refuses for LoRA.

>>> spec, adapters, frozen = load("path/to/vera-adapter", params, model)  # doctest: +SKIP
>>> save("out/", adapters, model, frozen=frozen)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from lowrank import paths
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
from lowrank.models import hf
from lowrank.spec import LoraSpec
from lowrank.vera import PROJECTIONS, VeraAdapter, projections, with_projections

VERA_A, VERA_B = "base_model.vera_A", "base_model.vera_B"
_READS = {"save_projection", "projection_prng_key", "vera_dropout", "d_initial", "init_weights"}


def load(directory: str | Path, params: Mapping, model: nn.Module
         ) -> tuple[LoraSpec, dict, dict]:
    """Reads a PEFT VeRA adapter onto ``model``: ``(spec, adapters, frozen)``, ``frozen``
    being ``params`` with the file's projections added (run and merge over it).

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the model's params (arrays or quantized arrays; looped or scanned).
      model: the model (names the modules as transformers does).

    >>> spec, adapters, frozen = load("vera-adapter/", params, model)  # doctest: +SKIP
    >>> y = lowrank.apply(model, frozen, adapters, input_ids)  # doctest: +SKIP
    """
    directory = Path(directory)
    config = read_config(directory, peft_type="VERA", reads=_READS)
    where = directory / CONFIG_FILE
    if config.get("save_projection", True) is not True:
        raise ValueError(f"{where}: save_projection={config['save_projection']!r}: the file "
                         "lacks vera_A and vera_B, which PEFT regenerates with torch's "
                         "generator (not reproducible here); save it with save_projection=True")
    tensors = read_tensors(directory)
    by_module = naming.modules(naming.tensor_index(model, params))
    targets, saved = linear_targets(directory, config, by_module, model, "VeRA")
    if saved:
        raise ValueError(f"{where}: modules_to_save is not supported for VeRA files")
    expected = {f"{PREFIX}{m}.vera_lambda_{w}" for m in targets for w in "bd"}
    expected |= {VERA_A, VERA_B}
    check_tensor_names(directory, tensors, expected, model)
    rank = int(config.get("r", 256))
    proj_a, proj_b = np.asarray(tensors[VERA_A]), np.asarray(tensors[VERA_B])
    if proj_a.shape[0] != rank or proj_b.shape[1] != rank:
        raise ValueError(f"{VERA_A} {proj_a.shape} and {VERA_B} {proj_b.shape} do not have "
                         f"rank r={rank} ([r, max_in] and [max_out, r])")
    max_in, max_out = proj_a.shape[1], proj_b.shape[0]
    dropout = float(config.get("vera_dropout", 0.0))
    flat_params = paths.flatten(paths.params_of(params))
    per_path: dict[str, dict] = {}
    for m in targets:
        slot = by_module[m]["weight"]
        in_f, out_f = shape_of(flat_params[slot.path])[-2:]
        if in_f > max_in or out_f > max_out:
            raise ValueError(f"{m} is [in={in_f}, out={out_f}], larger than the projections "
                             f"[max_in={max_in}, max_out={max_out}]")
        d = np.asarray(tensors[f"{PREFIX}{m}.vera_lambda_d"])
        b = np.asarray(tensors[f"{PREFIX}{m}.vera_lambda_b"])
        if d.shape != (rank,) or b.shape != (out_f,):
            raise ValueError(f"{PREFIX}{m}: vera_lambda_d {d.shape} and vera_lambda_b "
                             f"{b.shape}; expected ({rank},) and ({out_f},)")
        per_path.setdefault(slot.path, {})[slot.layer] = (d, b, in_f)
    flat: dict[str, Any] = {}
    for path, layers in per_path.items():
        d = stack_layers({i: v[0] for i, v in layers.items()}, path, flat_params, "VeRA")
        b = stack_layers({i: v[1] for i, v in layers.items()}, path, flat_params, "VeRA")
        fan_in = next(iter(layers.values()))[2]
        flat[path] = VeraAdapter(jnp.asarray(d), jnp.asarray(b), fan_in=fan_in, max_in=max_in,
                                 max_out=max_out, dropout=dropout, stored=True,
                                 seed=int(config.get("projection_prng_key", 0)))
    check_fits(flat_params, flat)
    spec = LoraSpec(rank=rank, targets=alternation(flat), dropout=dropout, method="vera")
    frozen = with_projections(params, jnp.asarray(proj_a.T), jnp.asarray(proj_b.T))
    return spec, paths.unflatten(flat), frozen


def save(directory: str | Path, adapters: Mapping, model: nn.Module, *,
         frozen: Mapping | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Writes VeRA ``adapters`` as a PEFT VeRA adapter with its projections
    (``save_projection=True``), which ``PeftModel.from_pretrained`` loads.

    Args:
      directory: created if missing.
      adapters: the trainable tree (VeRA leaves at Dense kernels, looped or scanned; one
        rank, projection size and dropout for all, as PEFT's config has).
      model: the model the adapters belong to (names the modules as transformers does).
      frozen: the frozen tree holding the projections, for adapters loaded from a file
        (``stored``); adapters made here regenerate theirs from the seed.

    >>> save("out/vera", adapters, model)  # doctest: +SKIP
    PosixPath('out/vera')
    """
    hf.architecture_of(model)  # refuses a model transformers has no names for
    flat = only_adapters(adapters, VeraAdapter, "VeRA")
    settings = {(v.rank, v.max_in, v.max_out, v.dropout, v.stored, v.seed)
                for v in flat.values()}
    if len(settings) > 1:
        raise ValueError(f"adapters differ in (rank, max_in, max_out, dropout, stored, seed) "
                         f"{sorted(settings)}: PEFT's VeRA shares one pair of projections")
    (rank, max_in, max_out, dropout, stored, seed), = settings
    if stored:
        shared = paths.flatten(paths.params_of(frozen or {}))
        if f"{PROJECTIONS}/a" not in shared:
            raise ValueError("these VeRA adapters read their projections from the frozen tree: "
                             "pass it as frozen= (the one peft_vera.load returned)")
        a, b = shared[f"{PROJECTIONS}/a"], shared[f"{PROJECTIONS}/b"]
    else:
        a, b = projections(seed, rank, max_in, max_out)
    abstract = hf.abstract_params(model)
    check_fits(paths.flatten(abstract), flat)
    index = naming.tensor_index(model, abstract)
    tensors: dict[str, np.ndarray] = {VERA_A: np.asarray(a, np.float32).T,
                                      VERA_B: np.asarray(b, np.float32).T}
    modules = []
    for key, slot in index.items():
        leaf = flat.get(slot.path)
        if leaf is None:
            continue
        if naming.leaf_name(slot.path) != "kernel":
            raise ValueError(f"adapter at {slot.path!r} is not on a Linear weight: PEFT VeRA "
                             "files hold Linear adapters only")
        module = naming.module_of(key)
        tensors[f"{PREFIX}{module}.vera_lambda_d"] = np.asarray(
            naming.slice_of(leaf.lambda_d, slot), np.float32)
        tensors[f"{PREFIX}{module}.vera_lambda_b"] = np.asarray(
            naming.slice_of(leaf.lambda_b, slot), np.float32)
        modules.append(module)
    modules.sort()
    all_modules = sorted(naming.modules(index))
    config = {
        "peft_type": "VERA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "target_modules": sorted({m.rpartition(".")[2] for m in modules}),
        "projection_prng_key": int(seed),
        "save_projection": True,
        "vera_dropout": float(dropout),
        "d_initial": 0.1,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_weights": True,
        "inference_mode": True,
    }
    return write_adapter(directory, config, tensors, all_modules, modules)
