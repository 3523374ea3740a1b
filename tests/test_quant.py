"""lowrank.quant: formats, errors, stacked slices, trees and memory accounting."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank
from lowrank import quant
from lowrank.quant import QuantSpec, dequantize, memory_report, quantize, quantize_tree
from lowrank.quant.blockwise import pack_nibbles, unpack_nibbles


def gaussian(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def rmse(a, b) -> float:
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


# --- formats -------------------------------------------------------------------------------


def test_first_element_goes_to_the_high_nibble():
    assert pack_nibbles(jnp.array([1, 2, 15, 0], jnp.uint8)).tolist() == [0x12, 0xF0]
    assert unpack_nibbles(jnp.array([0x12, 0xF0], jnp.uint8), 3).tolist() == [1, 2, 15]
    # nf4 code of -1 is 0, of +1 is 15: [-1, 1] packs into one byte 0x0F.
    q = quantize(jnp.array([-1.0, 1.0] * 32), "nf4")
    assert int(q.codes[0]) == 0x0F


@pytest.mark.parametrize("fmt, bits", [("nf4", 4), ("fp4", 4), ("int4", 4), ("int8", 8)])
def test_codes_take_the_format_bits(fmt, bits):
    q = quantize(gaussian((10, 64)), fmt)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (640 * bits // 8,)
    assert q.absmax.shape == (10,) and q.absmax.dtype == jnp.float32


def test_int_formats_are_symmetric_absmax():
    # Values on the int grid of their block's absmax come back exactly.
    steps = jnp.array([-7, -3, 0, 1, 7, 2, 5, -6] * 8)
    x = steps / 7.0 * 0.3
    q = quantize(x, "int4")
    np.testing.assert_array_equal(unpack_nibbles(q.codes, 64), steps + 8)
    np.testing.assert_allclose(dequantize(q, jnp.float32), x, rtol=0, atol=1e-7)
    grid = jnp.arange(-127.0, 128.0) / 127.0 * 2.5
    np.testing.assert_allclose(dequantize(quantize(grid, "int8", 255), jnp.float32), grid,
                               rtol=0, atol=1e-6)
    # Codes are signed values offset into the unsigned range.
    assert quantize(jnp.array([-1.0, 0.0, 1.0]), "int8").codes.tolist() == [1, 128, 255]


def test_reconstruction_error_on_gaussian_weights():
    w = gaussian((512, 512))
    err = {f: rmse(dequantize(quantize(w, f), jnp.float32), w) for f in quant.FORMATS}
    assert err["nf4"] < err["fp4"] and err["nf4"] < err["int4"]
    assert err["int8"] < err["nf4"] / 10
    double = rmse(dequantize(quantize(w, "nf4", double_quant=True), jnp.float32), w)
    assert abs(double - err["nf4"]) / err["nf4"] < 0.01
    assert double != err["nf4"]  # the block scales really were requantized


@pytest.mark.parametrize("double_quant, expected", [(True, 4.127), (False, 4.5)])
def test_bits_per_parameter_of_a_4096_square_weight(double_quant, expected):
    q = quantize(gaussian((4096, 4096)), "nf4", 64, double_quant)
    report = memory_report(q)
    assert report.params == 4096 * 4096
    # codes 4 bits + per block 8 bits (or 32) + per 256 blocks a float32 scale, + the offset
    nbytes = 4096 * 4096 // 2 + (4096 * 4096 // 64) * (1 if double_quant else 4)
    nbytes += (4096 * 4096 // 64 // 256 * 4 + 4) if double_quant else 0
    assert report.bytes == nbytes
    assert report.bits_per_param == pytest.approx(expected, abs=5e-4)
    if double_quant:
        assert report.bits_per_param <= 4.13


def test_default_and_explicit_result_dtypes():
    x = gaussian((64, 64)).astype(jnp.bfloat16)
    q = quantize(x, compute_dtype="bfloat16")
    assert q.dtype == "bfloat16" and dequantize(q).dtype == jnp.bfloat16
    assert dequantize(q, jnp.float32).dtype == jnp.float32
    assert quantize(x).compute_dtype == quant.default_compute_dtype() == "float32"  # CPU


# --- errors --------------------------------------------------------------------------------


def test_unknown_format_is_named_with_the_accepted_ones():
    with pytest.raises(ValueError, match=r"'nf3'.*'nf4', 'fp4', 'int4', 'int8'"):
        quantize(gaussian((8, 8)), "nf3")
    with pytest.raises(ValueError, match="'q4'"):
        QuantSpec("q4")


@pytest.mark.parametrize("block_size", [0, -64, 1.5, True, "64"])
def test_bad_block_size(block_size):
    with pytest.raises((ValueError, TypeError), match=f"block_size.*{block_size!r}"):
        quantize(gaussian((8, 8)), "nf4", block_size)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_non_float_input(dtype):
    with pytest.raises(TypeError, match=f"floating-point.*{jnp.dtype(dtype).name}"):
        quantize(jnp.ones((8, 8), dtype))


def test_bad_layout_arguments():
    with pytest.raises(ValueError, match=r"perm.*range\(2\).*\(0, 2\)"):
        quantize(gaussian((8, 8)), perm=(0, 2))
    with pytest.raises(ValueError, match="stack_axes.*3"):
        quantize(gaussian((8, 8)), stack_axes=3)
    with pytest.raises(ValueError, match="empty"):
        quantize(jnp.ones((0, 8)))
    with pytest.raises(TypeError, match="QuantizedArray.*ndarray"):
        dequantize(np.ones(3))
    with pytest.raises(ValueError, match="compute_dtype.*'int8'"):
        QuantSpec(compute_dtype="int8")
    with pytest.raises(ValueError, match="targets.*regex"):
        QuantSpec(targets="(")


# --- stacked slices, pytree behaviour ------------------------------------------------------


def test_stacked_slices_are_quantized_independently_and_slice_cleanly():
    w = gaussian((3, 48, 40))  # [L, in, out], 1920 values per layer: a partial last block
    q = quantize(w, "nf4", 64, True, perm=(1, 0), stack_axes=1)
    assert q.shape == (48, 40) and q.lead_shape == (3,) and q.ndim == 3 and q.size == w.size
    assert quant.logical_shape(q) == (3, 48, 40)
    full = dequantize(q, jnp.float32)
    for i in range(3):
        alone = quantize(w[i], "nf4", 64, True, perm=(1, 0))
        sliced = jax.tree.map(lambda leaf, i=i: leaf[i], q)  # what nn.scan does
        np.testing.assert_array_equal(sliced.codes, alone.codes)
        np.testing.assert_array_equal(dequantize(sliced, jnp.float32), full[i])
    np.testing.assert_array_equal(jax.vmap(lambda s: dequantize(s, jnp.float32))(q), full)
    np.testing.assert_array_equal(jax.jit(dequantize, static_argnums=1)(q, jnp.float32), full)


def test_perm_stores_the_transpose_and_dequantize_undoes_it():
    w = gaussian((96, 32))  # a Dense kernel [in, out]
    q = quantize(w, perm=(1, 0))
    torch_layout = quantize(w.T)
    np.testing.assert_array_equal(q.codes, torch_layout.codes)
    np.testing.assert_array_equal(dequantize(q, jnp.float32), dequantize(torch_layout).T)


def test_leaves_are_arrays_and_metadata_is_static():
    q = quantize(gaussian((64, 8)), "fp4", double_quant=True)
    leaves, treedef = jax.tree.flatten(q)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves) and len(leaves) == 4
    hash(treedef)  # static metadata is hashable
    assert quant.is_quantized(jax.tree.unflatten(treedef, leaves))
    assert not quant.is_quantized(gaussian((2,)))


# --- trees ---------------------------------------------------------------------------------


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Embed(32, 16, name="embed")(x)
        x = nn.LayerNorm(name="norm")(x)
        x = nn.relu(nn.Dense(64, name="up")(x))
        return nn.Dense(16, name="down")(x)


def test_quantize_tree_takes_kernels_and_leaves_the_rest():
    params = Block().init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))["params"]
    frozen = quantize_tree(params, QuantSpec("nf4", double_quant=True))
    for kernel in (frozen["up"]["kernel"], frozen["down"]["kernel"]):
        assert quant.is_quantized(kernel)
    for plain in (frozen["up"]["bias"], frozen["norm"]["scale"], frozen["embed"]["embedding"]):
        assert not quant.is_quantized(plain)
    np.testing.assert_array_equal(frozen["embed"]["embedding"], params["embed"]["embedding"])
    # Blocks run along the contraction: the kernel [in, out] is stored as [out, in].
    np.testing.assert_array_equal(frozen["up"]["kernel"].codes,
                                  quantize(params["up"]["kernel"].T, "nf4", 64, True).codes)
    back = quant.dequantize_tree(frozen, jnp.float32)
    assert back["up"]["kernel"].shape == (16, 64)
    assert rmse(back["up"]["kernel"], params["up"]["kernel"]) < 0.1 * float(
        jnp.std(params["up"]["kernel"]))

    spec = QuantSpec("int8", exclude=r"down/kernel", extra=r"embed/embedding")
    frozen = quantize_tree({"params": params}, spec)
    assert set(frozen) == {"params"}
    inner = frozen["params"]
    assert not quant.is_quantized(inner["down"]["kernel"])
    embedding = inner["embed"]["embedding"]
    assert quant.is_quantized(embedding) and embedding.perm is None


def test_quantize_tree_stacked_and_discovered_layouts():
    kernel = gaussian((3, 8, 8))
    params = {"layers": {"kernel": kernel, "bias": jnp.zeros((3, 8))}}
    by_regex = quantize_tree(params, QuantSpec(stacked=r"layers/.*"))
    by_probe = quantize_tree(params, layouts={"layers/kernel": lowrank.layers.MATRIX})
    for frozen in (by_regex, by_probe):
        q = frozen["layers"]["kernel"]
        assert q.lead_shape == (3,) and q.shape == (8, 8) and q.perm == (1, 0)
    np.testing.assert_array_equal(by_regex["layers"]["kernel"].codes,
                                  by_probe["layers"]["kernel"].codes)
    # Without the stack rule a 3-D kernel reads as conv-like [in, in, out]: one slice.
    assert quantize_tree(params)["layers"]["kernel"].lead_shape == ()
    with pytest.raises(ValueError, match="stacked"):
        quantize_tree({"l": {"kernel": gaussian((3, 8))}}, QuantSpec(stacked="l/.*"))


class _EmbedThenDense(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(8, name="dense")(nn.Embed(50, 16, name="embed")(ids))


def test_discovered_layouts_say_how_never_whether():
    # discover_layouts names the Embed table too; selection stays with targets / exclude.
    model, ids = _EmbedThenDense(), jnp.zeros((2, 3), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    layouts = lowrank.discover_layouts(model, params, ids)
    assert set(layouts) == {"embed/embedding", "dense/kernel"}
    frozen = quantize_tree(params, layouts=layouts)
    assert not quant.is_quantized(frozen["embed"]["embedding"])
    np.testing.assert_array_equal(frozen["embed"]["embedding"], params["embed"]["embedding"])
    kernel = frozen["dense"]["kernel"]
    assert quant.is_quantized(kernel) and kernel.perm == (1, 0)
    assert not quant.is_quantized(
        quantize_tree(params, QuantSpec(exclude=r"dense/.*"), layouts=layouts)["dense"]["kernel"])
    # A leaf chosen by `extra` and found in `layouts` takes the discovered layout.
    extra = quantize_tree(params, QuantSpec(extra=r"embed/embedding"), layouts=layouts)
    assert extra["embed"]["embedding"].perm == (1, 0)


def test_memory_report_counts_every_leaf_and_groups():
    params = Block().init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))["params"]
    dense = memory_report(params)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert dense.params == n and dense.bytes == 4 * n and dense.bits_per_param == 32.0
    frozen = quantize_tree(params, QuantSpec("nf4"))
    report = memory_report(frozen, group_depth=1)
    assert report.params == n
    up = report.groups["up"]
    assert up.params == 16 * 64 + 64
    assert up.bytes == 16 * 64 // 2 + (16 * 64 // 64) * 4 + 64 * 4
    assert sum(g.bytes for g in report.groups.values()) == report.bytes
    # Shapes alone are enough: measure a quantized tree without computing it.
    abstract = jax.eval_shape(lambda p: quantize_tree(p, QuantSpec("nf4")), params)
    assert memory_report(abstract).bytes == report.bytes
    with pytest.raises(TypeError, match="str"):
        memory_report({"a": "text"})


def test_double_quant_offset_is_the_same_under_jit():
    # x / 6 and x * (1 / 6) differ by one ulp for this sum: jit must still divide, as torch does.
    absmax = jnp.asarray([1.2526079416275024, 1.4860434532165527, 1.1328874826431274,
                          1.876637578010559, 1.650121808052063, 0.10520315170288086], jnp.float32)
    total = np.float32(lowrank.quant.blockwise.torch_cpu_sum(absmax))
    assert total / np.float32(6) != total * (np.float32(1) / np.float32(6))
    offset = jax.jit(lowrank.quant.blockwise.double_quantize)(absmax)[2]
    assert np.float32(offset) == total / np.float32(6)
