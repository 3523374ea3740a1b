"""The real all-MiniLM-L6-v2 (fetched through lowrank.assets) against transformers' embeddings."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lowrank import assets, data, models

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


@pytest.fixture(scope="module")
def minilm():
    return models.from_pretrained(assets.minilm_dir())


def test_minilm_sentence_embeddings_match_transformers(minilm):
    model, params = minilm
    assert isinstance(model, models.BertModel) and model.config.num_hidden_layers == 6
    sentences = json.loads((FIXTURES / "minilm_sentences.json").read_text())
    ref = load_file(str(FIXTURES / "minilm_reference.safetensors"))
    tokenizer = data.load_tokenizer(assets.minilm_dir(), padding="longest")
    batch = data.encode(tokenizer, sentences)
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])

    @jax.jit
    def embed(params, ids, mask):
        hidden = model.apply({"params": params}, ids, mask).last_hidden_state
        return models.mean_pool(hidden, mask)

    emb = embed(params, batch["input_ids"], batch["attention_mask"])
    assert float(jnp.max(jnp.abs(emb - ref["mean_pooled"]))) < 1e-4

    unit = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    cos = unit @ unit.T
    # 0: "A man is playing a guitar.", 1: its paraphrase, 2: stock market, 3: physics
    assert float(cos[0, 1]) > 0.6
    assert float(cos[0, 1]) > float(cos[0, 2]) + 0.3
    assert float(cos[0, 1]) > float(cos[0, 3]) + 0.3
