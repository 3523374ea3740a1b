"""lowrank.quant against bitsandbytes, bit for bit.

Fixtures: scripts/fixtures/make_bnb_fixtures.py (run with the torch reference environment).
"""

import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lowrank.quant import dequantize, quantize
from lowrank.quant.blockwise import dynamic_quantize, torch_cpu_sum
from lowrank.quant.formats import dynamic_map

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "bnb"
META = json.loads((FIXTURES / "bnb_4bit.json").read_text())
TENSORS = load_file(str(FIXTURES / "bnb_4bit.safetensors"))
CASES = sorted(META["cases"])


def bits(x) -> np.ndarray:
    """float32 values as their bit patterns, so that comparisons are exact (sign of 0, NaN)."""
    return np.asarray(x, np.float32).view(np.uint32)


def canonical_digest(x) -> str:
    # As the fixture script: -0.0 becomes +0.0, since bitsandbytes' own C and Python CPU
    # kernels disagree on the sign of FP4's "-0" code.
    return hashlib.sha256((np.asarray(x, np.float32) + np.float32(0.0)).tobytes()).hexdigest()


# The fixture script's input generators (checked against its digests in test_probes_match).
def sum_probe(length: int) -> np.ndarray:
    i = np.arange(length, dtype=np.int64)
    return ((i * 2654435761 % 1000003) / 1000003 + 0.01).astype(np.float32)


def dynamic_probe(length: int) -> np.ndarray:
    i = np.arange(length, dtype=np.int64)
    frac = (i * 2654435761 % 1000003) / 1000003
    sign = np.where(i * 40503 % 7 < 3, -1.0, 1.0)
    return (sign * 10.0 ** (-7.0 * frac)).astype(np.float32)


def test_probes_match_the_fixture_script():
    digests = META["probe_sha256"]
    longest = max(int(n) for n in META["torch_sum"])
    assert hashlib.sha256(sum_probe(longest).tobytes()).hexdigest() == digests["sum"]
    dyn = dynamic_probe(META["dynamic_length"])
    assert hashlib.sha256(dyn.tobytes()).hexdigest() == digests["dynamic"]


@pytest.mark.parametrize("key", CASES)
def test_quantize_matches_bitsandbytes(key):
    case = META["cases"][key]
    q = quantize(TENSORS[case["weight"]], case["fmt"], META["block_size"], case["double_quant"])
    np.testing.assert_array_equal(np.asarray(q.codes), TENSORS[f"{key}.codes"])
    if case["double_quant"]:
        np.testing.assert_array_equal(np.asarray(q.absmax), TENSORS[f"{key}.absmax_codes"])
        np.testing.assert_array_equal(bits(q.absmax_scale), bits(TENSORS[f"{key}.absmax_scale"]))
        np.testing.assert_array_equal(bits(q.absmax_offset).reshape(1),
                                      bits(TENSORS[f"{key}.offset"]))
    else:
        np.testing.assert_array_equal(bits(q.absmax), bits(TENSORS[f"{key}.absmax"]))
        assert q.absmax_scale is None and q.absmax_offset is None


# Eagerly every op rounds on its own; under jit XLA fuses them, which must not change a bit.
# (Eager runs only on the small weight: each op compiles separately, which is slow.)
@pytest.mark.parametrize(
    "key, jit", [(k, True) for k in CASES] + [(k, False) for k in CASES if "small" in k]
)
def test_dequantize_matches_bitsandbytes(key, jit):
    case = META["cases"][key]
    q = quantize(TENSORS[case["weight"]], case["fmt"], META["block_size"], case["double_quant"])
    run = jax.jit(dequantize, static_argnums=1) if jit else dequantize
    out = np.asarray(run(q, jnp.float32))
    assert out.shape == tuple(case["shape"])
    assert canonical_digest(out) == case["dequantized_sha256"]
    if f"{key}.dequantized" in TENSORS:  # raw bits, -0.0 included
        np.testing.assert_array_equal(bits(out), bits(TENSORS[f"{key}.dequantized"]))


def test_dynamic_map_is_bitsandbytes():
    np.testing.assert_array_equal(bits(dynamic_map()), bits(TENSORS["dynamic_map"]))


def test_dynamic_quantize_matches_bitsandbytes_quantize_blockwise():
    codes, scale = jax.jit(dynamic_quantize)(jnp.asarray(dynamic_probe(META["dynamic_length"])))
    np.testing.assert_array_equal(np.asarray(codes), TENSORS["dynamic.codes"])
    np.testing.assert_array_equal(bits(scale), bits(TENSORS["dynamic.absmax"]))


def test_torch_cpu_sum_matches_torch_sum():
    lengths = sorted(int(n) for n in META["torch_sum"])
    sums = jax.jit(lambda xs: [torch_cpu_sum(x) for x in xs])([sum_probe(n) for n in lengths])
    got = {str(n): int(bits(s).reshape(())) for n, s in zip(lengths, sums, strict=True)}
    assert got == META["torch_sum"]
