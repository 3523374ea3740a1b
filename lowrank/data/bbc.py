"""BBC News topic classification: 2225 articles, 5 topics, a stratified deterministic split.

>>> splits = split_bbc(load_bbc())  # doctest: +SKIP
>>> len(splits["train"].texts), splits["train"].label_names  # doctest: +SKIP
(1780, ('business', 'entertainment', 'politics', 'sports', 'tech'))
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import tokenizers

from lowrank.data.splits import hash_order, split_sizes
from lowrank.data.tokenize import encode

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels; ``ids`` name each example ("business/001")."""

    ids: tuple[str, ...]
    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, ids: list[str]) -> TextDataset:
        """The examples named ``ids``, in that order."""
        where = {id_: i for i, id_ in enumerate(self.ids)}
        idx = [where[i] for i in ids]
        return TextDataset(
            tuple(ids), tuple(self.texts[i] for i in idx), self.labels[idx], self.label_names
        )


def load_bbc(directory: str | Path | None = None) -> TextDataset:
    """All BBC News articles, ordered by id; labels index the topics in sorted order.

    Args:
      directory: holds ``<topic>/<nnn>.txt``; by default the ``bbc`` asset (fetched once
        through :mod:`lowrank.assets`).

    >>> load_bbc().label_names  # doctest: +SKIP
    ('business', 'entertainment', 'politics', 'sports', 'tech')
    """
    if directory is None:
        from lowrank.assets import bbc_dir

        directory = bbc_dir()
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory of <topic>/<nnn>.txt files")
    topics = tuple(sorted(p.name for p in directory.iterdir() if p.is_dir()))
    if not topics:
        raise FileNotFoundError(f"{directory} has no topic folders")
    ids, texts, labels = [], [], []
    for label, topic in enumerate(topics):
        for file in sorted((directory / topic).glob("*.txt")):
            ids.append(f"{topic}/{file.stem}")
            # One article holds a stray non-UTF-8 byte; replacing it keeps loading deterministic.
            texts.append(file.read_bytes().decode("utf-8", errors="replace").strip())
            labels.append(label)
    return TextDataset(tuple(ids), tuple(texts), np.array(labels, np.int32), topics)


def split_bbc(
    dataset: TextDataset, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, TextDataset]:
    """Stratified train/validation/test split: within each topic, articles are ordered by a hash
    of ``seed`` and their id (:func:`hash_order`) and cut by ``fractions``. Each split lists its
    articles by id.

    >>> {k: len(v) for k, v in split_bbc(load_bbc()).items()}  # doctest: +SKIP
    {'train': 1779, 'validation': 223, 'test': 223}
    """
    if len(fractions) != len(SPLITS):
        raise ValueError(f"fractions gives one share per split of {SPLITS}, got {fractions}")
    chosen: dict[str, list[str]] = {s: [] for s in SPLITS}
    for label in range(len(dataset.label_names)):
        ids = [i for i, y in zip(dataset.ids, dataset.labels, strict=True) if y == label]
        ordered = hash_order(ids, seed)
        start = 0
        for split, size in zip(SPLITS, split_sizes(len(ordered), fractions), strict=True):
            chosen[split] += ordered[start:start + size]
            start += size
    return {s: dataset.subset(sorted(ids)) for s, ids in chosen.items()}


def split_digest(splits: dict[str, TextDataset]) -> str:
    """SHA-256 over each split's ids and labels: a fingerprint to compare runs and machines.

    >>> split_digest(split_bbc(load_bbc()))[:12]  # doctest: +SKIP
    '...'
    """
    h = hashlib.sha256()
    for name in sorted(splits):
        for id_, y in zip(splits[name].ids, splits[name].labels, strict=True):
            h.update(f"{name}\t{id_}\t{int(y)}\n".encode())
    return h.hexdigest()


def classification_arrays(
    dataset: TextDataset, tokenizer: tokenizers.Tokenizer
) -> dict[str, np.ndarray]:
    """Token arrays plus ``labels``, ready for :func:`lowrank.data.batch_at`.

    >>> tok = load_tokenizer(minilm_dir())  # doctest: +SKIP
    >>> arrays = classification_arrays(splits["train"], tok)  # doctest: +SKIP
    >>> sorted(arrays)  # doctest: +SKIP
    ['attention_mask', 'input_ids', 'labels', 'token_type_ids']
    """
    return {**encode(tokenizer, dataset.texts), "labels": np.asarray(dataset.labels, np.int32)}
