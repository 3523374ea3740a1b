"""BBC News, the byte-level LM corpus, tokenization and resumable batches."""

import numpy as np
import pytest

from lowrank import assets, data

# SHA-256 of the default split (fractions 0.8/0.1/0.1, seed 0): ids and labels of each split.
BBC_SPLIT_SHA256 = "fa17b07279f1bafb1d2f49cc4f29d4008a6ff0b8901b7e090f8456b127003250"
TOPICS = ("business", "entertainment", "politics", "sports", "tech")


@pytest.fixture(scope="module")
def bbc():
    return data.load_bbc()


def test_bbc_has_2225_articles_in_5_sorted_topics(bbc):
    assert len(bbc) == 2225 and bbc.label_names == TOPICS
    assert np.bincount(bbc.labels).tolist() == [510, 386, 417, 511, 401]
    first = bbc.ids.index("business/001")
    assert bbc.texts[first].startswith("Ad sales boost Time Warner profit")
    assert bbc.labels[bbc.ids.index("tech/001")] == TOPICS.index("tech")


def test_bbc_split_is_stratified_disjoint_and_stable(bbc):
    splits = data.split_bbc(bbc)
    assert data.split_digest(splits) == BBC_SPLIT_SHA256
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 1779, "validation": 223, "test": 223}
    ids = [set(s.ids) for s in splits.values()]
    assert set.union(*ids) == set(bbc.ids) and sum(map(len, ids)) == len(bbc)
    for split in splits.values():
        share = np.bincount(split.labels, minlength=5) / len(split)
        np.testing.assert_allclose(share, np.bincount(bbc.labels) / len(bbc), atol=0.01)
        i = split.ids.index(split.ids[7])
        assert split.texts[i] == bbc.texts[bbc.ids.index(split.ids[7])]
    other = data.split_bbc(bbc, seed=1)
    assert data.split_digest(other) != BBC_SPLIT_SHA256
    with pytest.raises(ValueError, match="fractions must be >= 0 and sum to 1"):
        data.split_bbc(bbc, fractions=(0.8, 0.3, 0.1))


def test_bbc_classification_arrays_feed_batches(bbc):
    splits = data.split_bbc(bbc)
    tokenizer = data.load_tokenizer(assets.minilm_dir(), max_length=32)
    arrays = data.classification_arrays(splits["validation"], tokenizer)
    assert arrays["input_ids"].shape == (223, 32) and arrays["input_ids"].dtype == np.int32
    assert (arrays["input_ids"][:, 0] == 101).all() and (arrays["input_ids"][:, -1] == 102).all()
    batch = data.batch_at(arrays, step=3, batch_size=16, seed=0)
    assert batch["labels"].shape == (16,) and set(batch) == set(arrays)


def test_missing_bbc_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is not a directory"):
        data.load_bbc(tmp_path / "nothing")


# ----------------------------------------------------------------------------- tokenization


def test_tokenizer_pads_to_max_length_and_truncates_keeping_sep():
    tok = data.load_tokenizer(assets.minilm_dir(), max_length=8)
    batch = data.encode(tok, ["a b", "one two three four five six seven eight nine"])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]
    assert batch["input_ids"][1, 0] == 101 and batch["input_ids"][1, -1] == 102  # [CLS], [SEP]
    longest = data.encode(data.load_tokenizer(assets.minilm_dir(), padding="longest"), ["a b"])
    assert longest["input_ids"].tolist() == [[101, 1037, 1038, 102]]


def test_tokenizer_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json does not exist"):
        data.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="padding='left'.*accepted"):
        data.load_tokenizer(assets.minilm_dir(), padding="left")
    with pytest.raises(TypeError, match="got one str"):
        data.encode(data.load_tokenizer(assets.minilm_dir()), "a sentence")


def test_byte_tokens_round_trip():
    text = "déjà vu: λx. x + 1\n"
    ids = data.encode_bytes(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode()) and ids.max() < 256
    assert data.decode_bytes([data.BOS_ID, *ids, data.EOS_ID, data.PAD_ID]) == text
    with pytest.raises(ValueError, match=r"byte ids lie in \[0, 259\), got 0..300"):
        data.decode_bytes([0, 300])


# ----------------------------------------------------------------------------- LM corpus


def test_lm_corpus_splits_are_deterministic_and_disjoint():
    docs = data.python_documents(max_bytes=400_000)
    assert list(docs) == sorted(docs) and sum(len(t.encode()) for t in docs.values()) <= 400_000
    train = data.split_documents(docs, "train")
    val = data.split_documents(docs, "validation")
    assert not set(train) & set(val) and set(train) | set(val) == set(docs)
    assert len(val) == round(0.1 * len(docs))
    a = data.lm_tokens("english", "validation")
    np.testing.assert_array_equal(a, data.lm_tokens("english", "validation"))
    assert a[0] == data.BOS_ID and a[-1] == data.EOS_ID
    assert (a == data.BOS_ID).sum() == len(data.split_documents(data.english_documents(),
                                                                "validation"))


def test_python_and_english_differ_as_domains():
    def unigrams(tokens):
        counts = np.bincount(tokens, minlength=data.BYTE_VOCAB_SIZE) + 1.0
        return counts / counts.sum()

    def kl(p, q):
        return float((p * np.log(p / q)).sum())

    py = {s: unigrams(data.lm_tokens("python", s, max_bytes=1_000_000))
          for s in ("train", "validation")}
    en = {s: unigrams(data.lm_tokens("english", s)) for s in ("train", "validation")}
    # Held-out text of the other domain is much further away than held-out text of the same.
    assert kl(en["validation"], py["train"]) > 2 * kl(py["validation"], py["train"])
    assert kl(py["validation"], en["train"]) > 2 * kl(en["validation"], en["train"])
    assert len(data.lm_tokens("english", "train")) > 300_000  # a real corpus


def test_lm_windows_and_bad_input():
    w = data.lm_windows(np.arange(20, dtype=np.int32), seq_len=4)
    assert w["inputs"].shape == (4, 4)
    np.testing.assert_array_equal(w["targets"], w["inputs"] + 1)
    with pytest.raises(ValueError, match="domain='latin'.*accepted"):
        data.lm_tokens("latin", "train")
    with pytest.raises(ValueError, match="split='test'.*accepted"):
        data.lm_tokens("english", "test")
    with pytest.raises(ValueError, match="3 tokens make no window of 5"):
        data.lm_windows(np.arange(3), seq_len=4)


# ----------------------------------------------------------------------------- batches


def test_batches_are_a_function_of_seed_and_step():
    dataset = {"x": np.arange(50), "y": np.arange(50) * 2}
    b = data.Batches(dataset, batch_size=8, seed=3)
    assert b.steps_per_epoch == 6
    epoch0 = np.concatenate([b.at(s)["x"] for s in range(6)])
    assert len(set(epoch0)) == 48  # one pass, each example at most once
    epoch1 = np.concatenate([b.at(s)["x"] for s in range(6, 12)])
    assert not np.array_equal(epoch0, epoch1)  # a new order each epoch
    np.testing.assert_array_equal(b.at(4)["y"], 2 * b.at(4)["x"])
    # resuming at step 9 sees what an uninterrupted run sees
    it, resumed = iter(b), iter(data.Batches(dataset, 8, seed=3, start_step=9))
    straight = [next(it)["x"] for _ in range(12)][9:]
    for expected in straight:
        np.testing.assert_array_equal(next(resumed)["x"], expected)
    assert not np.array_equal(data.Batches(dataset, 8, seed=4).at(0)["x"], b.at(0)["x"])
    # pinned, so that a change of generator or numpy shows: permutations of [seed, epoch]
    assert b.at(0)["x"].tolist() == [2, 11, 17, 28, 32, 23, 30, 41]
    assert b.at(7)["x"].tolist() == [10, 39, 12, 13, 45, 11, 43, 8]


def test_batches_bad_input_is_named():
    with pytest.raises(ValueError, match=r"batch_size must lie in 1..5 .* got 6"):
        data.batch_at({"x": np.arange(5)}, 0, 6, seed=0)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        data.batch_at({"x": np.arange(5)}, -1, 2, seed=0)
    with pytest.raises(ValueError, match="disagree on the number of examples"):
        data.batch_at({"x": np.arange(5), "y": np.arange(4)}, 0, 2, seed=0)


def test_eval_batches_cover_every_example_once():
    batches = list(data.eval_batches({"x": np.arange(7)}, 3))
    assert [b["x"].shape for b in batches] == [(3,)] * 3
    seen = np.concatenate([b["x"][b["valid"]] for b in batches])
    assert seen.tolist() == list(range(7))
