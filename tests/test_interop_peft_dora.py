"""DoRA adapters in PEFT files (``use_dora``, ``lora_magnitude_vector``), both ways.

Against outputs PEFT computed in torch (no torch here): fixtures in tests/fixtures/dora/, from
scripts/fixtures/make_dora_fixtures.py (PEFT 0.21.2, versions.json): DoRA over the float tiny
Llama and QDoRA over the nf4 + double-quantized Llama-64 made by PEFT, and an adapter trained
here that PEFT loaded.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lowrank as lr
from lowrank import models, paths
from lowrank.interop import bnb, peft

HF = Path(__file__).parent / "fixtures" / "hf"
FIXTURES = Path(__file__).parent / "fixtures" / "interop"
DORA = Path(__file__).parent / "fixtures" / "dora"
OUTPUTS = load_file(str(DORA / "outputs.safetensors"))
INTEROP_OUTPUTS = load_file(str(FIXTURES / "outputs.safetensors"))
ALL_LLAMA = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
REFERENCE = load_file(str(HF / "tiny_llama_reference.safetensors"))
INPUTS = REFERENCE["input_ids"]
MASKED = (REFERENCE["input_ids"], REFERENCE["attention_mask"])


@pytest.fixture(scope="module")
def llama():
    return models.from_pretrained(HF / "tiny_llama")


@pytest.mark.parametrize("scan", [False, True])
def test_peft_dora_adapter_gives_peft_outputs(scan):
    # rank 2 on every down_proj, 4 elsewhere: each weight's layers share theirs, so a
    # scanned stack holds the adapter as well
    model, params = models.from_pretrained(HF / "tiny_llama", scan_layers=scan)
    spec, adapters = peft.load(DORA / "theirs_dora_llama", params, model)
    assert spec.method == "dora"
    out = np.asarray(jax.jit(lambda a: lr.apply(model, params, a, *MASKED))(adapters))
    np.testing.assert_allclose(out, OUTPUTS["theirs_dora_llama"], atol=1e-5, rtol=0)
    # the magnitudes matter: the same A and B as plain LoRA give other outputs
    is_dora = lambda x: isinstance(x, lr.DoraPair)  # noqa: E731
    lora = jax.tree.map(lambda x: lr.LoraPair(x.a, x.b, scale=x.scale), adapters,
                        is_leaf=is_dora)
    assert np.abs(np.asarray(lr.apply(model, params, lora, *MASKED)) - out).max() > 1e-3


def test_peft_qdora_adapter_over_bitsandbytes_nf4_gives_peft_outputs():
    model, frozen = bnb.load(FIXTURES / "llama64_nf4")
    inputs = (INTEROP_OUTPUTS["llama64/input_ids"], INTEROP_OUTPUTS["llama64/attention_mask"])
    _, adapters = peft.load(DORA / "theirs_qdora_llama64_nf4", frozen, model)
    out = np.asarray(jax.jit(lambda f, a: lr.apply(model, f, a, *inputs))(frozen, adapters))
    np.testing.assert_allclose(out, OUTPUTS["theirs_qdora_llama64_nf4"], atol=1e-5, rtol=0)
    assert np.abs(out - INTEROP_OUTPUTS["llama64_nf4"]).max() > 1e-2  # the adapter matters


def test_our_dora_adapter_gives_the_outputs_peft_computed_from_it():
    model, params = models.from_pretrained(HF / "tiny_llama", scan_layers=True)
    _, adapters = peft.load(DORA / "ours_dora_llama", params, model)
    out = np.asarray(jax.jit(lambda a: lr.apply(model, params, a, *MASKED))(adapters))
    np.testing.assert_allclose(out, OUTPUTS["ours_dora_llama"], atol=1e-5, rtol=0)


def _trained_dora(params, spec):
    # B = 0 and m = ||W|| at init: move every array so the file carries real numbers
    return jax.jit(lambda k, p: jax.tree.map(lambda x: x * 1.1 + 0.01, lr.init_adapters(
        k, p, spec)))(jax.random.key(0), params)


def test_dora_round_trip_with_peft_names_and_shapes(llama, tmp_path):
    model, params = llama
    spec = lr.LoraSpec(rank=4, alpha=8, targets=ALL_LLAMA, method="dora",
                       rank_pattern={r".*layers_1/mlp/.*": 2})
    adapters = _trained_dora(params, spec)
    peft.save(tmp_path, spec, adapters, model)
    config = json.loads((tmp_path / peft.CONFIG_FILE).read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    tensors = load_file(str(tmp_path / peft.WEIGHTS_FILE))
    module = "base_model.model.model.layers.1.mlp.down_proj"
    assert tensors[f"{module}.lora_A.weight"].shape == (2, 24)  # [r, in]
    assert tensors[f"{module}.lora_B.weight"].shape == (16, 2)  # [out, r]
    assert tensors[f"{module}.lora_magnitude_vector"].shape == (16,)  # [out], no .weight
    kernel = params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    leaf = adapters["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(tensors[f"{module}.lora_magnitude_vector"], leaf.magnitude)
    assert kernel.shape == (24, 16)
    n_modules = 2 * 7  # two layers, seven projections each
    assert len([k for k in tensors if k.endswith("lora_magnitude_vector")]) == n_modules

    spec2, back = peft.load(tmp_path, params, model)
    assert spec2.method == "dora"
    before, after = paths.flatten(adapters), paths.flatten(back)
    assert before.keys() == after.keys()
    for p in before:
        assert type(after[p]) is lr.DoraPair and after[p].scale == before[p].scale
        for k in ("a", "b", "magnitude"):
            np.testing.assert_array_equal(getattr(after[p], k), getattr(before[p], k))
    run = jax.jit(lambda a: lr.apply(model, params, a, INPUTS))
    np.testing.assert_allclose(run(back), run(adapters), rtol=0, atol=0)
    # the spec PEFT's file implies rebuilds the same structure
    again = jax.eval_shape(lambda: lr.init_adapters(jax.random.key(1), params, spec2))
    assert jax.tree.structure(again) == jax.tree.structure(adapters)


def test_dora_loads_onto_a_scanned_model(llama, tmp_path):
    model, params = llama
    spec = lr.LoraSpec(rank=4, alpha=8, targets=ALL_LLAMA, method="dora")
    adapters = _trained_dora(params, spec)
    peft.save(tmp_path, spec, adapters, model)
    scanned, s_params = models.from_pretrained(HF / "tiny_llama", scan_layers=True)
    _, s_adapters = peft.load(tmp_path, s_params, scanned)
    np.testing.assert_allclose(lr.apply(scanned, s_params, s_adapters, INPUTS),
                               lr.apply(model, params, adapters, INPUTS), rtol=1e-5, atol=1e-5)


def test_dora_files_without_magnitudes_and_mixed_methods_are_refused(llama, tmp_path):
    model, params = llama
    directory = Path(shutil.copytree(FIXTURES / "theirs_llama", tmp_path / "theirs"))
    file = directory / peft.CONFIG_FILE
    file.write_text(json.dumps({**json.loads(file.read_text()), "use_dora": True}))
    with pytest.raises(ValueError, match=r"lacks \d+ tensor.*lora_magnitude_vector"):
        peft.load(directory, params, model)

    spec = lr.LoraSpec(rank=2, targets=ALL_LLAMA, rules=[(r".*/q_proj/kernel", lr.DoRA(rank=2))])
    mixed = _trained_dora(params, spec)
    with pytest.raises(ValueError, match=r"adapters mix \['dora', 'lora'\]"):
        peft.save(tmp_path / "mixed", spec, mixed, model)


def test_a_magnitude_of_the_wrong_shape_is_named(llama, tmp_path):
    model, params = llama
    spec = lr.LoraSpec(rank=2, targets=r".*/q_proj/kernel", method="dora")
    peft.save(tmp_path, spec, _trained_dora(params, spec), model)
    file = tmp_path / peft.WEIGHTS_FILE
    tensors = load_file(str(file))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match="lora_magnitude_vector has shape"):
        peft.load(tmp_path, params, model)
