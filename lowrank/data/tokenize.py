"""Tokenization: Hugging Face ``tokenizer.json`` files through ``tokenizers``, and raw bytes.

>>> tok = load_tokenizer(minilm_dir(), max_length=128)  # doctest: +SKIP
>>> encode(tok, ["A man plays a guitar."])["input_ids"].shape  # doctest: +SKIP
(1, 128)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tokenizers

PADDINGS = ("max_length", "longest")

# Byte-level vocabulary: the 256 byte values, then three special tokens.
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
BYTE_VOCAB_SIZE = 259


def load_tokenizer(
    path: str | Path, *, max_length: int = 128, padding: str = "max_length"
) -> tokenizers.Tokenizer:
    """The tokenizer of ``path`` (a ``tokenizer.json`` or a directory holding one), set to
    truncate to ``max_length`` tokens and to pad to ``max_length`` ("max_length": every batch
    the same shape, so a jitted step compiles once) or to the longest text ("longest").

    The file's own truncation and padding settings are replaced.

    >>> tok = load_tokenizer("minilm/tokenizer.json", max_length=16)  # doctest: +SKIP
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: pass a tokenizer.json or its directory")
    if padding not in PADDINGS:
        raise ValueError(f"padding={padding!r} is not supported; accepted: {PADDINGS}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (room for special tokens), got {max_length}")
    tok = tokenizers.Tokenizer.from_file(str(file))
    pad = tok.padding or {}
    pad_token = pad.get("pad_token") or next(
        (t for t in ("[PAD]", "<pad>") if tok.token_to_id(t) is not None), None
    )
    if pad_token is None:
        raise ValueError(f"{file} names no padding token and has neither [PAD] nor <pad>")
    tok.no_truncation()
    tok.enable_truncation(max_length)  # keeps room for [CLS]/[SEP], unlike slicing ids
    tok.enable_padding(
        pad_id=tok.token_to_id(pad_token), pad_token=pad_token,
        length=max_length if padding == "max_length" else None,
    )
    return tok


def encode(tokenizer: tokenizers.Tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask``, ``token_type_ids``: int32 arrays ``[len(texts), L]``.

    >>> batch = encode(tok, ["hello world", "hi"])  # doctest: +SKIP
    >>> batch["attention_mask"][1, :4].tolist()  # doctest: +SKIP
    [1, 1, 1, 0]
    """
    if isinstance(texts, str):
        raise TypeError("encode takes a sequence of texts, got one str: wrap it in a list")
    encodings = tokenizer.encode_batch(list(texts))
    as_array = lambda field: np.array(  # noqa: E731
        [getattr(e, field) for e in encodings], dtype=np.int32
    ).reshape(len(encodings), -1)
    return {
        "input_ids": as_array("ids"),
        "attention_mask": as_array("attention_mask"),
        "token_type_ids": as_array("type_ids"),
    }


def encode_bytes(text: str) -> np.ndarray:
    """The UTF-8 bytes of ``text`` as int32 token ids in ``[0, 256)``.

    >>> encode_bytes("hé").tolist()
    [104, 195, 169]
    """
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode_bytes(ids: Sequence[int] | np.ndarray) -> str:
    """The text of byte ids; special tokens are dropped, broken UTF-8 becomes U+FFFD.

    >>> decode_bytes([BOS_ID, 104, 105, EOS_ID])
    'hi'
    """
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= BYTE_VOCAB_SIZE):
        raise ValueError(f"byte ids lie in [0, {BYTE_VOCAB_SIZE}), got {ids.min()}..{ids.max()}")
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
