"""Hugging Face checkpoint directories (config.json + safetensors) <-> our linen models.

Nothing here imports torch and nothing is unpickled: weights are read with ``safetensors``.
The one mapping between our parameter paths and Hugging Face keys is :func:`hf_key` (with
the kernel transpose in :func:`to_hf_tensor` / :func:`from_hf_tensor`); loading and saving
both go through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import safetensors
import safetensors.flax

from lowrank import paths
from lowrank.models.bert import BertConfig, BertForSequenceClassification, BertModel
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry that are no parameters of ours.
_IGNORED_KEYS = re.compile(r".*(position_ids|rotary_emb\.inv_freq)$")
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Pre-2019 BERT checkpoints name LayerNorm parameters as TensorFlow did.
_LEGACY_LEAF = {"weight": "gamma", "bias": "beta"}


# ----------------------------------------------------------------------------- architectures


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one Hugging Face ``model_type`` maps to our modules.

    Attributes:
      model_type: ``config.json``'s ``model_type``.
      base_prefix: the base model's key prefix in task checkpoints ("bert.", "model.").
      layer_list: Hugging Face's name of the layer list ("layer" in ``encoder.layer.3``).
      new_heads: parameter path prefixes that may be missing from a checkpoint and are then
        freshly initialised (a new classifier head).
    """

    model_type: str
    base_prefix: str
    layer_list: str
    new_heads: tuple[tuple[str, ...], ...]
    build: Callable[..., nn.Module]
    to_config: Callable[[nn.Module], dict]


def _fields(cls, hf: Mapping) -> dict:
    return {f.name: hf[f.name] for f in dataclasses.fields(cls) if hf.get(f.name) is not None}


def bert_config_from_hf(hf: Mapping) -> BertConfig:
    """``BertConfig`` from a parsed ``config.json``.

    >>> bert_config_from_hf({"hidden_size": 8, "num_attention_heads": 2}).hidden_size
    8
    """
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"position_embedding_type={kind!r} is not supported; accepted: absolute")
    return BertConfig(**_fields(BertConfig, hf))


def llama_config_from_hf(hf: Mapping) -> LlamaConfig:
    """``LlamaConfig`` from a parsed ``config.json`` (transformers 4 or 5 rope fields).

    >>> llama_config_from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
    ...                       "hidden_size": 16, "num_attention_heads": 4}).rope_theta
    500000.0
    """
    fields = _fields(LlamaConfig, hf)
    # transformers 5 moved rope_theta into rope_parameters; 4 kept it top-level with rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"rope_type={rope_type!r} (rope scaling) is not supported; accepted: default"
        )
    if "rope_theta" in rope:
        fields["rope_theta"] = float(rope["rope_theta"])
    return LlamaConfig(**fields)


def _build_bert(hf: Mapping, checkpoint_keys, *, num_labels, pooling, **kw) -> nn.Module:
    config = bert_config_from_hf(hf)
    archs = hf.get("architectures") or []
    if num_labels is None and any(a.endswith("ForSequenceClassification") for a in archs):
        num_labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
    if num_labels is None:
        if pooling is not None:
            raise ValueError("pooling applies to a classifier: pass num_labels as well")
        # Some BERT checkpoints were saved without a pooler; build the model they hold.
        has_pooler = any(re.match(r"(bert\.)?pooler\.", k) for k in checkpoint_keys)
        return BertModel(config, add_pooling_layer=has_pooler, **kw)
    pooling = pooling or hf.get("lowrank_pooling", "pooler")
    return BertForSequenceClassification(config, num_labels=num_labels, pooling=pooling, **kw)


def _build_llama(hf: Mapping, checkpoint_keys, *, num_labels, pooling, **kw) -> nn.Module:
    if num_labels is not None or pooling is not None:
        raise ValueError(
            "num_labels and pooling apply to BERT classifiers, not to model_type llama"
        )
    return LlamaForCausalLM(llama_config_from_hf(hf), **kw)


def _bert_to_config(model: nn.Module) -> dict:
    out = {"model_type": "bert", **dataclasses.asdict(model.config)}
    if isinstance(model, BertForSequenceClassification):
        labels = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
        out.update(
            architectures=["BertForSequenceClassification"], id2label=labels,
            label2id={v: int(k) for k, v in labels.items()}, lowrank_pooling=model.pooling,
        )
    else:
        out["architectures"] = ["BertModel"]
    out["position_embedding_type"] = "absolute"
    return out


def _llama_to_config(model: nn.Module) -> dict:
    out = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    out.update(dataclasses.asdict(model.config))
    # Both spellings, so transformers 4 and 5 read the same rope.
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": model.config.rope_theta}
    return out


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(
        "bert", "bert", "layer", (("classifier",), ("pooler",), ("bert", "pooler")),
        _build_bert, _bert_to_config,
    ),
    "llama": Architecture("llama", "model", "layers", (), _build_llama, _llama_to_config),
}


def architecture_of(model: nn.Module) -> Architecture:
    """The ``Architecture`` entry of one of our model instances.

    >>> architecture_of(LlamaForCausalLM(LlamaConfig())).model_type
    'llama'
    """
    if isinstance(model, BertModel | BertForSequenceClassification):
        return ARCHITECTURES["bert"]
    if isinstance(model, LlamaForCausalLM):
        return ARCHITECTURES["llama"]
    raise TypeError(
        f"{type(model).__name__} has no Hugging Face mapping; accepted: BertModel, "
        "BertForSequenceClassification, LlamaForCausalLM"
    )


# ----------------------------------------------------------------------------- the name map


def hf_key(path: str, layer_list: str, layer: int | None = None) -> str:
    """Hugging Face key of our parameter ``path``; ``layer`` picks a slice of a scanned stack.

    >>> hf_key("encoder/layer_3/attention/self/query/kernel", "layer")
    'encoder.layer.3.attention.self.query.weight'
    >>> hf_key("model/layers/mlp/up_proj/kernel", "layers", layer=1)
    'model.layers.1.mlp.up_proj.weight'
    """
    *modules, leaf = path.split(paths.SEP)
    parts: list[str] = []
    for part in modules:
        numbered = re.fullmatch(rf"{re.escape(layer_list)}_(\d+)", part)
        if numbered:
            parts += [layer_list, numbered.group(1)]
        elif part == layer_list:
            if layer is None:
                raise ValueError(f"{path} is a scanned stack: pass the layer index")
            parts += [layer_list, str(layer)]
        else:
            parts.append(part)
    if leaf not in _LEAF_TO_HF:
        raise ValueError(f"no Hugging Face name for parameter {path!r}")
    return ".".join(parts + [_LEAF_TO_HF[leaf]])


def is_stacked(path: str, layer_list: str) -> bool:
    """Whether ``path`` lies in a scanned layer stack (its arrays have a leading layer axis)."""
    return layer_list in path.split(paths.SEP)[:-1]


def _is_kernel(path: str) -> bool:
    return path.rpartition(paths.SEP)[2] == "kernel"


def from_hf_tensor(path: str, tensor: jax.Array) -> jax.Array:
    """A Hugging Face tensor in our layout: Linear weights ``[out, in]`` become kernels."""
    return tensor.T if _is_kernel(path) else tensor


def to_hf_tensor(path: str, array: jax.Array) -> jax.Array:
    """Our array in Hugging Face's layout (the inverse of :func:`from_hf_tensor`)."""
    return array.T if _is_kernel(path) else array


# ----------------------------------------------------------------------------- reading


def read_config(directory: str | Path) -> dict:
    """The parsed ``config.json`` of a Hugging Face model directory.

    >>> read_config("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    FileNotFoundError: ...
    """
    directory = Path(directory)
    file = directory / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: a Hugging Face model directory holds config.json and "
            f"{SINGLE_FILE} (or {INDEX_FILE} with its shards)"
        )
    return json.loads(file.read_text())


class Checkpoint:
    """Read access to the safetensors weights of a directory (one file or a sharded index).

    >>> with Checkpoint(path) as ckpt:  # doctest: +SKIP
    ...     ckpt.shape("pooler.dense.weight")
    (384, 384)
    """

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        if (directory / INDEX_FILE).is_file():
            index = json.loads((directory / INDEX_FILE).read_text())
            self._file_of = {k: directory / f for k, f in index["weight_map"].items()}
        elif (directory / SINGLE_FILE).is_file():
            self._file_of = None
            self._single = directory / SINGLE_FILE
        else:
            found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
            hint = ""
            if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in found):
                hint = " (pickled torch weights are not read; convert them to safetensors)"
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}; found: {found}"
            )
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}
        if self._file_of is None:
            self._file_of = {k: self._single for k in self._open(self._single).keys()}

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise FileNotFoundError(f"checkpoint shard {file} is missing")
            self._handles[file] = self._stack.enter_context(
                safetensors.safe_open(str(file), framework="flax")
            )
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[key]).get_slice(key).get_shape())

    def get(self, key: str) -> jax.Array:
        return self._open(self._file_of[key]).get_tensor(key)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def _example_inputs() -> tuple[jax.Array]:
    return (jnp.zeros((1, 1), jnp.int32),)


def abstract_params(model: nn.Module) -> dict:
    """Shapes and dtypes of ``model``'s params, without allocating them.

    >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
    ...                   num_hidden_layers=1, num_attention_heads=2)
    >>> abstract_params(LlamaForCausalLM(cfg))["lm_head"]["kernel"].shape
    (4, 8)
    """
    variables = jax.eval_shape(model.init, jax.random.key(0), *_example_inputs())
    return variables["params"]


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


def load_params(
    model: nn.Module, directory: str | Path, *, key: jax.Array | None = None
) -> dict:
    """The params of ``model`` read from the safetensors weights in ``directory``.

    Each of our parameters is looked up under its Hugging Face name (with or without the base
    model's prefix, so a ``BertModel`` checkpoint fills a classifier's ``bert/...``), Linear
    weights are transposed into kernels, scanned layers are stacked, and every shape is checked.
    Parameters of a new head (``classifier``) that the checkpoint lacks are initialised from
    ``key``. Checkpoint tensors that no parameter uses are logged at INFO level.

    >>> model = BertModel(bert_config_from_hf(read_config(d)))  # doctest: +SKIP
    >>> params = load_params(model, d)  # doctest: +SKIP
    """
    arch = architecture_of(model)
    param_dtype = model.param_dtype
    wanted = paths.flatten(abstract_params(model))
    loaded: dict[str, jax.Array] = {}
    missing: list[tuple[str, str]] = []
    used: set[str] = set()
    with Checkpoint(directory) as ckpt:
        available = set(ckpt.keys())

        def read(path, shape, layer=None):
            name = hf_key(path, arch.layer_list, layer)
            found = _find_key(name, available, arch.base_prefix)
            if found is None:
                return None, name
            used.add(found)
            tensor = from_hf_tensor(path, ckpt.get(found))
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(
                    f"weight {found!r} in {directory} has shape {tuple(ckpt.shape(found))}, "
                    f"which gives {tuple(tensor.shape)} for parameter {path!r}; "
                    f"the model expects {tuple(shape)} (check config.json against the weights)"
                )
            return tensor.astype(param_dtype), name

        for path, leaf in wanted.items():
            if is_stacked(path, arch.layer_list):
                slices = [read(path, leaf.shape[1:], i) for i in range(leaf.shape[0])]
                absent = [name for t, name in slices if t is None]
                if absent:
                    missing.append((path, absent[0]))
                    continue
                loaded[path] = jnp.stack([t for t, _ in slices])
            else:
                tensor, name = read(path, leaf.shape)
                if tensor is None:
                    missing.append((path, name))
                    continue
                loaded[path] = tensor
    not_head = [(p, n) for p, n in missing if not _is_new_head(p, arch)]
    if not_head:
        names = ", ".join(f"{n!r} (for {p})" for p, n in not_head[:5])
        raise ValueError(f"{directory} lacks {len(not_head)} weight(s) the model needs: {names}")
    if missing:
        if key is None:
            heads = sorted(p for p, _ in missing)
            raise ValueError(
                f"{directory} has no weights for the new head {heads}: pass key= to "
                "initialise it"
            )
        loaded.update(_init_leaves(model, [p for p, _ in missing], key))
    unused = sorted(k for k in available - used if not _IGNORED_KEYS.fullmatch(k))
    if unused:
        log.info("%d checkpoint tensors unused: %s", len(unused), ", ".join(unused[:10]))
    return paths.unflatten({p: loaded[p] for p in wanted})


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

    >>> model = build_model("tests/fixtures/hf/tiny_llama", scan_layers=True)  # doctest: +SKIP
    >>> params = load_params(model, "tests/fixtures/hf/tiny_llama")  # doctest: +SKIP
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
    return ARCHITECTURES[model_type].build(
        config, keys, num_labels=num_labels, pooling=pooling, dtype=dtype,
        param_dtype=param_dtype, scan_layers=scan_layers, remat=remat,
    )


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
) -> tuple[nn.Module, dict]:
    """``(model, params)`` from a local Hugging Face directory, without torch.

    Args:
      directory: holds ``config.json`` and ``model.safetensors`` (or a sharded index).
      num_labels: for BERT, build ``BertForSequenceClassification`` with this many labels
        (its ``classifier`` is initialised from ``key`` when the checkpoint lacks one).
      pooling: the classifier's pooling, "pooler" (default) or "mean".
      key: PRNG key for parameters the checkpoint lacks (a new head).
      dtype: compute dtype; param_dtype: the params' dtype.
      scan_layers: build the layers as one ``nn.scan`` (params stacked along a layer axis).
      remat: rematerialise each layer in the backward pass.

    >>> model, params = from_pretrained(lowrank.assets.minilm_dir())  # doctest: +SKIP
    >>> model.apply({"params": params}, ids, mask).last_hidden_state  # doctest: +SKIP
    """
    model = build_model(
        directory, num_labels=num_labels, pooling=pooling, dtype=dtype,
        param_dtype=param_dtype, scan_layers=scan_layers, remat=remat,
    )
    return model, load_params(model, directory, key=key)


# ----------------------------------------------------------------------------- writing


def hf_tensors(model: nn.Module, params: Mapping) -> Iterator[tuple[str, jax.Array]]:
    """``(hf_key, tensor)`` for every parameter, in Hugging Face's layout; scans unstacked.

    >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
    ...                   num_hidden_layers=1, num_attention_heads=2)
    >>> m = LlamaForCausalLM(cfg); p = m.init(jax.random.key(0), jnp.ones((1, 2), int))
    >>> dict(hf_tensors(m, p["params"]))["lm_head.weight"].shape
    (8, 4)
    """
    arch = architecture_of(model)
    for path, leaf in paths.flatten(params).items():
        if is_stacked(path, arch.layer_list):
            for i in range(leaf.shape[0]):
                yield hf_key(path, arch.layer_list, i), to_hf_tensor(path, leaf[i])
        else:
            yield hf_key(path, arch.layer_list), to_hf_tensor(path, leaf)


def save_pretrained(
    directory: str | Path,
    model: nn.Module,
    params: Mapping,
    *,
    max_shard_bytes: int | None = None,
    extra_config: Mapping | None = None,
) -> Path:
    """Writes ``config.json`` and safetensors weights that transformers and
    :func:`from_pretrained` read.

    Args:
      directory: created if missing.
      model, params: one of our models and its (dense, unquantized) params; merge adapters
        into the params first to export a fine-tuned model.
      max_shard_bytes: split the weights into ``model-0000i-of-0000n.safetensors`` shards of at
        most this size (plus ``model.safetensors.index.json``); one file when None.
      extra_config: more ``config.json`` fields (token ids, a label map).

    >>> save_pretrained("/tmp/tiny", model, params)  # doctest: +SKIP
    PosixPath('/tmp/tiny')
    """
    arch = architecture_of(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = arch.to_config(model)
    # transformers 4 reads torch_dtype, 5 reads dtype.
    config["torch_dtype"] = config["dtype"] = jnp.dtype(model.param_dtype).name
    config.update(extra_config or {})
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    tensors = {k: jnp.asarray(v) for k, v in hf_tensors(model, params)}
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    shards: list[dict[str, jax.Array]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.size * t.dtype.itemsize
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for stale in [*directory.glob("model-*-of-*.safetensors"), directory / SINGLE_FILE]:
        stale.unlink(missing_ok=True)
    if max_shard_bytes is None:
        (directory / INDEX_FILE).unlink(missing_ok=True)
        safetensors.flax.save_file(shards[0], str(directory / SINGLE_FILE), metadata=metadata)
        return directory
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{n:05d}.safetensors"
        safetensors.flax.save_file(shard, str(directory / file), metadata=metadata)
        weight_map.update({k: file for k in shard})
    total = int(sum(t.size * t.dtype.itemsize for t in tensors.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return directory


__all__ = [
    "ARCHITECTURES", "Architecture", "Checkpoint", "abstract_params", "architecture_of",
    "bert_config_from_hf", "build_model", "from_pretrained", "hf_key", "hf_tensors",
    "llama_config_from_hf", "load_params", "read_config", "save_pretrained",
]
