"""LoRA from the core applies to our BERT and Llama models, looped and scanned."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lowrank as lr
from lowrank import models, paths

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
ALL_LLAMA_LINEAR = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


def randomize_b(adapters, key):
    """LoRA starts with B = 0 (no change); a random B makes the adapters do something."""
    flat = paths.flatten(adapters)
    keys = jax.random.split(key, len(flat))
    out = {p: pair.replace(b=0.3 * jax.random.normal(k, pair.b.shape))
           for k, (p, pair) in zip(keys, flat.items(), strict=True)}
    return paths.unflatten(out)


def run(model, frozen, adapters, *inputs):
    out = lr.apply(model, frozen, adapters, *inputs)
    return out.last_hidden_state if isinstance(out, models.BertOutput) else out


def run_plain(model, params, *inputs):
    out = model.apply({"params": params}, *inputs)
    return out.last_hidden_state if isinstance(out, models.BertOutput) else out


def inputs_of(name):
    ref = load_file(str(FIXTURES / f"{name}_reference.safetensors"))
    return ref["input_ids"], ref["attention_mask"]


@pytest.mark.parametrize("name, targets, expected", [
    ("tiny_bert", r".*/(query|value)/kernel", 2 * 2),
    ("tiny_llama", ALL_LLAMA_LINEAR, 2 * 7),
])
def test_lora_on_pretrained_models_is_the_merged_model(name, targets, expected):
    model, params = models.from_pretrained(FIXTURES / name)
    spec = lr.LoraSpec(rank=2, alpha=4, targets=targets)
    adapters = lr.init_adapters(jax.random.key(0), params, spec)
    adapted = paths.flatten(adapters)
    assert len(adapted) == expected
    assert not any("lm_head" in p or "embed" in p for p in adapted)
    x = inputs_of(name)
    base = run_plain(model, params, *x)
    # B = 0 at init: the adapted model is the base model
    np.testing.assert_allclose(run(model, params, adapters, *x), base, atol=1e-6)
    adapters = randomize_b(adapters, jax.random.key(1))
    out = run(model, params, adapters, *x)
    assert float(jnp.max(jnp.abs(out - base))) > 1e-2
    merged = run_plain(model, lr.merge(params, adapters), *x)
    np.testing.assert_allclose(out, merged, atol=2e-5)


@pytest.mark.parametrize("name, targets", [
    ("tiny_bert", r".*/(query|value)/kernel"),
    ("tiny_llama_tied", ALL_LLAMA_LINEAR),
])
def test_lora_on_scanned_layers_equals_the_looped_model(name, targets):
    looped, params = models.from_pretrained(FIXTURES / name)
    scanned, stacked = models.from_pretrained(FIXTURES / name, scan_layers=True, remat=True)
    x = inputs_of(name)
    layouts = lr.discover_layouts(scanned, stacked, *x)
    spec = lr.LoraSpec(rank=2, alpha=4, targets=targets)
    adapters = randomize_b(
        lr.init_adapters(jax.random.key(0), stacked, spec, layouts=layouts), jax.random.key(1)
    )
    flat = paths.flatten(adapters)
    stack = "layer" if name == "tiny_bert" else "layers"
    for p, pair in flat.items():
        assert f"/{stack}/" in p and pair.a.shape[0] == 2 and pair.b.shape[0] == 2, p
    # the same adapters, one slice per looped layer
    looped_adapters = {
        p.replace(f"/{stack}/", f"/{stack}_{i}/"): jax.tree.map(lambda v, i=i: v[i], pair)
        for p, pair in flat.items() for i in range(2)
    }
    out = run(scanned, stacked, adapters, *x)
    np.testing.assert_allclose(
        out, run(looped, params, paths.unflatten(looped_adapters), *x), atol=2e-5
    )
    assert float(jnp.max(jnp.abs(out - run_plain(scanned, stacked, *x)))) > 1e-2
    # every layer's slice gets a gradient
    loss = lambda a: jnp.sum(run(scanned, stacked, a, *x) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(adapters)
    for p, g in paths.flatten(grads).items():
        assert bool((jnp.abs(g.a).sum(axis=(1, 2)) > 0).all()), p
