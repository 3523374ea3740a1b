"""The NNX Llama against the linen one: same trees, same outputs with PEFT adapters (and against
PEFT's own outputs), over a 4-bit base, through PEFT files, the training loop and a stack.

The scanned, 4-bit, compiled-cost and training checks are slow:
``pytest -m slow tests/test_nnx_llama.py``.
"""

import dataclasses
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

import lowrank as lr
from lowrank import models
from lowrank import train as lt
from lowrank.interop import hf_export, peft
from lowrank.models import llama_nnx
from lowrank.stack import train_stacked
from lowrank.train import toy

HF = Path(__file__).parent / "fixtures" / "hf"
FIXTURES = Path(__file__).parent / "fixtures" / "interop"


def _inputs():
    ref = load_file(str(HF / "tiny_llama_reference.safetensors"))
    return ref["input_ids"], ref["attention_mask"]


def _run(model, frozen, adapters, inputs):
    return np.asarray(jax.jit(lambda f, a: lr.apply(model, f, a, *inputs))(frozen, adapters))


@pytest.mark.parametrize("name, scan", [
    ("theirs_llama", False),  # made in torch: rank/alpha patterns, rsLoRA
    pytest.param("ours_llama", True, marks=pytest.mark.slow),  # an nnx.scan stack
])
def test_nnx_llama_with_peft_adapters_equals_the_linen_one_and_peft(name, scan, tmp_path):
    model, params = models.from_pretrained(HF / "tiny_llama", scan_layers=scan)
    twin = llama_nnx.from_linen(model)
    assert jax.tree.map(np.shape, lr.nnx.params(twin)) == jax.tree.map(np.shape, params)
    spec, adapters = peft.load(FIXTURES / name, params, model)
    spec_n, adapters_n = peft.load(FIXTURES / name, params, twin)  # PEFT onto the NNX model
    assert spec_n == spec and jax.tree.structure(adapters_n) == jax.tree.structure(adapters)
    inputs = _inputs()
    out = _run(twin, params, adapters_n, inputs)
    np.testing.assert_allclose(out, _run(model, params, adapters, inputs), atol=1e-5, rtol=0)
    peft_out = load_file(str(FIXTURES / "outputs.safetensors"))[name]  # PEFT's, in torch
    np.testing.assert_allclose(out, peft_out, atol=1e-4, rtol=0)
    # and the NNX model writes the same PEFT files as the linen one
    peft.save(tmp_path / "nnx", spec_n, adapters_n, twin)
    peft.save(tmp_path / "linen", spec, adapters, model)
    for d in ("nnx", "linen"):
        assert json.loads((tmp_path / d / peft.CONFIG_FILE).read_text())["task_type"] == \
            "CAUSAL_LM"
    a = load_file(str(tmp_path / "nnx" / peft.WEIGHTS_FILE))
    b = load_file(str(tmp_path / "linen" / peft.WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # and the same merged Hugging Face directory
    a = load_file(str(hf_export.save_merged(tmp_path / "m_nnx", twin, params, adapters_n)
                       / "model.safetensors"))
    b = load_file(str(hf_export.save_merged(tmp_path / "m_linen", model, params, adapters)
                       / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_nnx_llama_qlora_equals_the_linen_one():
    model, params = models.from_pretrained(HF / "tiny_llama")
    twin = llama_nnx.from_linen(model)
    frozen = lr.quantize_tree(params, lr.QuantSpec("nf4", double_quant=True))
    _, adapters = peft.load(FIXTURES / "theirs_llama", params, model)
    inputs = _inputs()
    np.testing.assert_allclose(_run(twin, frozen, adapters, inputs),
                               _run(model, frozen, adapters, inputs), atol=1e-5, rtol=0)


def _lm_task(scan=False):
    """A tiny random Llama on the toy counting task, and the same task on its NNX twin."""
    cfg = models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    task = toy.lm(ml_collections.ConfigDict({"batch_size": 8}))
    model = models.LlamaForCausalLM(cfg, scan_layers=scan)
    x = task.train_batch(0, 0)["inputs"]
    params = model.init(jax.random.key(0), x)["params"]
    task = dataclasses.replace(task, model=model, params=params,
                               layouts=lr.discover_layouts(model, params, x))
    return task, dataclasses.replace(task, model=llama_nnx.from_linen(model))


def _config(rank=2):
    config = lt.default_config()
    config.steps, config.batch_size, config.quiet = 4, 8, True
    config.lora.rank, config.lora.targets = rank, r".*(q_proj|v_proj|down_proj)/kernel"
    config.optimizer.learning_rate = 0.05
    return config


def _close(a, b, tol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, atol=tol, rtol=tol)


@pytest.mark.slow  # ~30 s alone on 2 cores: three training runs
def test_the_training_loop_and_a_stack_train_the_nnx_llama_as_the_linen_one():
    linen, nnx_task = _lm_task(scan=True)
    ours, theirs = lt.train(_config(), nnx_task), lt.train(_config(), linen)
    assert ours.metrics["loss"] == pytest.approx(theirs.metrics["loss"], abs=1e-5)
    _close(ours.trainable, theirs.trainable)
    assert ours.eval_metrics["loss"] < 3.47  # below log(32): it learnt something
    stacked = train_stacked([_config(2), _config(4)], nnx_task)
    assert [r.trainable["model"]["layers"]["self_attn"]["q_proj"]["kernel"].rank
            for r in stacked] == [2, 4]
    _close(stacked[0].trainable, ours.trainable, 1e-4)


@pytest.mark.slow
def test_the_nnx_and_linen_gradients_compile_to_the_same_cost():
    linen, nnx_task = _lm_task(scan=True)
    x = linen.train_batch(0, 0)["inputs"]
    frozen = lr.quantize_tree(linen.params, lr.QuantSpec("nf4", targets="model/.*"),
                              layouts=linen.layouts)
    spec = lr.LoraSpec(rank=2, targets=r".*_proj/kernel")
    adapters = lr.init_adapters(jax.random.key(1), frozen, spec, layouts=linen.layouts)

    def cost(model):
        grad = jax.jit(jax.grad(lambda a: lr.apply(model, frozen, a, x).sum()))
        compiled = grad.lower(adapters).compile()
        flops = compiled.cost_analysis()
        flops = (flops[0] if isinstance(flops, list) else flops)["flops"]
        return flops, compiled.memory_analysis().temp_size_in_bytes

    ours, theirs = cost(nnx_task.model), cost(linen.model)
    assert ours == pytest.approx(theirs, rel=1e-3), (ours, theirs)
