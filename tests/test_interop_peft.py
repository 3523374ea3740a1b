"""PEFT adapters both ways, against outputs that PEFT computed in torch (no torch here).

Fixtures: tests/fixtures/interop/, from scripts/fixtures/make_interop_fixtures.py.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lowrank as lr
from lowrank import models, paths
from lowrank.interop import peft

HF = Path(__file__).parent / "fixtures" / "hf"
FIXTURES = Path(__file__).parent / "fixtures" / "interop"
OUTPUTS = load_file(str(FIXTURES / "outputs.safetensors"))
ALL_LLAMA = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


def inputs_of(base):
    ref = load_file(str(HF / f"{base}_reference.safetensors"))
    names = ("input_ids", "attention_mask", "token_type_ids")
    return tuple(ref[k] for k in names if k in ref)


def run(model, frozen, adapters, inputs):
    return np.asarray(jax.jit(lambda f, a: lr.apply(model, f, a, *inputs))(frozen, adapters))


@pytest.fixture(scope="module")
def llama():
    return models.from_pretrained(HF / "tiny_llama")


@pytest.fixture(scope="module")
def bert_cls():
    return models.from_pretrained(HF / "tiny_bert_cls")


@pytest.mark.parametrize("name, base", [
    ("ours_llama", "tiny_llama"),  # trained here on scanned layers, written by peft.save
    ("ours_bert_cls", "tiny_bert_cls"),  # regex targets, rsLoRA, classifier in modules_to_save
    ("theirs_llama", "tiny_llama"),  # made in torch: rank/alpha patterns, rsLoRA
    ("theirs_bert_cls", "tiny_bert_cls"),  # made in torch: SEQ_CLS, layers_to_transform
])
@pytest.mark.parametrize("scan", [False, True])
def test_adapter_gives_peft_outputs(name, base, scan, llama, bert_cls):
    if scan:
        model, params = models.from_pretrained(HF / base, scan_layers=True)
    else:
        model, params = llama if base == "tiny_llama" else bert_cls
    inputs = inputs_of(base)
    if scan and name in ("theirs_llama", "ours_bert_cls", "theirs_bert_cls"):
        # ranks or targets differ between layers: a scanned stack cannot hold them
        with pytest.raises(ValueError, match="without scan_layers"):
            peft.load(FIXTURES / name, params, model)
        return
    _, adapters = peft.load(FIXTURES / name, params, model)
    out = run(model, params, adapters, inputs)
    np.testing.assert_allclose(out, OUTPUTS[name], atol=1e-4, rtol=0)
    base = load_file(str(HF / f"{base}_reference.safetensors"))["logits"]  # transformers'
    assert np.abs(out - base).max() > 1e-2  # the adapter matters


def test_save_writes_exactly_the_files_peft_read(llama, bert_cls, tmp_path):
    """load(save(adapters)) is lossless and save(load(file)) reproduces our committed files,
    so the adapters PEFT loaded are the ones trained here."""
    for name, (model, params) in (("ours_llama", llama), ("ours_bert_cls", bert_cls)):
        spec, adapters = peft.load(FIXTURES / name, params, model)
        peft.save(tmp_path / name, spec, adapters, model)
        for file in (peft.CONFIG_FILE,):
            assert json.loads((tmp_path / name / file).read_text()) == json.loads(
                (FIXTURES / name / file).read_text())
        ours = load_file(str(tmp_path / name / peft.WEIGHTS_FILE))
        committed = load_file(str(FIXTURES / name / peft.WEIGHTS_FILE))
        assert ours.keys() == committed.keys()
        for k in ours:
            np.testing.assert_array_equal(ours[k], committed[k], err_msg=k)


def test_round_trip_keeps_ranks_alphas_and_scales(llama, tmp_path):
    model, params = llama
    spec = lr.LoraSpec(rank=4, alpha=8, targets=ALL_LLAMA, rslora=True, dropout=0.1,
                       rank_pattern={r".*layers_1/mlp/.*": 2},
                       alpha_pattern={r".*/o_proj/kernel": 3.5})
    # B = 0 at init: shift both factors so that the round trip carries real numbers
    adapters = jax.jit(lambda k, p: jax.tree.map(lambda x: x + 0.01, lr.init_adapters(
        k, p, spec)))(jax.random.key(0), params)
    peft.save(tmp_path, spec, adapters, model)
    config = json.loads((tmp_path / peft.CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, True)
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert config["rank_pattern"] == {
        rf"model\.layers\.1\.mlp\.{m}": 2 for m in ("gate_proj", "up_proj", "down_proj")}
    assert set(config["alpha_pattern"].values()) == {3.5}
    tensors = load_file(str(tmp_path / peft.WEIGHTS_FILE))
    a = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (2, 24) and b.shape == (16, 2)  # [r, in] and [out, r]
    spec2, back = peft.load(tmp_path, params, model)
    assert (spec2.rslora, spec2.dropout) == (True, 0.1)
    before, after = paths.flatten(adapters), paths.flatten(back)
    assert before.keys() == after.keys()
    for p in before:
        assert after[p].scale == before[p].scale, p
        np.testing.assert_array_equal(after[p].a, before[p].a)
        np.testing.assert_array_equal(after[p].b, before[p].b)
    # the returned spec rebuilds the same structure
    again = paths.flatten(jax.eval_shape(lambda: lr.init_adapters(jax.random.key(1), params,
                                                                   spec2)))
    assert {p: (v.rank, v.scale) for p, v in again.items()} == {
        p: (v.rank, v.scale) for p, v in before.items()}


# ----------------------------------------------------------------------------- bad input


def copy_fixture(name, tmp_path):
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def edit_config(directory, **changes):
    file = directory / peft.CONFIG_FILE
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def edit_tensors(directory, fn):
    file = directory / peft.WEIGHTS_FILE
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file))


@pytest.mark.parametrize("option, value, message", [
    ("use_dora", "yes", "use_dora='yes' is not a boolean"),
    ("bias", "all", "bias='all' is not supported"),
    ("fan_in_fan_out", True, "fan_in_fan_out=True is not supported"),
    ("peft_type", "LOHA", "peft_type='LOHA' is not supported"),
    ("layer_replication", [[0, 1]], "layer_replication=.* is not supported"),
    ("brand_new_option", 3, "brand_new_option=3 is not supported"),
    ("target_modules", "all-linear", "target_modules='all-linear' is not supported"),
])
def test_unsupported_options_are_named(option, value, message, llama, tmp_path):
    model, params = llama
    directory = copy_fixture("theirs_llama", tmp_path)
    edit_config(directory, **{option: value})
    with pytest.raises(ValueError, match=message):
        peft.load(directory, params, model)


def test_missing_and_unexpected_keys_are_listed(llama, tmp_path):
    model, params = llama
    directory = copy_fixture("theirs_llama", tmp_path)
    gone = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    extra = "base_model.model.model.norm.lora_A.weight"

    def change(t):
        del t[gone]
        t[extra] = np.zeros((4, 16), np.float32)

    edit_tensors(directory, change)
    with pytest.raises(ValueError, match="lacks 1 tensor") as err:
        peft.load(directory, params, model)
    assert gone in str(err.value) and extra in str(err.value)


def test_tensors_of_untargeted_modules_are_unexpected(llama, tmp_path):
    model, params = llama
    directory = copy_fixture("theirs_llama", tmp_path)
    edit_config(directory, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with pytest.raises(ValueError, match=r"has 12 tensor\(s\) that no targeted module") as err:
        peft.load(directory, params, model)
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight" in str(err.value)


def test_shapes_that_do_not_fit_are_named(llama, tmp_path):
    model, params = llama
    directory = copy_fixture("theirs_llama", tmp_path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    edit_tensors(directory, lambda t: t.update({key: t[key][:5]}))  # rank_pattern says 6
    with pytest.raises(ValueError, match=rf"{key} has shape \(5, 16\).*must be \(6, 16\)"):
        peft.load(directory, params, model)
    # an adapter of the 16-wide Llama onto a 64-wide one (shapes only: no weights read)
    wide = models.build_model(FIXTURES / "llama64_nf4")
    with pytest.raises(ValueError, match=r"down_proj.lora_A.weight has shape \(2, 24\); with "
                                         r"r=2 .* must be \(2, 64\)"):
        peft.load(FIXTURES / "theirs_llama", models.abstract_params(wide), wide)


def test_targets_that_match_nothing_or_non_linear_layers(llama, tmp_path):
    model, params = llama
    directory = copy_fixture("theirs_llama", tmp_path)
    edit_config(directory, target_modules=["qkv"])
    with pytest.raises(ValueError, match="matches no module of LlamaForCausalLM"):
        peft.load(directory, params, model)
    edit_config(directory, target_modules=["input_layernorm"])
    with pytest.raises(ValueError, match="not Linear layers"):
        peft.load(directory, params, model)


def test_missing_files(llama, tmp_path):
    model, params = llama
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peft.load(tmp_path, params, model)
    directory = copy_fixture("theirs_llama", tmp_path)
    (directory / peft.WEIGHTS_FILE).rename(directory / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled adapter_model.bin is not read"):
        peft.load(directory, params, model)


def test_save_refuses_what_peft_cannot_express(llama, bert_cls, tmp_path):
    model, params = llama
    embed = lr.init_adapters(jax.random.key(0), params,
                             lr.LoraSpec(rank=2, targets=r"model/embed_tokens/embedding"))
    with pytest.raises(ValueError, match="embed_tokens/embedding.*Linear weights"):
        peft.save(tmp_path, lr.LoraSpec(), embed, model)
    spec = lr.LoraSpec(rank=2, targets=ALL_LLAMA, trainable=r".*layers_0/input_layernorm.*")
    with_norm = lr.init_adapters(jax.random.key(0), params, spec)
    peft.save(tmp_path / "norm", spec, with_norm, model)  # a whole module: modules_to_save
    config = json.loads((tmp_path / "norm" / peft.CONFIG_FILE).read_text())
    assert config["modules_to_save"] == ["model.layers.0.input_layernorm"]
    bert, bert_params = bert_cls
    spec = lr.LoraSpec(rank=2, targets=r".*/query/kernel", trainable=r"classifier/bias")
    part = lr.init_adapters(jax.random.key(0), bert_params, spec)
    with pytest.raises(ValueError, match="PEFT trains whole modules.*classifier.weight"):
        peft.save(tmp_path / "part", spec, part, bert)
    with pytest.raises(ValueError, match="no LoraPair"):
        peft.save(tmp_path / "none", spec, {"classifier": {"bias": jnp.zeros(3)}}, bert)
