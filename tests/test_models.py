"""Our BERT and Llama models against transformers (fixtures from
scripts/fixtures/make_hf_fixtures.py), checkpoint round trips, and bad checkpoints."""

import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lowrank import models
from lowrank.models import hf

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
TOL = 1e-4


def reference(name):
    return load_file(str(FIXTURES / f"{name}_reference.safetensors"))


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("scan, remat", [(False, False), (True, True)])
def test_bert_matches_transformers_bert_model(scan, remat):
    model, params = models.from_pretrained(FIXTURES / "tiny_bert", scan_layers=scan, remat=remat)
    assert isinstance(model, models.BertModel) and model.add_pooling_layer
    ref = reference("tiny_bert")
    out = model.apply({"params": params}, ref["input_ids"], ref["attention_mask"],
                      ref["token_type_ids"])
    # The second row is padded: the mask matters, and its real tokens must still match.
    assert max_diff(out.last_hidden_state, ref["last_hidden_state"]) < TOL
    assert max_diff(out.pooler_output, ref["pooler_output"]) < TOL
    unmasked = model.apply({"params": params}, ref["input_ids"], None, ref["token_type_ids"])
    assert max_diff(unmasked.last_hidden_state[1, :6], ref["last_hidden_state"][1, :6]) > 1e-2


def test_bert_classifier_matches_transformers():
    model, params = models.from_pretrained(FIXTURES / "tiny_bert_cls")
    assert isinstance(model, models.BertForSequenceClassification)
    assert (model.num_labels, model.pooling) == (3, "pooler")
    ref = reference("tiny_bert_cls")
    logits = model.apply({"params": params}, ref["input_ids"], ref["attention_mask"],
                         ref["token_type_ids"])
    assert max_diff(logits, ref["logits"]) < TOL


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_llama_tied"])
@pytest.mark.parametrize("scan", [False, True])
def test_llama_matches_transformers_causal_lm(name, scan):
    model, params = models.from_pretrained(FIXTURES / name, scan_layers=scan, remat=scan)
    tied = name.endswith("tied")
    assert model.config.tie_word_embeddings == tied and ("lm_head" in params) != tied
    assert model.config.num_key_value_heads == 2 < model.config.num_attention_heads
    ref = reference(name)
    logits = model.apply({"params": params}, ref["input_ids"], ref["attention_mask"])
    assert logits.shape == ref["logits"].shape
    assert max_diff(logits, ref["logits"]) < TOL
    assert max_diff(model.apply({"params": params}, ref["input_ids"]),
                    ref["logits_without_mask"]) < TOL


def test_llama_config_reads_transformers_4_and_5_rope_fields():
    v5 = hf.llama_config_from_hf({"rope_parameters": {"rope_type": "default",
                                                      "rope_theta": 5e5}})
    v4 = hf.llama_config_from_hf({"rope_theta": 5e5, "rope_scaling": None})
    assert v4.rope_theta == v5.rope_theta == 5e5
    with pytest.raises(ValueError, match="rope_type='llama3'.*accepted: default"):
        hf.llama_config_from_hf({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_hf_key_is_the_one_name_map_for_loops_and_scans():
    assert hf.hf_key("bert/encoder/layer_1/output/LayerNorm/scale", "layer") == \
        "bert.encoder.layer.1.output.LayerNorm.weight"
    assert hf.hf_key("model/layers/self_attn/q_proj/kernel", "layers", layer=3) == \
        "model.layers.3.self_attn.q_proj.weight"
    assert hf.hf_key("model/embed_tokens/embedding", "layers") == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="scanned stack"):
        hf.hf_key("model/layers/mlp/up_proj/kernel", "layers")


def test_dropout_follows_the_deterministic_flag():
    config = models.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=16)
    model = models.BertModel(config)
    ids = jnp.arange(12).reshape(2, 6)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    forward = jax.jit(lambda rng, det: model.apply(
        {"params": params}, ids, deterministic=det, rngs={"dropout": rng}
    ).last_hidden_state, static_argnums=1)
    run = lambda det, seed: forward(jax.random.key(seed), det)  # noqa: E731
    assert max_diff(run(True, 1), run(True, 2)) == 0.0
    assert max_diff(run(False, 1), run(False, 2)) > 1e-3
    assert max_diff(run(False, 1), run(False, 1)) == 0.0


def test_scan_and_remat_give_the_loop_gradients():
    config = models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1)
    ids = jnp.arange(16).reshape(2, 8) % 32
    loop = models.LlamaForCausalLM(config)
    scanned = models.LlamaForCausalLM(config, scan_layers=True, remat=True)
    params = jax.jit(loop.init)(jax.random.key(0), ids)["params"]
    layers = [params["model"].pop(f"layers_{i}") for i in range(2)]
    stacked = {**params, "model": {**params["model"],
                                   "layers": jax.tree.map(lambda *x: jnp.stack(x), *layers)}}
    for i, layer in enumerate(layers):
        params["model"][f"layers_{i}"] = layer
    loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, ids) ** 2)  # noqa: E731
    g_loop = jax.jit(jax.grad(loss(loop)))(params)
    g_scan = jax.jit(jax.grad(loss(scanned)))(stacked)
    assert max_diff(g_scan["model"]["layers"]["mlp"]["up_proj"]["kernel"][1],
                    g_loop["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]) < 1e-6
    assert max_diff(g_scan["lm_head"]["kernel"], g_loop["lm_head"]["kernel"]) < 1e-6


# ----------------------------------------------------------------------------- saving


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_bert_cls", "tiny_llama", "tiny_llama_tied"])
@pytest.mark.parametrize("scan", [False, True])
def test_save_pretrained_writes_back_the_same_tensors(tmp_path, name, scan):
    model, params = models.from_pretrained(FIXTURES / name, scan_layers=scan)
    models.save_pretrained(tmp_path, model, params)
    original = load_file(str(FIXTURES / name / "model.safetensors"))
    written = load_file(str(tmp_path / "model.safetensors"))
    assert set(written) == set(original)
    for k, v in original.items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)
    # and it reads back as the same kind of model
    again, _ = models.from_pretrained(tmp_path)
    assert type(again) is type(model) and again.config == model.config


def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    model, params = models.from_pretrained(FIXTURES / "tiny_llama")
    models.save_pretrained(tmp_path, model, params, max_shard_bytes=8_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    _, again = models.from_pretrained(tmp_path, scan_layers=True)
    np.testing.assert_array_equal(again["model"]["layers"]["self_attn"]["k_proj"]["kernel"][1],
                                  params["model"]["layers_1"]["self_attn"]["k_proj"]["kernel"])


def test_bfloat16_params_are_stored_and_read_as_bfloat16(tmp_path):
    model, params = models.from_pretrained(FIXTURES / "tiny_llama", param_dtype=jnp.bfloat16)
    assert params["lm_head"]["kernel"].dtype == jnp.bfloat16
    models.save_pretrained(tmp_path, model, params)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, again = models.from_pretrained(tmp_path, param_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(again["lm_head"]["kernel"], np.float32),
                                  np.asarray(params["lm_head"]["kernel"], np.float32))


def test_new_classifier_head_on_a_base_checkpoint(caplog):
    with pytest.raises(ValueError, match=r"new head \['classifier/bias', 'classifier/kernel'\]"):
        models.from_pretrained(FIXTURES / "tiny_bert", num_labels=5, pooling="mean")
    with caplog.at_level(logging.INFO, logger="lowrank.models"):
        model, params = models.from_pretrained(FIXTURES / "tiny_bert", num_labels=5,
                                               pooling="mean", key=jax.random.key(0))
    assert "pooler.dense.weight" in caplog.text  # mean pooling leaves the pooler unused
    base = load_file(str(FIXTURES / "tiny_bert" / "model.safetensors"))
    np.testing.assert_array_equal(params["bert"]["encoder"]["layer_1"]["output"]["dense"]["kernel"],
                                  base["encoder.layer.1.output.dense.weight"].T)
    assert params["classifier"]["kernel"].shape == (16, 5)
    assert float(jnp.std(params["classifier"]["kernel"])) > 0
    ref = reference("tiny_bert")
    logits = model.apply({"params": params}, ref["input_ids"], ref["attention_mask"])
    assert logits.shape == (2, 5)


# ----------------------------------------------------------------------------- bad input


def copy_fixture(tmp_path, name="tiny_bert"):
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_directory_or_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/config.json does not exist"):
        models.from_pretrained(tmp_path / "nowhere")
    d = copy_fixture(tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*pickled torch weights"):
        models.from_pretrained(d)


def test_unsupported_model_type_is_named(tmp_path):
    d = copy_fixture(tmp_path)
    edit_config(d, model_type="gpt2")
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*accepted: \['bert', 'llama'\]"):
        models.from_pretrained(d)


def test_weight_of_the_wrong_shape_is_named(tmp_path):
    d = copy_fixture(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["encoder.layer.1.attention.self.query.weight"] = np.zeros((8, 16), np.float32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'encoder.layer.1.attention.self.query.weight'.*"
                                         r"shape \(8, 16\).*expects \(16, 16\)"):
        models.from_pretrained(d)
    edit_config(d, intermediate_size=32)  # a config that disagrees with the weights
    with pytest.raises(ValueError, match=r"'encoder.layer.0.intermediate.dense.bias'.*"
                                         r"shape \(24,\).*expects \(32,\)"):
        models.from_pretrained(d)


def test_missing_weight_is_named(tmp_path):
    d = copy_fixture(tmp_path, "tiny_llama")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.gate_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    for scan in (False, True):
        with pytest.raises(ValueError, match="lacks 1 weight.*'model.layers.1.mlp.gate_proj"):
            models.from_pretrained(d, scan_layers=scan)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="pooling='max'.*accepted"):
        models.from_pretrained(FIXTURES / "tiny_bert", num_labels=2, pooling="max")
    with pytest.raises(ValueError, match="not to model_type llama"):
        models.from_pretrained(FIXTURES / "tiny_llama", num_labels=2)
    with pytest.raises(ValueError, match="hidden_act='tanhh'.*accepted"):
        models.BertConfig(hidden_act="tanhh")
    with pytest.raises(ValueError, match="num_attention_heads=6 is not a multiple of "
                                         "num_key_value_heads=4"):
        models.LlamaConfig(hidden_size=24, num_attention_heads=6, num_key_value_heads=4)


def test_an_invalid_config_or_index_names_its_file(tmp_path):
    d = copy_fixture(tmp_path, "tiny_llama")
    (d / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ValueError, match=f"{d / 'config.json'} is not valid JSON"):
        models.from_pretrained(d)
    d = copy_fixture(tmp_path / "b", "tiny_llama")
    (d / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="model.safetensors.index.json is not a safetensors index"):
        models.from_pretrained(d)
