"""Safetensors weights of a Hugging Face directory, read and written one tensor at a time.

Reading goes through the ``safetensors`` library, but each tensor is read through its own
short-lived handle. A handle memory-maps the whole file and every page a read touches stays
resident until the handle closes, so reading a 2 GB shard through one handle holds 2 GB of
the process's memory however little of it is kept (measured: +262 MiB of RSS after reading a
256 MiB file through one open handle). Closing after each tensor keeps one tensor's pages.

Writing is streamed: the library's ``save_file`` takes every tensor of a file at once (and
copies them), so :func:`write_safetensors` writes the format's header from the shapes and
then each tensor as it is produced; the files it writes are read back by the library.
Nothing here unpickles.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import safetensors

from lowrank.files import BadFileError, read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# The format's dtype names (https://github.com/huggingface/safetensors, "Format").
_DTYPE_NAMES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
"""Safetensors dtype names a float parameter is read from."""


def read_config(directory: str | Path) -> dict:
    """The parsed ``config.json`` of a Hugging Face model directory.

    >>> read_config("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    FileNotFoundError: ...
    """
    file = Path(directory) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: a Hugging Face model directory holds config.json and "
            f"{SINGLE_FILE} (or {INDEX_FILE} with its shards)"
        )
    config = read_json(file, "a Hugging Face model config")
    if not isinstance(config, dict):
        raise BadFileError(f"{file} holds a JSON {type(config).__name__}, not an object")
    return config


class Checkpoint:
    """Read access to the safetensors weights of a directory (one file or a sharded index).

    Shapes and dtypes come from the files' headers; :meth:`get` reads one tensor through its
    own handle (see the module docstring) and names the file and the tensor in any error.

    >>> with Checkpoint("tests/fixtures/hf/tiny_llama") as ckpt:
    ...     ckpt.shape("lm_head.weight"), ckpt.dtype("lm_head.weight")
    ((64, 16), 'F32')
    """

    def __init__(self, directory: str | Path):
        self.directory = directory = Path(directory)
        index_file = directory / INDEX_FILE
        if index_file.is_file():
            index = read_json(index_file, "a safetensors index")
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise BadFileError(f"{index_file} is not a safetensors index: no "
                                   "'weight_map' object")
            weight_map = index["weight_map"]
            self._file_of = {k: directory / f for k, f in weight_map.items()}
        elif (directory / SINGLE_FILE).is_file():
            self._file_of = None
        else:
            found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
            hint = ""
            if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in found):
                hint = " (pickled torch weights are not read; convert them to safetensors)"
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}; found: {found}"
            )
        self._headers: dict[Path, dict[str, tuple[str, tuple[int, ...]]]] = {}
        if self._file_of is None:
            single = directory / SINGLE_FILE
            self._file_of = {k: single for k in self._header(single)}

    def _header(self, file: Path, key: str | None = None
                ) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``{name: (dtype, shape)}`` of one file, read once (the library validates it)."""
        if file not in self._headers:
            wanted = "" if key is None else f" (reading tensor {key!r})"
            if not file.is_file():
                raise FileNotFoundError(f"checkpoint shard {file} is missing{wanted}")
            try:
                with safetensors.safe_open(str(file), framework="numpy") as f:
                    self._headers[file] = {
                        k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                        for k in f.keys()
                    }
            except safetensors.SafetensorError as e:
                raise BadFileError(f"{file} is not a readable safetensors file (damaged or "
                                 f"truncated?){wanted}: {e}") from None
        return self._headers[file]

    def _entry(self, key: str) -> tuple[str, tuple[int, ...]]:
        if key not in self._file_of:
            raise KeyError(f"{self.directory} has no tensor {key!r}")
        file = self._file_of[key]
        header = self._header(file, key)
        if key not in header:
            raise ValueError(f"{file} lacks tensor {key!r}, which {INDEX_FILE} places there")
        return header[key]

    def keys(self) -> list[str]:
        """Every tensor name the directory lists."""
        return list(self._file_of)

    def file(self, key: str) -> Path:
        """The file that holds tensor ``key``."""
        return self._file_of[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key``, from its file's header."""
        return self._entry(key)[1]

    def dtype(self, key: str) -> str:
        """Safetensors dtype name of tensor ``key`` ("BF16", "F32", "U8", ...)."""
        return self._entry(key)[0]

    def get(self, key: str) -> np.ndarray:
        """Tensor ``key`` as a numpy array (bfloat16 as ``ml_dtypes.bfloat16``)."""
        self._entry(key)
        file = self._file_of[key]
        try:
            with safetensors.safe_open(str(file), framework="numpy") as f:
                return f.get_tensor(key)
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise BadFileError(f"{file}: cannot read tensor {key!r} (damaged or truncated "
                             f"file?): {e}") from None

    def close(self) -> None:
        """Nothing stays open between reads; kept so ``with Checkpoint(...)`` reads well."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dtype_name(dtype: Any) -> str:
    """The safetensors name of a numpy / JAX dtype.

    >>> dtype_name(jax.numpy.bfloat16), dtype_name(np.float32)
    ('BF16', 'F32')
    """
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} has no safetensors name; accepted: "
                         f"{sorted(str(d) for d in _DTYPE_NAMES)}")
    return _DTYPE_NAMES[dtype]


def write_safetensors(
    file: str | Path,
    layout: Mapping[str, jax.ShapeDtypeStruct],
    produce: Callable[[str], Any],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes a safetensors file one tensor at a time: memory = the largest single tensor.

    Args:
      file: the file to write (replaced if it exists).
      layout: ``{name: ShapeDtypeStruct}`` of every tensor, in file order.
      produce: ``name -> array`` called once per tensor, in ``layout``'s order; the array
        must have the declared shape and dtype.
      metadata: the header's ``__metadata__`` (transformers wants ``{"format": "pt"}``).

    >>> import tempfile, jax.numpy as jnp
    >>> f = Path(tempfile.mkdtemp()) / "w.safetensors"
    >>> spec = {"w": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16)}
    >>> _ = write_safetensors(f, spec, lambda name: np.ones((2, 3), ml_dtypes.bfloat16))
    >>> with safetensors.safe_open(str(f), "numpy") as r: r.get_tensor("w").shape
    (2, 3)
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, spec in layout.items():
        nbytes = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
        header[name] = {"dtype": dtype_name(spec.dtype), "shape": list(spec.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the library's
    file = Path(file)
    with open(file, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, spec in layout.items():
            array = np.ascontiguousarray(produce(name))
            if array.shape != tuple(spec.shape) or array.dtype != np.dtype(spec.dtype):
                raise ValueError(f"{file}: tensor {name!r} was declared {tuple(spec.shape)} "
                                 f"{np.dtype(spec.dtype)} but produced {array.shape} "
                                 f"{array.dtype}")
            # A byte view (ml_dtypes arrays export no buffer of their own dtype); little-endian
            # on every platform JAX runs on.
            out.write(array.reshape(-1).view(np.uint8).data)
    return file


def write_checkpoint(
    directory: str | Path,
    layout: Mapping[str, jax.ShapeDtypeStruct],
    produce: Callable[[str], Any],
    *,
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Writes the weights of a Hugging Face directory, streamed one tensor at a time.

    One ``model.safetensors``, or with ``max_shard_bytes`` shards
    ``model-0000i-of-0000n.safetensors`` of at most that size (a larger tensor gets a shard
    of its own) and ``model.safetensors.index.json``. Stale weight files are removed first.

    Args:
      directory: an existing directory.
      layout, produce, metadata: as for :func:`write_safetensors`.
      max_shard_bytes: the shard size, or None for one file.

    Returns:
      the files written, in order.

    >>> import tempfile, jax.numpy as jnp
    >>> d = Path(tempfile.mkdtemp())
    >>> spec = {f"w{i}": jax.ShapeDtypeStruct((4,), jnp.float32) for i in range(3)}
    >>> [f.name for f in write_checkpoint(d, spec, lambda n: np.zeros(4, np.float32),
    ...                                   max_shard_bytes=32)]
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    directory = Path(directory)
    sizes = {k: math.prod(v.shape) * np.dtype(v.dtype).itemsize for k, v in layout.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    for stale in [*directory.glob("model-*-of-*.safetensors"), directory / SINGLE_FILE,
                  directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if max_shard_bytes is None:
        return [write_safetensors(directory / SINGLE_FILE, layout, produce, metadata)]
    files, weight_map = [], {}
    for i, names in enumerate(shards, 1):
        file = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        files.append(write_safetensors(file, {k: layout[k] for k in names}, produce, metadata))
        weight_map.update({k: file.name for k in names})
    index = {"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


__all__ = ["FLOAT_DTYPES", "INDEX_FILE", "SINGLE_FILE", "Checkpoint", "dtype_name",
           "read_config", "write_checkpoint", "write_safetensors"]
