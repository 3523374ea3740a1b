"""bitsandbytes 4-bit checkpoints (as transformers saves them) <-> our ``QuantizedArray``.

transformers stores a bitsandbytes ``Linear4bit`` weight ``W [out, in]`` as

- ``<name>.weight``: uint8 ``[n_bytes, 1]``, two codes per byte, first in the high nibble,
  blocks running over the row-major ``W``;
- ``<name>.weight.absmax``: the block scales, float32, or uint8 codes with double quantization;
- ``<name>.weight.quant_map``: the 16-value codebook (nf4 or fp4);
- with double quantization ``nested_absmax`` (float32 scales of the absmax codes) and
  ``nested_quant_map`` (the 8-bit dynamic map);
- ``<name>.weight.quant_state.bitsandbytes__<nf4|fp4>``: JSON bytes with the block size, dtype,
  shape, nested block size and ``nested_offset`` (the mean taken off the absmax).

That is exactly a ``QuantizedArray`` of our Dense kernel ``[in, out]`` stored with
``perm=(1, 0)``, so arrays are moved across bit for bit: nothing is dequantized or requantized.

>>> model, frozen = load("llama-nf4/")  # doctest: +SKIP
>>> save("out/", model, frozen)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax

from lowrank import paths, quant
from lowrank.interop import naming
from lowrank.models import hf, loading
from lowrank.quant.blockwise import NESTED_BLOCK_SIZE
from lowrank.quant.formats import dynamic_map, get_format

BNB_FORMATS = ("nf4", "fp4")
TORCH_LAYOUT = (1, 0)  # a Dense kernel [in, out] stored as the torch weight [out, in]
_STATE = "quant_state.bitsandbytes__"


def quant_state_key(name: str, tensors: Mapping[str, Any]) -> str | None:
    """The ``quant_state`` tensor name of the 4-bit weight ``name``, or None if it is plain.

    >>> quant_state_key("fc.weight", {"fc.weight.quant_state.bitsandbytes__nf4": 0})
    'fc.weight.quant_state.bitsandbytes__nf4'
    """
    found = [f"{name}.{_STATE}{f}" for f in BNB_FORMATS if f"{name}.{_STATE}{f}" in tensors]
    return found[0] if found else None


def _json_bytes(state: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(state).encode(), np.uint8).copy()


def from_bnb(tensors: Mapping[str, Any], name: str, compute_dtype: str | None = None
             ) -> quant.QuantizedArray:
    """The ``QuantizedArray`` (a Dense kernel ``[in, out]``) of the 4-bit weight ``name``.

    Args:
      tensors: the checkpoint's tensors by name (a dict or ``hf.Checkpoint``-like mapping).
      name: the weight's name, e.g. ``"model.layers.0.mlp.up_proj.weight"``.
      compute_dtype: dtype name ``dequantize`` returns by default (None: lowrank's default).

    >>> q = from_bnb(tensors, "model.layers.0.mlp.up_proj.weight")  # doctest: +SKIP
    """
    state_key = quant_state_key(name, tensors)
    if state_key is None:
        raise ValueError(f"{name} is not a bitsandbytes 4-bit weight: no {name}.{_STATE}nf4/fp4")
    state = json.loads(np.asarray(tensors[state_key]).tobytes().decode())
    fmt = state_key.rpartition("__")[2]
    if state.get("quant_type", fmt) != fmt:
        raise ValueError(f"{state_key} says quant_type={state.get('quant_type')!r}")
    shape = tuple(state["shape"])
    if len(shape) != 2:
        raise ValueError(f"{name} has shape {shape}: bitsandbytes 4-bit weights are [out, in]")
    codebook = np.asarray(tensors[f"{name}.quant_map"], np.float32)
    if not np.array_equal(codebook, get_format(fmt).codebook):
        raise ValueError(f"{name}.quant_map is not bitsandbytes' {fmt} codebook: a custom "
                         "4-bit map is not supported")
    nested = f"{name}.nested_absmax" in tensors
    scale = offset = None
    if nested:
        if state.get("nested_blocksize") != NESTED_BLOCK_SIZE:
            raise ValueError(f"{name}: nested_blocksize={state.get('nested_blocksize')!r} is not "
                             f"supported; accepted: {NESTED_BLOCK_SIZE}")
        if not np.array_equal(np.asarray(tensors[f"{name}.nested_quant_map"]), dynamic_map()):
            raise ValueError(f"{name}.nested_quant_map is not bitsandbytes' dynamic map")
        scale = jnp.asarray(tensors[f"{name}.nested_absmax"], jnp.float32)
        offset = jnp.asarray(np.float32(state["nested_offset"]))
    absmax = jnp.asarray(tensors[f"{name}.absmax"])
    expected = jnp.uint8 if nested else jnp.float32
    if absmax.dtype != expected:
        raise ValueError(f"{name}.absmax has dtype {absmax.dtype}; expected {expected.__name__}")
    codes = jnp.asarray(tensors[name]).reshape(-1)
    if codes.dtype != jnp.uint8 or codes.size != -(-shape[0] * shape[1] // 2):
        raise ValueError(f"{name} holds {codes.size} {codes.dtype} values; a packed [out, in] = "
                         f"{list(shape)} weight holds {-(-shape[0] * shape[1] // 2)} uint8")
    return quant.QuantizedArray(
        codes=codes, absmax=absmax, absmax_scale=scale, absmax_offset=offset,
        shape=shape[::-1], dtype=state["dtype"], fmt=fmt, block_size=int(state["blocksize"]),
        double_quant=nested, perm=TORCH_LAYOUT,
        compute_dtype=compute_dtype or quant.default_compute_dtype(),
    )


def _check_layout(q: quant.QuantizedArray, name: str) -> None:
    if q.fmt not in BNB_FORMATS or q.perm != TORCH_LAYOUT or len(q.shape) != 2:
        raise ValueError(
            f"{name}: bitsandbytes stores {BNB_FORMATS} Dense kernels as [out, in]; got "
            f"fmt={q.fmt!r}, perm={q.perm}, shape={q.shape} (accepted: fmt in {BNB_FORMATS}, "
            f"perm={TORCH_LAYOUT}, a 2-D kernel: quantize_tree's default layout)"
        )


def to_bnb(q: quant.QuantizedArray, name: str) -> dict[str, np.ndarray]:
    """The tensors transformers saves for the 4-bit weight ``name`` holding ``q`` (one slice).

    >>> w = jnp.ones((64, 32))
    >>> sorted(to_bnb(quant.quantize(w, "nf4", perm=(1, 0)), "fc.weight"))[:2]
    ['fc.weight', 'fc.weight.absmax']
    """
    _check_layout(q, name)
    if q.lead_shape:
        raise ValueError(f"{name}: pass one slice of a stacked QuantizedArray, not lead axes "
                         f"{q.lead_shape}")
    state = {"quant_type": q.fmt, "blocksize": q.block_size, "dtype": q.dtype,
             "shape": list(q.shape[::-1])}
    out = {
        name: np.asarray(q.codes).reshape(-1, 1),
        f"{name}.absmax": np.asarray(q.absmax),
        f"{name}.quant_map": np.array(get_format(q.fmt).codebook),
    }
    if q.double_quant:
        state.update(nested_blocksize=NESTED_BLOCK_SIZE, nested_dtype="float32",
                     nested_offset=float(np.asarray(q.absmax_offset)))
        out[f"{name}.nested_absmax"] = np.asarray(q.absmax_scale)
        out[f"{name}.nested_quant_map"] = np.array(dynamic_map())
    out[f"{name}.{_STATE}{q.fmt}"] = _json_bytes(state)
    return out


def _quantization_config(directory: Path, config: Mapping) -> dict:
    qc = dict(config.get("quantization_config") or {})
    if qc.get("quant_method") != "bitsandbytes" or not (
        qc.get("load_in_4bit") or qc.get("_load_in_4bit")
    ):
        raise ValueError(
            f"{directory / 'config.json'} has quantization_config {qc or None}: expected a "
            "bitsandbytes 4-bit checkpoint (quant_method='bitsandbytes', load_in_4bit=true)"
        )
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise ValueError(f"bnb_4bit_quant_storage={storage!r} is not supported; accepted: uint8")
    return qc


def load(
    directory: str | Path, *, scan_layers: bool = False, remat: bool = False,
    dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, device: Any = None,
) -> tuple[nn.Module, dict]:
    """``(model, frozen)`` from a transformers-saved bitsandbytes 4-bit directory.

    Each 4-bit Linear weight becomes a ``QuantizedArray`` with the checkpoint's own codes and
    scales (compute dtype: the config's ``bnb_4bit_compute_dtype``); other weights are read as
    :func:`lowrank.models.from_pretrained` reads them. The tree is built from abstract shapes
    and filled one tensor at a time (scanned stacks in place), so nothing but the result and
    one tensor is ever held. ``frozen`` runs with :func:`lowrank.apply` (add adapters for
    QLoRA) or, after ``lowrank.merge``, plainly.

    Args:
      directory: config.json with a bitsandbytes ``quantization_config``, and safetensors.
      scan_layers, remat: as for :func:`lowrank.models.from_pretrained` (4-bit weights of a
        scanned stack get one leading layer axis).
      dtype: the model's compute dtype.
      param_dtype: dtype of the float leaves (embeddings, norms, unquantized kernels).
      device: where the params live (default: JAX's default device).

    >>> model, frozen = load("llama-nf4/")  # doctest: +SKIP
    >>> logits = lowrank.apply(model, frozen, {}, input_ids)  # doctest: +SKIP
    """
    directory = Path(directory)
    model = hf.build_model(directory, scan_layers=scan_layers, remat=remat, dtype=dtype,
                           param_dtype=param_dtype)
    qc = _quantization_config(directory, hf.read_config(directory))
    compute = qc.get("bnb_4bit_compute_dtype") or None
    with hf.Checkpoint(directory) as ckpt:
        reader = loading.CheckpointReader(model, ckpt)
        reader.check_complete(hf.abstract_params(model), directory)
        tensors = _LazyTensors(ckpt, reader.available)

        def read(path: str, leaf: jax.ShapeDtypeStruct, layer: int | None) -> Any:
            key = reader.key(path, layer)
            if key is None or not quant_state_key(key, reader.available):
                tensor = reader.tensor(path, leaf.shape, layer)
                return None if tensor is None else loading.float_leaf(
                    path, tensor, param_dtype, device)
            q = from_bnb(tensors, key, compute)
            if q.shape != tuple(leaf.shape):
                raise ValueError(f"4-bit weight {key!r} in {ckpt.file(key)} is [out, in] = "
                                 f"{list(q.shape[::-1])}; parameter {path!r} needs "
                                 f"{tuple(leaf.shape)} (check config.json against the weights)")
            return jax.device_put(q, device)

        leaves, _ = loading.stream_leaves(model, read)  # nothing missing: checked
    return model, paths.unflatten(leaves)


class _LazyTensors(Mapping):
    """Checkpoint tensors by name, read when asked for."""

    def __init__(self, ckpt: hf.Checkpoint, keys: set[str]):
        self._ckpt, self._keys = ckpt, keys

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self._ckpt.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def save(directory: str | Path, model: nn.Module, frozen: Mapping) -> Path:
    """Writes ``frozen`` as a transformers bitsandbytes 4-bit checkpoint directory.

    Every ``QuantizedArray`` must be an nf4 / fp4 Dense kernel in torch layout (what
    ``quantize_tree`` makes by default), all with one format, block size and double
    quantization setting (bitsandbytes' config is global). Dense kernels left unquantized are
    listed in ``llm_int8_skip_modules`` so that transformers keeps them in full precision.

    >>> frozen = quant.quantize_tree(params, quant.QuantSpec("nf4", double_quant=True,
    ...                                                    exclude=".*lm_head.*"))  # doctest: +SKIP
    >>> save("out/llama-nf4", model, frozen)  # doctest: +SKIP
    """
    flat = paths.flatten(paths.params_of(frozen))
    quantized = {p: v for p, v in flat.items() if quant.is_quantized(v)}
    not_kernel = sorted(p for p in quantized if naming.leaf_name(p) != "kernel")
    if not_kernel:
        raise ValueError(f"bitsandbytes quantizes Linear weights only; quantized here: "
                         f"{not_kernel}")
    for p, q in quantized.items():
        _check_layout(q, p)
    settings = {(q.fmt, q.block_size, q.double_quant, q.compute_dtype) for q in quantized.values()}
    if len(settings) != 1:
        raise ValueError(
            f"frozen holds quantized weights with (fmt, block_size, double_quant, "
            f"compute_dtype) {sorted(settings)}: a bitsandbytes checkpoint has exactly one"
        )
    (fmt, _, double_quant, compute_dtype), = settings
    index = naming.tensor_index(model, frozen)
    skip = sorted(naming.module_of(k) for k, s in index.items()
                  if naming.leaf_name(s.path) == "kernel" and s.path not in quantized)
    quantization_config = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_quant_type": fmt,
        "bnb_4bit_use_double_quant": double_quant, "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": skip,
    }
    directory = Path(directory)
    plain = paths.unflatten({p: v for p, v in flat.items() if p not in quantized})
    # save_pretrained writes config.json and the plain weights; the 4-bit tensors join after.
    hf.save_pretrained(directory, model, plain,
                       extra_config={"quantization_config": quantization_config})
    file = directory / hf.SINGLE_FILE
    tensors = {k: np.asarray(v) for k, v in safetensors.flax.load_file(str(file)).items()}
    for key, slot in index.items():
        if slot.path in quantized:
            q = quantized[slot.path]
            if slot.layer is not None:
                q = jax.tree.map(lambda x, i=slot.layer: x[i], q)
            tensors.update(to_bnb(q, key))
    safetensors.flax.save_file({k: jnp.asarray(v) for k, v in sorted(tensors.items())},
                               str(file), metadata={"format": "pt"})
    return directory
