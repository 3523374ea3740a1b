"""Reading the JSON and safetensors files users hand us, with every error naming the file.

The libraries' own errors ("Expecting value: line 1 column 1", "Error while deserializing
header: ...") do not say which file they were reading; with a directory of several, the user
is left to guess.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class BadFileError(ValueError):
    """A file exists but cannot be parsed (truncated, overwritten, not of its format)."""


def read_json(file: str | Path, what: str = "a JSON file") -> Any:
    """The parsed JSON of ``file``; a missing or unparsable file raises an error naming it.

    Args:
      file: the path.
      what: what the file should be, for the error ("PEFT's adapter_config.json").

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "config.json"
    >>> _ = path.write_text('{"a": 1')
    >>> read_json(path, "a model config")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lowrank.files.BadFileError: .../config.json is not valid JSON (a model config): Expecting...
    """
    path = Path(file)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist ({what})") from None
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise BadFileError(f"{path} is not valid JSON ({what}): {e}") from None


def read_safetensors(file: str | Path, what: str = "a safetensors file") -> dict[str, Any]:
    """Every tensor of the safetensors ``file`` as ``{name: jax.Array}``; a missing,
    truncated or overwritten file raises an error naming it.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "adapter_model.safetensors"
    >>> _ = path.write_bytes(b"not a safetensors file")
    >>> read_safetensors(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lowrank.files.BadFileError: .../adapter_model.safetensors cannot be read as safetensors...
    """
    import safetensors.flax

    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist ({what})")
    try:
        return safetensors.flax.load_file(str(path))
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise BadFileError(f"{path} cannot be read as safetensors ({what}; truncated or "
                           f"overwritten?): {e}") from None
