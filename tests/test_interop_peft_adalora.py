"""AdaLoRA adapters in PEFT files (``peft_type: ADALORA``, ``lora_A/E/B``, ``rank_pattern``),
both ways.

Against outputs PEFT computed in torch (no torch here): fixtures in tests/fixtures/adalora/,
from scripts/fixtures/make_adalora_fixtures.py (PEFT 0.21.2, versions.json): an adapter PEFT
trained with its RankAllocator (ranks 0 to 4 per module), and one trained here that PEFT
loaded.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import lowrank as lr
from lowrank import models, paths
from lowrank.adalora import AdaLoraTriplet
from lowrank.interop import peft, peft_adalora

HF = Path(__file__).parent / "fixtures" / "hf"
ADALORA = Path(__file__).parent / "fixtures" / "adalora"
OUTPUTS = load_file(str(ADALORA / "outputs.safetensors"))
REFERENCE = load_file(str(HF / "tiny_llama_reference.safetensors"))
MASKED = (REFERENCE["input_ids"], REFERENCE["attention_mask"])


def _outputs(model, params, adapters):
    return np.asarray(jax.jit(lambda a: lr.apply(model, params, a, *MASKED))(adapters))


@pytest.mark.parametrize("scan", [False, True])
def test_peft_adalora_adapter_gives_peft_outputs(scan):
    model, params = models.from_pretrained(HF / "tiny_llama", scan_layers=scan)
    spec, adapters, budget = peft_adalora.load(ADALORA / "theirs_adalora_llama", params, model)
    assert spec.method == "adalora" and spec.rank == 4
    assert budget == {"target_rank": 2, "tinit": 2, "tfinal": 3, "delta_t": 1, "beta1": 0.85,
                      "beta2": 0.85, "orth_reg_weight": 0.5, "total_steps": 12}
    out = _outputs(model, params, adapters)
    np.testing.assert_allclose(out, OUTPUTS["theirs_adalora_llama"], atol=1e-5, rtol=0)
    assert np.abs(out - REFERENCE["logits"]).max() > 0.1  # the adapter matters
    # the file's rank pattern is what the leaves keep (zero-rank modules included)
    config = json.loads((ADALORA / "theirs_adalora_llama" / "adapter_config.json").read_text())
    kept = sorted(sum(v) for v in config["rank_pattern"].values())
    ours = []
    for leaf in paths.flatten(adapters).values():
        assert isinstance(leaf, AdaLoraTriplet) and leaf.init_rank == 4
        ours += np.atleast_1d(np.asarray(leaf.active_ranks())).tolist()
    assert sorted(ours) == kept and 0 in kept and 4 in kept


def test_our_adalora_adapter_gives_the_outputs_peft_computed_from_it():
    model, params = models.from_pretrained(HF / "tiny_llama", scan_layers=True)
    _, adapters, _ = peft_adalora.load(ADALORA / "ours_adalora_llama", params, model)
    np.testing.assert_allclose(_outputs(model, params, adapters),
                               OUTPUTS["ours_adalora_llama"], atol=1e-5, rtol=0)


def test_round_trip_keeps_outputs_and_writes_peft_s_layout(tmp_path):
    model, params = models.from_pretrained(HF / "tiny_llama")
    _, adapters, budget = peft_adalora.load(ADALORA / "theirs_adalora_llama", params, model)
    out = peft_adalora.save(tmp_path / "again", adapters, model, **{
        k: v for k, v in budget.items() if k != "orth_reg_weight"})
    theirs = load_file(str(ADALORA / "theirs_adalora_llama" / peft.WEIGHTS_FILE))
    ours = load_file(str(out / peft.WEIGHTS_FILE))
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    config = json.loads((out / peft.CONFIG_FILE).read_text())
    original = json.loads((ADALORA / "theirs_adalora_llama" / peft.CONFIG_FILE).read_text())
    for key in ("peft_type", "init_r", "target_r", "lora_alpha", "target_modules", "total_step",
                "tinit", "tfinal"):
        assert config[key] == original[key], key
    assert {k: sum(v) for k, v in config["rank_pattern"].items()} == {
        k: sum(v) for k, v in original["rank_pattern"].items()}


def test_refusals_name_what_is_wrong(tmp_path):
    model, params = models.from_pretrained(HF / "tiny_llama")
    with pytest.raises(ValueError, match="peft_type='ADALORA' is not supported"):
        peft.load(ADALORA / "theirs_adalora_llama", params, model)
    bad = tmp_path / "bad"
    shutil.copytree(ADALORA / "theirs_adalora_llama", bad)
    config = json.loads((bad / peft.CONFIG_FILE).read_text())
    key = next(iter(config["rank_pattern"]))
    config["rank_pattern"][key] = config["rank_pattern"][key][:3]
    (bad / peft.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="init_r=4 needs one bool per initial rank"):
        peft_adalora.load(bad, params, model)
    pair = lr.init_adapters(jax.random.key(0), params, lr.LoraSpec(
        rank=2, targets=r".*q_proj/kernel"))
    with pytest.raises(ValueError, match="holds AdaLoRA adapters only"):
        peft_adalora.save(tmp_path / "x", pair, model, total_steps=5, target_rank=1)
