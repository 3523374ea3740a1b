"""Our params from a Hugging Face directory, one tensor at a time, optionally 4-bit on load.

The tree is built from abstract shapes (``jax.eval_shape``, no ``init``). Each parameter is
read alone from its safetensors file, converted (Linear weights transposed into kernels, cast
to ``param_dtype``) on the device it will live on, quantized there when a ``QuantSpec``
selects it, and only the result is kept: the float copy is dropped before the next tensor is
read. Scanned layer stacks are preallocated and filled slice by slice in place (a donated
``dynamic_update_slice``), so the peak while loading is the loaded tree plus about one float32
tensor, never the float model.

>>> model = build_model("tests/fixtures/hf/tiny_llama")
>>> frozen = load_params(model, "tests/fixtures/hf/tiny_llama",
...                      quant=QuantSpec("nf4", double_quant=True))
>>> type(frozen["lm_head"]["kernel"]).__name__
'QuantizedArray'
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import paths
from lowrank.models.architectures import (
    ARCHITECTURES,
    Architecture,
    architecture_of,
    hf_key,
    is_kernel,
    is_stacked,
)
from lowrank.models.safetensors_files import FLOAT_DTYPES, Checkpoint, read_config
from lowrank.models.tensors import (
    float_leaf,
    quant_layout,
    quantized_leaf,
    release_freed_memory,
)
from lowrank.nnx import run as nnx_run
from lowrank.quant.tree import QuantSpec, quantize_leaf

log = logging.getLogger(__name__)

# Buffers some checkpoints carry that are no parameters of ours.
_IGNORED_KEYS = re.compile(r".*(position_ids|rotary_emb\.inv_freq)$")
# Pre-2019 BERT checkpoints name LayerNorm parameters as TensorFlow did.
_LEGACY_LEAF = {"weight": "gamma", "bias": "beta"}

ReadSlice = Callable[[str, jax.ShapeDtypeStruct, "int | None"], Any]
"""``(path, abstract slice, layer or None) -> leaf``, or None when the checkpoint lacks it."""


def _example_inputs() -> tuple[jax.Array]:
    return (jnp.zeros((1, 1), jnp.int32),)


def abstract_params(model: nn.Module) -> dict:
    """Shapes and dtypes of ``model``'s params (a linen or NNX model), without allocating them.

    >>> from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
    ...                   num_hidden_layers=1, num_attention_heads=2)
    >>> abstract_params(LlamaForCausalLM(cfg))["lm_head"]["kernel"].shape
    (4, 8)
    """
    if nnx_run.is_nnx(model):  # an NNX model (possibly abstract already) holds its params
        return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                            nnx_run.params(model))
    variables = jax.eval_shape(model.init, jax.random.key(0), *_example_inputs())
    return variables["params"]


def _find_key(wanted: str, available: set[str], prefix: str) -> str | None:
    """``wanted`` as the checkpoint spells it: with or without the base-model prefix."""
    stem, _, leaf = wanted.rpartition(".")
    candidates = [wanted]
    if wanted.startswith(prefix + "."):
        candidates.append(wanted[len(prefix) + 1:])
    else:
        candidates.append(f"{prefix}.{wanted}")
    if leaf in _LEGACY_LEAF and stem.endswith("LayerNorm"):
        candidates += [c.rpartition(".")[0] + "." + _LEGACY_LEAF[leaf] for c in candidates]
    return next((c for c in candidates if c in available), None)


def _is_new_head(path: str, arch: Architecture) -> bool:
    parts = tuple(path.split(paths.SEP))
    return any(parts[: len(h)] == h for h in arch.new_heads)


def _init_leaves(model: nn.Module, leaf_paths: list[str], key: jax.Array) -> dict:
    """``model.init(key)``'s values of just the leaves at ``leaf_paths`` (a new head).

    Only these leaves leave the jitted function, so XLA drops the rest of the init and the
    forward pass it traces: a new head costs about one Dense init (MiniLM from_pretrained
    with num_labels, 2-core CPU: 4-10 s -> 1-3 s), and the values equal a full init's.
    """
    def init(k):
        fresh = paths.flatten(model.init(k, *_example_inputs())["params"])
        return {p: fresh[p] for p in leaf_paths}

    return jax.jit(init)(key)


# ----------------------------------------------------------------------------- one tensor


# ----------------------------------------------------------------------------- the tree


@functools.partial(jax.jit, donate_argnums=0)
def _put(stack: Any, item: Any, i: jax.Array) -> Any:
    # Donated: the stack is updated in place, never copied per layer.
    return jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x, i, 0),
                        stack, item)


def _empty_stack(item: Any, n: int) -> Any:
    def empty(x):
        # numpy's zeros are untouched pages until read, and device_put compiles nothing
        # (jnp.zeros would compile one fill per array shape).
        return jax.device_put(np.zeros((n, *x.shape), x.dtype), next(iter(x.devices())))

    return jax.tree.map(empty, item)


def stream_leaves(model: nn.Module, read: ReadSlice
                  ) -> tuple[dict[str, Any], list[tuple[str, int | None]]]:
    """Every parameter leaf of ``model``, each built by ``read`` one tensor at a time.

    ``read(path, abstract_slice, layer)`` returns the leaf (an array or a QuantizedArray) of
    ``path``, or of one ``layer`` of a scanned stack, or None when the checkpoint lacks it;
    stacks are preallocated from their first slice and filled in place.

    Returns:
      ``({path: leaf}, [(path, layer) read returned None for])``: a stack is given up at
      its first missing layer.

    >>> model = build_model("tests/fixtures/hf/tiny_llama", scan_layers=True)
    >>> leaves, missing = stream_leaves(model, lambda path, leaf, layer: jnp.ones(leaf.shape))
    >>> leaves["model/layers/mlp/up_proj/kernel"].shape, missing
    ((2, 16, 24), [])
    """
    arch = architecture_of(model)
    leaves: dict[str, Any] = {}
    missing: list[tuple[str, int | None]] = []
    read_one = read

    def read(*args):
        release_freed_memory()  # the previous tensor's float copies
        return read_one(*args)

    for path, leaf in paths.flatten(abstract_params(model)).items():
        absent: int | None = None
        if not is_stacked(path, arch.layer_list):
            value = read(path, leaf, None)
        else:
            layer = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
            value, absent = read(path, layer, 0), 0
            if value is not None:
                first, value = value, _empty_stack(value, leaf.shape[0])
                value = _put(value, first, 0)
                del first
                for i in range(1, leaf.shape[0]):
                    item = read(path, layer, i)
                    if item is None:
                        value, absent = None, i
                        break
                    value = _put(value, item, i)
        if value is None:
            missing.append((path, absent))
        else:
            leaves[path] = value
    return leaves, missing


class CheckpointReader:
    """Finds, checks and reads the checkpoint tensor of each of a model's parameters.

    Errors name the file and the tensor: a tensor of the wrong shape or a non-float dtype,
    a shard that lacks a tensor its index places there, a damaged file.

    >>> model = build_model("tests/fixtures/hf/tiny_llama")
    >>> with Checkpoint("tests/fixtures/hf/tiny_llama") as ckpt:
    ...     CheckpointReader(model, ckpt).tensor("lm_head/kernel", (16, 64)).shape
    (64, 16)
    """

    def __init__(self, model: nn.Module, ckpt: Checkpoint):
        self.arch = architecture_of(model)
        self.ckpt = ckpt
        self.available = set(ckpt.keys())
        self.used: set[str] = set()

    def key(self, path: str, layer: int | None = None) -> str | None:
        """The checkpoint's name of ``path`` (one ``layer`` of a stack), or None if absent."""
        name = hf_key(path, self.arch.layer_list, layer)
        return _find_key(name, self.available, self.arch.base_prefix)

    def missing(self, abstract: dict) -> list[tuple[str, int | None]]:
        """``(path, layer)`` of the parameters (layers of a stack) without a tensor, by name.

        Checked before anything is read, so a missing weight fails a big load at once.
        """
        out = []
        for path, leaf in paths.flatten(abstract).items():
            layers = range(leaf.shape[0]) if is_stacked(path, self.arch.layer_list) else [None]
            out += [(path, i) for i in layers if self.key(path, i) is None]
        return out

    def check_complete(self, abstract: dict, directory: Any, allow_heads: bool = False) -> None:
        """Raises, naming up to 5 tensors, if the checkpoint lacks a parameter of ``abstract``.

        ``allow_heads``: a new head's parameters (``Architecture.new_heads``) may be missing.
        """
        absent = [(p, i) for p, i in self.missing(abstract)
                  if not (allow_heads and _is_new_head(p, self.arch))]
        if absent:
            names = ", ".join(f"{hf_key(p, self.arch.layer_list, i)!r} (for {p})"
                              for p, i in absent[:5])
            raise ValueError(f"{directory} lacks {len(absent)} weight(s) the model needs: "
                             f"{names}")

    def tensor(self, path: str, shape: tuple[int, ...], layer: int | None = None) -> Any:
        """The checked float tensor (Hugging Face layout) of ``path``, or None if absent."""
        found = self.key(path, layer)
        if found is None:
            return None
        file, stored = self.ckpt.file(found), self.ckpt.shape(found)
        ours = stored[::-1] if is_kernel(path) else stored
        if tuple(ours) != tuple(shape):
            raise ValueError(
                f"weight {found!r} in {file} has shape {stored}, which gives {tuple(ours)} "
                f"for parameter {path!r}; the model expects {tuple(shape)} (check "
                "config.json against the weights)"
            )
        dtype = self.ckpt.dtype(found)
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"weight {found!r} in {file} has dtype {dtype}; parameter "
                             f"{path!r} is read from a float tensor ({', '.join(FLOAT_DTYPES)})")
        self.used.add(found)
        return self.ckpt.get(found)

    def log_unused(self) -> None:
        unused = sorted(k for k in self.available - self.used if not _IGNORED_KEYS.fullmatch(k))
        if unused:
            log.info("%d checkpoint tensors unused: %s", len(unused), ", ".join(unused[:10]))


def load_params(
    model: nn.Module,
    directory: str | Path,
    *,
    key: jax.Array | None = None,
    quant: QuantSpec | None = None,
    device: Any = None,
) -> dict:
    """The params of ``model`` read from the safetensors weights in ``directory``.

    Each of our parameters is looked up under its Hugging Face name (with or without the base
    model's prefix, so a ``BertModel`` checkpoint fills a classifier's ``bert/...``), Linear
    weights are transposed into kernels, scanned layers are stacked, and every shape is checked.
    With ``quant``, the kernels it selects are quantized as they are read: the result equals
    ``quantize_tree(load_params(model, directory), quant)`` (with ``quant.stacked`` matching the
    scanned kernels) bit for bit, without ever holding the float model. Parameters of a new
    head (``classifier``) that the checkpoint lacks are initialised alone from ``key``.
    Checkpoint tensors that no parameter uses are logged at INFO level.

    Args:
      model: one of our models (its ``param_dtype`` is the dtype of the float leaves).
      directory: ``config.json`` and ``model.safetensors`` or a sharded index.
      key: PRNG key for a new head's parameters.
      quant: which kernels to quantize on load, and how (``quant.stacked`` is not needed).
      device: where the params live (default: JAX's default device); each tensor is
        converted and quantized there.

    >>> model = build_model("tests/fixtures/hf/tiny_llama", scan_layers=True)
    >>> frozen = load_params(model, "tests/fixtures/hf/tiny_llama", quant=QuantSpec("nf4"))
    >>> frozen["model"]["layers"]["mlp"]["up_proj"]["kernel"].lead_shape
    (2,)
    """
    dtype = jnp.dtype(model.param_dtype)

    with Checkpoint(directory) as ckpt:
        reader = CheckpointReader(model, ckpt)
        reader.check_complete(abstract_params(model), directory, allow_heads=True)

        def read(path: str, leaf: jax.ShapeDtypeStruct, layer: int | None) -> Any:
            if reader.key(path, layer) is None:
                return None
            layout = None if quant is None else quant_layout(
                path, len(leaf.shape), layer is not None, quant)
            # The host tensor is passed on, not kept here: the callee drops it once it is
            # on the device.
            if layout is None:
                return float_leaf(path, reader.tensor(path, leaf.shape, layer), dtype, device)
            return quantized_leaf(path, reader.tensor(path, leaf.shape, layer), quant, layout,
                                  dtype, device)

        leaves, missing = stream_leaves(model, read)
        reader.log_unused()
    missing = [p for p, _ in missing]  # only new heads: check_complete ran
    if missing:
        if key is None:
            raise ValueError(f"{directory} has no weights for the new head {sorted(missing)}: "
                             "pass key= to initialise it")
        fresh = _init_leaves(model, missing, key)
        for path in missing:
            leaf = jax.device_put(fresh.pop(path), device)
            layout = None if quant is None else quant_layout(path, leaf.ndim, False, quant)
            leaves[path] = leaf if layout is None else quantize_leaf(path, leaf, quant, layout)
    return paths.unflatten({p: leaves[p] for p in paths.flatten(abstract_params(model))})


def build_model(
    directory: str | Path,
    *,
    num_labels: int | None = None,
    pooling: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    scan_layers: bool = False,
    remat: bool = False,
) -> nn.Module:
    """Our linen model for a Hugging Face directory, from its config.json; no weight is read.

    Only the checkpoint's tensor names are looked at (they say, e.g., whether a BERT has a
    pooler). The options are those of :func:`from_pretrained`.

    >>> build_model("tests/fixtures/hf/tiny_llama", scan_layers=True).scan_layers
    True
    """
    config = read_config(directory)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type={model_type!r} in {Path(directory) / 'config.json'} is not supported; "
            f"accepted: {sorted(ARCHITECTURES)}"
        )
    with Checkpoint(directory) as ckpt:
        keys = ckpt.keys()
    try:
        return ARCHITECTURES[model_type].build(
            config, keys, num_labels=num_labels, pooling=pooling, dtype=dtype,
            param_dtype=param_dtype, scan_layers=scan_layers, remat=remat,
        )
    except (TypeError, ValueError) as e:
        raise type(e)(f"{Path(directory) / 'config.json'}: {e}") from None


def from_pretrained(
    directory: str | Path,
    *,
    num_labels: int | None = None,
    pooling: str | None = None,
    key: jax.Array | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    scan_layers: bool = False,
    remat: bool = False,
    quant: QuantSpec | None = None,
    device: Any = None,
) -> tuple[nn.Module, dict]:
    """``(model, params)`` from a local Hugging Face directory, without torch.

    Args:
      directory: holds ``config.json`` and ``model.safetensors`` (or a sharded index).
      num_labels: for BERT, build ``BertForSequenceClassification`` with this many labels
        (its ``classifier`` is initialised from ``key`` when the checkpoint lacks one).
      pooling: the classifier's pooling, "pooler" (default) or "mean".
      key: PRNG key for parameters the checkpoint lacks (a new head).
      dtype: compute dtype.
      param_dtype: dtype of the float params (``jnp.bfloat16`` halves a frozen base's
        embeddings, norms and unquantized head).
      scan_layers: build the layers as one ``nn.scan`` (params stacked along a layer axis).
      remat: rematerialise each layer in the backward pass.
      quant: quantize the kernels it selects as they are read (QLoRA's frozen base): peak
        memory is the quantized tree plus about one float32 tensor. Equals
        ``quantize_tree`` of the float params bit for bit.
      device: where the params live (default: JAX's default device).

    >>> model, params = from_pretrained(lowrank.assets.minilm_dir())  # doctest: +SKIP
    >>> model.apply({"params": params}, ids, mask).last_hidden_state  # doctest: +SKIP
    >>> model, frozen = from_pretrained("llama-2-7b/", scan_layers=True, remat=True,
    ...                                 param_dtype=jnp.bfloat16,
    ...                                 quant=QuantSpec("nf4", double_quant=True))  # doctest: +SKIP
    """
    model = build_model(
        directory, num_labels=num_labels, pooling=pooling, dtype=dtype,
        param_dtype=param_dtype, scan_layers=scan_layers, remat=remat,
    )
    return model, load_params(model, directory, key=key, quant=quant, device=device)


__all__ = [
    "CheckpointReader", "abstract_params", "build_model", "float_leaf", "from_pretrained",
    "load_params", "quant_layout", "quantized_leaf", "stream_leaves",
]
