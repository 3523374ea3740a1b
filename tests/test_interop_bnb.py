"""bitsandbytes 4-bit checkpoints both ways, and QLoRA against transformers + bitsandbytes +
PEFT (bitsandbytes on CPU, float32 compute; no torch here).

Fixtures: tests/fixtures/interop/, from scripts/fixtures/make_interop_fixtures.py.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lowrank as lr
from lowrank import paths, quant
from lowrank.interop import bnb, peft

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
OUTPUTS = load_file(str(FIXTURES / "outputs.safetensors"))
INPUTS = (OUTPUTS["llama64/input_ids"], OUTPUTS["llama64/attention_mask"])


def run(model, frozen, adapters):
    return np.asarray(jax.jit(lambda f, a: lr.apply(model, f, a, *INPUTS))(frozen, adapters))


@pytest.fixture(scope="module")
def nf4():
    return bnb.load(FIXTURES / "llama64_nf4")


def test_reads_nf4_double_quant_as_quantized_arrays(nf4):
    model, frozen = nf4
    flat = paths.flatten(frozen)
    quantized = {p: v for p, v in flat.items() if quant.is_quantized(v)}
    assert len(quantized) == 2 * 7  # every projection; lm_head stays float (transformers skips it)
    q = quantized["model/layers_0/mlp/down_proj/kernel"]
    assert (q.fmt, q.block_size, q.double_quant, q.perm, q.shape) == ("nf4", 64, True, (1, 0),
                                                                      (64, 64))
    assert (q.codes.dtype, q.absmax.dtype, q.compute_dtype) == (jnp.uint8, jnp.uint8, "float32")
    # the checkpoint's own bytes, not a requantization
    raw = load_file(str(FIXTURES / "llama64_nf4" / "model.safetensors"))
    np.testing.assert_array_equal(q.codes, raw["model.layers.0.mlp.down_proj.weight"].ravel())
    np.testing.assert_array_equal(q.absmax, raw["model.layers.0.mlp.down_proj.weight.absmax"])


@pytest.mark.parametrize("name", ["llama64_nf4", "llama64_fp4"])
def test_quantized_model_gives_transformers_bitsandbytes_outputs(name):
    model, frozen = bnb.load(FIXTURES / name)
    np.testing.assert_allclose(run(model, frozen, {}), OUTPUTS[name], atol=1e-4, rtol=0)


def test_qlora_with_peft_adapter_equals_transformers_bitsandbytes_peft(nf4):
    model, frozen = nf4
    spec, adapters = peft.load(FIXTURES / "theirs_llama64_nf4", frozen, model)
    assert len(paths.flatten(adapters)) == 2 * 7
    out = run(model, frozen, adapters)
    np.testing.assert_allclose(out, OUTPUTS["theirs_llama64_nf4"], atol=1e-4, rtol=0)
    assert np.abs(out - OUTPUTS["llama64_nf4"]).max() > 1e-2  # the adapter matters


def test_scanned_layers_stack_the_quantized_arrays(nf4):
    model, frozen = bnb.load(FIXTURES / "llama64_nf4", scan_layers=True)
    q = frozen["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert quant.logical_shape(q) == (2, 64, 64) and q.absmax_offset.shape == (2,)
    np.testing.assert_allclose(run(model, frozen, {}), OUTPUTS["llama64_nf4"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama64_nf4", "llama64_fp4", "ours_llama64_fp4"])
def test_writing_what_was_read_reproduces_the_checkpoint_bit_for_bit(name, tmp_path):
    model, frozen = bnb.load(FIXTURES / name)
    bnb.save(tmp_path, model, frozen)
    ours = load_file(str(tmp_path / "model.safetensors"))
    theirs = load_file(str(FIXTURES / name / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)  # quant_state JSON too
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    fmt = name.rpartition("_")[2]
    assert config["bnb_4bit_quant_type"] == fmt and config["llm_int8_skip_modules"] == ["lm_head"]
    assert config["bnb_4bit_use_double_quant"] == (fmt == "nf4")


def test_our_fp4_checkpoint_is_read_by_transformers_bitsandbytes():
    """ours_llama64_fp4: the nf4 model requantized to fp4 by lowrank and written by bnb.save
    (the test above shows save(load(x)) == x); transformers + bitsandbytes computed its
    outputs."""
    model, frozen = bnb.load(FIXTURES / "ours_llama64_fp4")
    assert {v.fmt for v in jax.tree.leaves(frozen, is_leaf=quant.is_quantized)
            if quant.is_quantized(v)} == {"fp4"}
    np.testing.assert_allclose(run(model, frozen, {}), OUTPUTS["ours_llama64_fp4"], atol=1e-4,
                               rtol=0)


# ----------------------------------------------------------------------------- bad input


def test_rejects_checkpoints_that_are_not_bnb_4bit(tmp_path):
    with pytest.raises(ValueError, match="expected a bitsandbytes 4-bit checkpoint"):
        bnb.load(FIXTURES / "merged_llama")
    directory = Path(shutil.copytree(FIXTURES / "llama64_nf4", tmp_path / "eight"))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(load_in_4bit=False, _load_in_4bit=False,
                                         load_in_8bit=True)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="expected a bitsandbytes 4-bit checkpoint"):
        bnb.load(directory)


def test_rejects_a_custom_codebook_and_a_missing_weight(tmp_path):
    directory = Path(shutil.copytree(FIXTURES / "llama64_nf4", tmp_path / "custom"))
    file = directory / "model.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[f"{name}.quant_map"] = tensors[f"{name}.quant_map"] * 2
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name}.quant_map is not bitsandbytes' nf4 codebook"):
        bnb.load(directory)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weight.*model.layers.1.mlp.up_proj.weight"):
        bnb.load(directory)


def test_save_rejects_layouts_bitsandbytes_cannot_hold(nf4, tmp_path):
    model, frozen = nf4
    flat = paths.flatten(frozen)
    q_path = "model/layers_0/self_attn/q_proj/kernel"
    q = flat[q_path]

    def with_leaf(path, **changes):
        return paths.unflatten({**flat, path: dataclasses.replace(q, **changes)})

    with pytest.raises(ValueError, match="fmt='int4'.*accepted: fmt in"):
        bnb.save(tmp_path, model, with_leaf(q_path, fmt="int4"))
    with pytest.raises(ValueError, match=r"perm=None.*accepted: .*perm=\(1, 0\)"):
        bnb.save(tmp_path, model, with_leaf(q_path, perm=None))
    with pytest.raises(ValueError, match="a bitsandbytes checkpoint has exactly one"):
        bnb.save(tmp_path, model, with_leaf(q_path, fmt="fp4"))
    with pytest.raises(ValueError, match="Linear weights only.*embed_tokens"):
        bnb.save(tmp_path, model, with_leaf("model/embed_tokens/embedding", shape=(32, 64)))
