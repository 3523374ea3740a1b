"""Datasets (BBC News topics, a byte-level code-vs-English LM corpus) and resumable batching.

>>> from lowrank import data
>>> batches = data.Batches(data.lm_windows(data.lm_tokens("english", "train"), 128), 8, seed=0)
>>> batches.at(0)["inputs"].shape
(8, 128)
"""

from lowrank.data.batches import (
    Batches,
    batch_at,
    batch_indices,
    eval_batches,
    sampler,
    steps_per_epoch,
)
from lowrank.data.bbc import TextDataset, classification_arrays, load_bbc, split_bbc, split_digest
from lowrank.data.lm_corpus import (
    DOMAINS,
    documents,
    english_documents,
    lm_tokens,
    lm_windows,
    python_documents,
    split_documents,
)
from lowrank.data.splits import hash_order, split_sizes
from lowrank.data.tokenize import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    EOS_ID,
    PAD_ID,
    decode_bytes,
    encode,
    encode_bytes,
    load_tokenizer,
)

__all__ = [
    "BOS_ID", "BYTE_VOCAB_SIZE", "DOMAINS", "EOS_ID", "PAD_ID", "Batches", "TextDataset",
    "batch_at", "batch_indices", "classification_arrays", "decode_bytes", "documents", "encode",
    "encode_bytes", "english_documents", "eval_batches", "hash_order", "lm_tokens", "lm_windows",
    "load_bbc", "load_tokenizer", "python_documents", "sampler", "split_bbc", "split_digest",
    "split_documents", "split_sizes", "steps_per_epoch",
]
