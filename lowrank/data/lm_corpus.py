"""A byte-level language-modelling corpus with a domain shift that every Python install has:
the standard library's Python source ("python": its top-level modules; "python_tree": all of
it) vs the English help topics of ``pydoc_data/topics.py`` ("english").

>>> train = lm_tokens("python", "train", max_bytes=1_000_000)
>>> windows = lm_windows(train, seq_len=128)
>>> windows["inputs"].shape[1], windows["targets"].shape[1]
(128, 128)
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from lowrank.data.splits import hash_order, split_sizes
from lowrank.data.tokenize import BOS_ID, EOS_ID, encode_bytes

DOMAINS = ("python", "python_tree", "english")
LM_SPLITS = ("train", "validation")


def python_documents(max_bytes: int | None = None, *, tree: bool = False) -> dict[str, str]:
    """``{file name: source}`` of the standard library's top-level ``*.py`` files, in sorted
    order (``tree``: every ``*.py`` file below it too, the test suite included, keyed by the
    path relative to it; ``site-packages`` left out, so installed packages never change the
    corpus); with ``max_bytes``, the longest prefix of that order within the budget (at least
    one file).

    >>> "os.py" in python_documents()
    True
    >>> "json/decoder.py" in python_documents(tree=True)
    True
    """
    stdlib = Path(sysconfig.get_path("stdlib"))
    files = sorted(f.relative_to(stdlib).as_posix() for f in (
        stdlib.rglob("*.py") if tree else stdlib.glob("*.py")) if "site-packages" not in
        f.relative_to(stdlib).parts)
    if not files:
        raise FileNotFoundError(f"no *.py files in the standard library directory {stdlib}")
    docs: dict[str, str] = {}
    total = 0
    for name in files:
        text = (stdlib / name).read_bytes().decode("utf-8", errors="replace")
        size = len(text.encode("utf-8"))
        if max_bytes is not None and docs and total + size > max_bytes:
            break
        docs[name] = text
        total += size
    return docs


def english_documents() -> dict[str, str]:
    """``{topic: text}`` of pydoc's help topics (the language reference in English), sorted.

    >>> "if" in english_documents()
    True
    """
    from pydoc_data.topics import topics

    return {name: topics[name] for name in sorted(topics)}


def documents(domain: str, max_bytes: int | None = None) -> dict[str, str]:
    """The documents of ``domain``: "python" (the standard library's top-level modules),
    "python_tree" (every module of it, 31.5 MB on CPython 3.11) or "english" (``max_bytes``
    applies to the Python domains)."""
    if domain in ("python", "python_tree"):
        return python_documents(max_bytes, tree=domain == "python_tree")
    if domain == "english":
        return english_documents()
    raise ValueError(f"domain={domain!r} is not supported; accepted: {DOMAINS}")


def split_documents(
    docs: dict[str, str], split: str, validation_fraction: float = 0.1, seed: int = 0
) -> dict[str, str]:
    """The documents of ``split``: validation takes ``validation_fraction`` of them, chosen by
    :func:`hash_order`; both keep the sorted order of names.

    >>> sorted(split_documents({"a": "", "b": "", "c": ""}, "validation", 1 / 3)) != []
    True
    """
    if split not in LM_SPLITS:
        raise ValueError(f"split={split!r} is not supported; accepted: {LM_SPLITS}")
    n_train, n_val = split_sizes(len(docs), (1.0 - validation_fraction, validation_fraction))
    if n_train == 0 or n_val == 0:
        raise ValueError(
            f"validation_fraction={validation_fraction} leaves an empty split of {len(docs)} "
            "documents"
        )
    validation = set(hash_order(docs, seed)[:n_val])
    keep = validation if split == "validation" else set(docs) - validation
    return {name: docs[name] for name in docs if name in keep}


def lm_tokens(
    domain: str,
    split: str,
    *,
    validation_fraction: float = 0.1,
    seed: int = 0,
    max_bytes: int | None = None,
) -> np.ndarray:
    """One int32 stream of byte tokens: every document of the split as BOS, bytes, EOS.

    >>> tokens = lm_tokens("english", "validation")
    >>> int(tokens[0]) == BOS_ID
    True
    """
    docs = split_documents(documents(domain, max_bytes), split, validation_fraction, seed)
    bos, eos = np.array([BOS_ID], np.int32), np.array([EOS_ID], np.int32)
    return np.concatenate([np.concatenate([bos, encode_bytes(t), eos]) for t in docs.values()])


def lm_windows(tokens: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Non-overlapping windows of ``seq_len + 1`` tokens as ``inputs`` and next-token
    ``targets``, each ``[n, seq_len]`` (the remainder is dropped).

    >>> w = lm_windows(np.arange(10, dtype=np.int32), 4)
    >>> w["inputs"].tolist(), w["targets"].tolist()
    ([[0, 1, 2, 3], [5, 6, 7, 8]], [[1, 2, 3, 4], [6, 7, 8, 9]])
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = len(tokens) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens make no window of {seq_len + 1}")
    windows = np.asarray(tokens[: n * (seq_len + 1)]).reshape(n, seq_len + 1)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
