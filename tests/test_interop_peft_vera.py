"""VeRA adapters in PEFT files (``peft_type: VERA``, ``vera_A``/``vera_B`` with
``save_projection=True``, ``vera_lambda_d``/``vera_lambda_b``), both ways.

Against outputs PEFT computed in torch (no torch here): fixtures in tests/fixtures/vera/, from
scripts/fixtures/make_vera_fixtures.py (PEFT 0.21.2, versions.json): PEFT's adapter (its
projections from torch's generator) and one trained here that PEFT loaded.
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
from lowrank.interop import peft, peft_vera
from lowrank.vera import PROJECTIONS

HF = Path(__file__).parent / "fixtures" / "hf"
VERA = Path(__file__).parent / "fixtures" / "vera"
OUTPUTS = load_file(str(VERA / "outputs.safetensors"))
REFERENCE = load_file(str(HF / "tiny_llama_reference.safetensors"))
MASKED = (REFERENCE["input_ids"], REFERENCE["attention_mask"])


def _outputs(model, frozen, adapters):
    return np.asarray(jax.jit(lambda f, a: lr.apply(model, f, a, *MASKED))(frozen, adapters))


@pytest.mark.parametrize("scan", [False, True])
def test_peft_vera_adapter_gives_peft_outputs(scan):
    model, params = models.from_pretrained(HF / "tiny_llama", scan_layers=scan)
    spec, adapters, frozen = peft_vera.load(VERA / "theirs_vera_llama", params, model)
    assert spec.method == "vera" and spec.rank == 8
    # the projections live once, in the frozen tree; the trainable tree holds the lambdas
    assert sorted(frozen[PROJECTIONS]) == ["a", "b"]
    assert all(k.startswith("lambda") for leaf in paths.flatten(adapters).values()
               for k in leaf.arrays())
    out = _outputs(model, frozen, adapters)
    np.testing.assert_allclose(out, OUTPUTS["theirs_vera_llama"], atol=1e-5, rtol=0)
    assert np.abs(out - REFERENCE["logits"]).max() > 0.05  # the adapter matters
    # merging reads the same projections and leaves them out of the dense tree
    merged = lr.merge(frozen, adapters)
    assert PROJECTIONS not in merged
    np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, *MASKED)),
                               OUTPUTS["theirs_vera_llama"], atol=1e-4, rtol=0)


def test_gradients_reach_the_lambdas_only():
    model, params = models.from_pretrained(HF / "tiny_llama")
    _, adapters, frozen = peft_vera.load(VERA / "theirs_vera_llama", params, model)
    loss = lambda a: (lr.apply(model, frozen, a, *MASKED) ** 2).mean()  # noqa: E731
    grads = jax.grad(loss)(adapters)
    leaf = paths.flatten(grads)["model/layers_0/self_attn/q_proj/kernel"]
    assert leaf.proj_a is None and float(abs(leaf.lambda_d).max()) > 0


def test_our_vera_adapter_gives_the_outputs_peft_computed_from_it():
    model, params = models.from_pretrained(HF / "tiny_llama", scan_layers=True)
    _, adapters, frozen = peft_vera.load(VERA / "ours_vera_llama", params, model)
    np.testing.assert_allclose(_outputs(model, frozen, adapters), OUTPUTS["ours_vera_llama"],
                               atol=1e-5, rtol=0)


def test_round_trip_writes_peft_s_layout(tmp_path):
    model, params = models.from_pretrained(HF / "tiny_llama")
    _, adapters, frozen = peft_vera.load(VERA / "theirs_vera_llama", params, model)
    out = peft_vera.save(tmp_path / "again", adapters, model, frozen=frozen)
    theirs = load_file(str(VERA / "theirs_vera_llama" / peft.WEIGHTS_FILE))
    ours = load_file(str(out / peft.WEIGHTS_FILE))
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    config = json.loads((out / peft.CONFIG_FILE).read_text())
    assert config["save_projection"] is True and config["peft_type"] == "VERA"
    with pytest.raises(ValueError, match="pass it as frozen="):
        peft_vera.save(tmp_path / "x", adapters, model)


def test_refusals_name_what_is_wrong(tmp_path):
    model, params = models.from_pretrained(HF / "tiny_llama")
    with pytest.raises(ValueError, match="peft_type='VERA' is not supported"):
        peft.load(VERA / "theirs_vera_llama", params, model)
    bad = tmp_path / "bad"
    shutil.copytree(VERA / "theirs_vera_llama", bad)
    config = json.loads((bad / peft.CONFIG_FILE).read_text())
    config["save_projection"] = False
    (bad / peft.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="save_projection=False: the file lacks vera_A"):
        peft_vera.load(bad, params, model)
    _, adapters, _ = peft_vera.load(VERA / "theirs_vera_llama", params, model)
    with pytest.raises(ValueError, match="'@vera' entry, which is missing"):
        lr.apply(model, params, adapters, *MASKED)  # the projections' frozen tree is needed
