"""Merged Hugging Face export, checked against transformers loading it (no torch here), and
the adapters-export <-> PEFT converter command."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lowrank as lr
from lowrank import models, paths, quant
from lowrank.interop import convert, hf_export, peft
from lowrank.train import export

HF = Path(__file__).parent / "fixtures" / "hf"
FIXTURES = Path(__file__).parent / "fixtures" / "interop"
OUTPUTS = load_file(str(FIXTURES / "outputs.safetensors"))


def inputs_of(base):
    ref = load_file(str(HF / f"{base}_reference.safetensors"))
    return tuple(ref[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in ref)


def assert_same_weights(directory, committed, atol=0.0):
    ours, theirs = (load_file(str(Path(d) / "model.safetensors")) for d in (directory, committed))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], atol=atol, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def scanned_llama():
    model, params = models.from_pretrained(HF / "tiny_llama", scan_layers=True)
    _, adapters = peft.load(FIXTURES / "ours_llama", params, model)
    return model, params, adapters


def test_merged_qlora_export_loaded_by_transformers_equals_our_adapted_model(scanned_llama,
                                                                          tmp_path):
    """An nf4 (double quantized) scanned base plus adapters: merged dequantizes first."""
    model, params, adapters = scanned_llama
    frozen = quant.quantize_tree(params, quant.QuantSpec(
        "nf4", double_quant=True, exclude=r"lm_head/kernel", stacked=r"model/layers/.*"))
    inputs = inputs_of("tiny_llama")
    out = np.asarray(jax.jit(lambda f, a: lr.apply(model, f, a, *inputs))(frozen, adapters))
    np.testing.assert_allclose(out, OUTPUTS["merged_llama"], atol=1e-4, rtol=0)
    hf_export.save_merged(tmp_path, model, frozen, adapters)
    assert_same_weights(tmp_path, FIXTURES / "merged_llama", atol=1e-6)
    looped, back = models.from_pretrained(tmp_path)  # and we read it back, looped
    flat = paths.flatten(back)
    assert not any(quant.is_quantized(v) for v in flat.values())
    assert flat["model/layers_1/mlp/up_proj/kernel"].shape == (16, 24)


def test_merged_export_with_trained_head_equals_our_adapted_model(tmp_path):
    model, params = models.from_pretrained(HF / "tiny_bert_cls")
    _, adapters = peft.load(FIXTURES / "ours_bert_cls", params, model)
    inputs = inputs_of("tiny_bert_cls")
    out = np.asarray(jax.jit(lambda a: lr.apply(model, params, a, *inputs))(adapters))
    np.testing.assert_allclose(out, OUTPUTS["merged_bert_cls"], atol=1e-4, rtol=0)
    hf_export.save_merged(tmp_path, model, params, adapters)
    assert_same_weights(tmp_path, FIXTURES / "merged_bert_cls", atol=1e-6)
    hf_export.save_merged(tmp_path / "bf16", model, params, adapters, dtype=jnp.bfloat16)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    with open(tmp_path / "bf16" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["classifier.weight"]["dtype"] == "BF16"


def test_converter_to_peft_and_back(scanned_llama, tmp_path):
    model, params, adapters = scanned_llama
    spec, _ = peft.load(FIXTURES / "ours_llama", params, model)
    exported = export.export_adapters(tmp_path / "run", adapters,
                                      lora={"rank": 4, "alpha": 8.0, "rslora": False})
    convert.main(["to-peft", str(exported), str(tmp_path / "peft"), "--base",
                  str(HF / "tiny_llama")])
    config = json.loads((tmp_path / "peft" / peft.CONFIG_FILE).read_text())
    committed = json.loads((FIXTURES / "ours_llama" / peft.CONFIG_FILE).read_text())
    assert config.pop("base_model_name_or_path") == str(HF / "tiny_llama")
    assert committed.pop("base_model_name_or_path") is None
    assert config == committed
    ours = load_file(str(tmp_path / "peft" / peft.WEIGHTS_FILE))
    theirs = load_file(str(FIXTURES / "ours_llama" / peft.WEIGHTS_FILE))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)

    convert.main(["from-peft", str(FIXTURES / "theirs_llama"), str(tmp_path / "back"),
                  "--base", str(HF / "tiny_llama")])
    back = paths.flatten(export.load_adapters(tmp_path / "back"))
    looped, looped_params = models.from_pretrained(HF / "tiny_llama")
    _, direct = peft.load(FIXTURES / "theirs_llama", looped_params, looped)
    direct = paths.flatten(direct)
    assert back.keys() == direct.keys()
    for p, pair in direct.items():
        assert back[p].scale == pair.scale
        np.testing.assert_array_equal(back[p].a, pair.a)
        np.testing.assert_array_equal(back[p].b, pair.b)
    lora = export.read_index(tmp_path / "back")["lora"]
    assert convert.spec_of(lora).rslora is True


def test_converter_rejects_a_directory_that_is_no_export(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        convert.main(["to-peft", str(tmp_path), str(tmp_path / "peft"), "--base",
                      str(HF / "tiny_llama")])
    assert exit_.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()  # one line, no traceback
    assert f"{tmp_path / 'adapters.json'} does not exist" in line
    with pytest.raises(FileNotFoundError, match="adapters.json"):
        convert.to_peft(tmp_path, tmp_path / "peft", HF / "tiny_llama")
