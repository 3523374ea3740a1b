"""Block-wise quantization of flat vectors, bit for bit as bitsandbytes does it on CPU.

All functions work on the last axis of `[..., n]` arrays; leading axes are independent slices.
Values are quantized in blocks of `block_size` consecutive elements, each with its own float32
absmax; with double quantization the absmax vector is itself centred on its mean and
quantized to 8 bits in blocks of 256 with the dynamic map.

Two rounding procedures exist because bitsandbytes uses two different CPU kernels:
`quantize_4bit` (Python, also used here for int4/int8) multiplies by the reciprocal of the
absmax and buckets against the midpoints of the sorted codebook, while `quantize_blockwise`
(C, used for the nested absmax) divides by the absmax and picks the nearer neighbour of a
binary search. They round differently at the edges, so each is reproduced as it is.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lowrank.quant.formats import Format, dynamic_map

NESTED_BLOCK_SIZE = 256
"""Block size of double quantization (of the absmax vector), as in QLoRA."""

# bitsandbytes clamps a block's absmax to this before taking the reciprocal.
_TINY_ABSMAX = np.float32(1e-38)
# Lanes of torch's vectorized float32 sum (8, measured against torch 2.13 on an AVX-512 CPU).
_TORCH_SUM_LANES = 8
_TORCH_SUM_ILP = 4
_TORCH_SUM_LEVELS = 4
# The nested absmax codes index the dynamic map directly (it is sorted).
_DYNAMIC_FORMAT = Format("dynamic8", 8, dynamic_map(), np.arange(256, dtype=np.int32))
_DYNAMIC_MIDPOINTS = np.float32(0.5) * (dynamic_map()[:-1] + dynamic_map()[1:])
# Bins of bitsandbytes' CPU lookup table for 8-bit quantization.
_LUT_BINS = 65536


def num_blocks(n: int, block_size: int) -> int:
    """Blocks needed for `n` values (the last one may be partial).

    Example:
      >>> num_blocks(130, 64)
      3
    """
    return -(-n // block_size)


def packed_size(n: int, bits: int) -> int:
    """Bytes holding `n` codes of `bits` bits (two 4-bit codes per byte).

    Example:
      >>> packed_size(7, 4), packed_size(7, 8)
      (4, 7)
    """
    return -(-n * bits // 8)


def _unfused(product: jax.Array) -> jax.Array:
    """`product`, kept from being fused with a following add into one rounding.

    XLA contracts `a * b + c` into a fused multiply-add (one rounding); bitsandbytes rounds
    the product first. A select between the two blocks the contraction (NaN stays NaN).
    """
    return jnp.where(product != product, np.float32(np.nan), product)


def _blocks(x: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """`[..., n]` -> the full blocks `[..., n // bs, bs]` and the remainder `[..., n % bs]`."""
    n = x.shape[-1]
    full = n - n % block_size
    lead = x.shape[:-1]
    return x[..., :full].reshape(*lead, full // block_size, block_size), x[..., full:]


def _scale_to_unit(x: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Scales each block into [-1, 1] by its absmax, as bitsandbytes' `quantize_4bit`.

    Full blocks are multiplied by the reciprocal absmax, a partial last block is divided by
    its (clamped) absmax; both steps round differently and are kept apart on purpose.
    """
    body, rest = _blocks(x, block_size)
    absmax = jnp.max(jnp.abs(body), axis=-1)
    inverse = 1.0 / jnp.maximum(absmax, _TINY_ABSMAX)
    # An all-zero block scales to zeros (guarding against a flushed-to-zero clamp).
    scaled = jnp.where(absmax[..., None] > 0, body * inverse[..., None], 0.0)
    scaled = jnp.clip(scaled, -1.0, 1.0).reshape(*x.shape[:-1], -1)
    if rest.shape[-1]:
        rest_absmax = jnp.maximum(jnp.max(jnp.abs(rest), axis=-1), _TINY_ABSMAX)
        rest_scaled = jnp.clip(rest / rest_absmax[..., None], -1.0, 1.0)
        absmax = jnp.concatenate([absmax, rest_absmax[..., None]], axis=-1)
        scaled = jnp.concatenate([scaled, rest_scaled], axis=-1)
    return scaled, absmax


def _round_to_codes(scaled: jax.Array, fmt: Format) -> jax.Array:
    """Codes of the nearest codebook values; a value on a midpoint goes to the lower one."""
    # The count of midpoints below the value is torch.bucketize(right=False). Written as a
    # sum of compares (not searchsorted), it is one elementwise loop XLA fuses with the
    # scaling before it and the packing after it: no float32 copy of the input is made, and
    # it is ~20x faster on CPU than searchsorted's default binary search.
    rank = jnp.zeros(scaled.shape, jnp.uint8)
    for bound in fmt.midpoints:
        rank = rank + (scaled > bound).astype(jnp.uint8)
    return jnp.asarray(fmt.sort_order, jnp.uint8)[rank]


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """Packs 4-bit codes `[..., 2m]` into bytes `[..., m]`, the first code in the high nibble.

    Example:
      >>> pack_nibbles(jnp.array([1, 2, 15, 0], jnp.uint8)).tolist()
      [18, 240]
    """
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
    """Unpacks bytes `[..., m]` into the first `n` 4-bit codes `[..., n]`.

    Example:
      >>> unpack_nibbles(jnp.array([18, 240], jnp.uint8), 3).tolist()
      [1, 2, 15]
    """
    pairs = jnp.stack([packed >> 4, packed & 0xF], axis=-1)
    return pairs.reshape(*packed.shape[:-1], -1)[..., :n]


def quantize_blocks(x: jax.Array, fmt: Format, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Quantizes `[..., n]` float values block-wise: `(codes, absmax)`.

    Codes are uint8 `[..., packed_size(n, fmt.bits)]` (4-bit codes packed two per byte,
    first in the high nibble), absmax float32 `[..., num_blocks(n, block_size)]`. For nf4
    and fp4 both equal bitsandbytes' `quantize_4bit` of the same flat values.

    Example:
      >>> from lowrank.quant.formats import get_format
      >>> codes, absmax = quantize_blocks(jnp.ones((128,)), get_format("nf4"), 64)
      >>> codes.shape, absmax.tolist()
      ((64,), [1.0, 1.0])
    """
    if fmt.bits == 4 and block_size % 2 == 0 and x.shape[-1] % block_size == 0:
        return _quantize_4bit_full_blocks(x, fmt, block_size)
    scaled, absmax = _scale_to_unit(x.astype(jnp.float32), block_size)
    if fmt.bits == 4:
        if scaled.shape[-1] % 2:
            # The pad nibble is the code of 0.0, as bitsandbytes pads before rounding.
            scaled = jnp.pad(scaled, [(0, 0)] * (scaled.ndim - 1) + [(0, 1)])
        return pack_nibbles(_round_to_codes(scaled, fmt)), absmax
    return _round_to_codes(scaled, fmt), absmax


def _quantize_4bit_full_blocks(x: jax.Array, fmt: Format, block_size: int
                               ) -> tuple[jax.Array, jax.Array]:
    """`quantize_blocks` of whole blocks of even size, the high and low nibbles apart.

    Scaling, rounding and packing each nibble straight from `x` lets XLA run them as one
    elementwise loop: the temporaries are the absmax vector, not the 2-3 float32 copies of
    `x` that scaling all values first and packing after costs (measured on an 8192 x 1024
    kernel: 64 MiB of XLA temporaries before, ~0 after).
    """
    lead = x.shape[:-1]
    # Each use converts to float32 on its own (exact from bfloat16 / float16), so that no
    # float32 copy of a half-precision input is shared, and hence kept, between them.
    blocks = x.reshape(*lead, -1, block_size // 2, 2)
    absmax = jnp.max(jnp.abs(blocks), axis=(-2, -1)).astype(jnp.float32)
    inverse = (1.0 / jnp.maximum(absmax, _TINY_ABSMAX))[..., None]
    nonzero = (absmax > 0)[..., None]

    def code(values):
        scaled = values.astype(jnp.float32) * inverse
        scaled = jnp.clip(jnp.where(nonzero, scaled, 0.0), -1.0, 1.0)
        return _round_to_codes(scaled, fmt)

    packed = (code(blocks[..., 0]) << 4) | code(blocks[..., 1])
    return packed.reshape(*lead, -1), absmax


def dequantize_blocks(codes: jax.Array, absmax: jax.Array, fmt: Format, block_size: int,
                      n: int) -> jax.Array:
    """Inverse of `quantize_blocks`: float32 `[..., n]` = codebook[code] * absmax[block].

    Example:
      >>> from lowrank.quant.formats import get_format
      >>> nf4 = get_format("nf4")
      >>> dequantize_blocks(*quantize_blocks(jnp.ones((128,)), nf4, 64), nf4, 64, 128)[:2]
      Array([1., 1.], dtype=float32)
    """
    if fmt.bits == 4:
        codes = unpack_nibbles(codes, n)
    values = jnp.asarray(fmt.codebook)[codes]
    blocks = absmax.shape[-1]
    padded = jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, blocks * block_size - n)])
    scaled = padded.reshape(*values.shape[:-1], blocks, block_size) * absmax[..., None]
    return scaled.reshape(*values.shape[:-1], -1)[..., :n]


def _sequential_sum(x: jax.Array, axis: int) -> jax.Array:
    """Sum along `axis` strictly left to right, starting from 0 (one rounding per add)."""
    items = jnp.moveaxis(x, axis, 0)
    total = jnp.zeros(items.shape[1:], x.dtype)
    if items.shape[0] == 0:
        return total
    # A scan fixes the order (a reduction would let XLA pick one) and compiles as one loop.
    return jax.lax.scan(lambda acc, item: (acc + item, None), total, items)[0]


def _cascade_sum(items: jax.Array) -> jax.Array:
    """torch's `multi_row_sum`: items `[..., size, rows, lanes]` -> `[..., rows, lanes]`.

    Items are summed in chunks of `step`; chunk sums cascade through `levels` accumulators,
    each flushed into the next after `step` additions.
    """
    size = items.shape[-3]
    ceil_log2 = max(size - 1, 0).bit_length()
    step = 2 ** max(4, ceil_log2 // _TORCH_SUM_LEVELS)
    accumulators = []
    level = items
    for _ in range(_TORCH_SUM_LEVELS - 1):
        count = level.shape[-3] // step
        head = level[..., : count * step, :, :]
        accumulators.append(_sequential_sum(level[..., count * step:, :, :], axis=-3))
        level = _sequential_sum(head.reshape(*head.shape[:-3], count, step, *head.shape[-2:]),
                                axis=-3)
    accumulators.append(_sequential_sum(level, axis=-3))
    total = accumulators[0]
    for acc in accumulators[1:]:
        total = total + acc
    return total


def _row_sum(items: jax.Array) -> jax.Array:
    """torch's `row_sum`: items `[..., m, lanes]` -> `[..., lanes]` with 4 interleaved sums."""
    m, lanes = items.shape[-2:]
    rows = m // _TORCH_SUM_ILP
    interleaved = items[..., : rows * _TORCH_SUM_ILP, :]
    partial = _cascade_sum(interleaved.reshape(*items.shape[:-2], rows, _TORCH_SUM_ILP, lanes))
    first = partial[..., 0, :]
    for i in range(rows * _TORCH_SUM_ILP, m):
        first = first + items[..., i, :]
    for k in range(1, _TORCH_SUM_ILP):
        first = first + partial[..., k, :]
    return first


def torch_cpu_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis in the order of torch's float32 CPU `sum` (one thread).

    bitsandbytes centres the absmax vector on `absmax.mean()` (torch: this sum divided by
    n); reproducing its summation order is what makes the offset, and hence every nested
    code, bit-identical. Longer inputs than 32767 are summed by torch on several threads in
    an order that depends on the thread count; there this function can differ from torch by
    a rounding.

    Example:
      >>> torch_cpu_sum(jnp.arange(100, dtype=jnp.float32)).item()
      4950.0
    """
    n = x.shape[-1]
    lanes = _TORCH_SUM_LANES if n >= _TORCH_SUM_LANES else 1
    vectors = n // lanes
    body = x[..., : vectors * lanes].reshape(*x.shape[:-1], vectors, lanes)
    lane_sums = _row_sum(body)
    total = _sequential_sum(x[..., vectors * lanes:], axis=-1)
    for k in range(lanes):
        total = total + lane_sums[..., k]
    return total


def _dynamic_codes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bitsandbytes' CPU 8-bit rounding of whole blocks `x` `[..., block]`: (codes, scale).

    bitsandbytes (0.50) does not search the codebook per value: it scales by the reciprocal
    block absmax, maps [-1, 1] onto 65536 evenly spaced bins, and looks each bin up in a
    table holding the code nearest to the bin's centre. Values therefore round to the
    nearest code of their bin's centre, not of themselves; this reproduces that table
    lookup arithmetically (no 65536-entry table).
    """
    bins = _LUT_BINS - 1
    scale = jnp.max(jnp.abs(x), axis=-1)
    inverse = 1.0 / jnp.where(scale > 0, scale, 1.0)
    unit = jnp.clip(x * inverse[..., None], -1.0, 1.0)
    # Four separately rounded float32 steps, as the vectorized C kernel computes the index.
    index = _unfused(((unit + 1.0) * np.float32(0.5)) * np.float32(bins)) + np.float32(0.5)
    index = index.astype(jnp.int32)
    centre = np.float32(-1.0) + (np.float32(2.0) * index.astype(jnp.float32)) / np.float32(bins)
    codes = jnp.searchsorted(jnp.asarray(_DYNAMIC_MIDPOINTS), centre, side="left")
    # An all-zero block gets code 0 throughout, as in bitsandbytes.
    return jnp.where(scale[..., None] > 0, codes, 0).astype(jnp.uint8), scale


def dynamic_quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """8-bit dynamic-map quantization in blocks of 256: `(codes uint8 [..., n], scale)`.

    Equals bitsandbytes' `quantize_blockwise(x, blocksize=256)` (default dynamic map) on CPU.

    Example:
      >>> codes, scale = dynamic_quantize(jnp.array([0.5, -1.0, 0.0]))
      >>> codes.tolist(), scale.tolist()
      ([219, 0, 131], [1.0])
    """
    body, rest = _blocks(x.astype(jnp.float32), NESTED_BLOCK_SIZE)
    codes, scale = _dynamic_codes(body)
    codes = codes.reshape(*x.shape[:-1], -1)
    if rest.shape[-1]:
        rest_codes, rest_scale = _dynamic_codes(rest)
        codes = jnp.concatenate([codes, rest_codes], axis=-1)
        scale = jnp.concatenate([scale, rest_scale[..., None]], axis=-1)
    return codes, scale


def double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Quantizes float32 absmax `[..., b]` to `(codes uint8 [..., b], scale, offset)`.

    As QLoRA / bitsandbytes: subtract the mean (`offset`, `[...]`), then quantize blocks of
    256 with the signed dynamic map (`scale`: float32 `[..., num_blocks(b, 256)]`).

    Example:
      >>> codes, scale, offset = double_quantize(jnp.linspace(1.0, 2.0, 300))
      >>> codes.shape, scale.shape, round(offset.item(), 3)
      ((300,), (2,), 1.5)
    """
    absmax = absmax.astype(jnp.float32)
    # The barrier keeps XLA from turning the division by a constant into a multiplication by
    # its reciprocal under jit, which is 1 ulp off torch's mean for some counts.
    count = jax.lax.optimization_barrier(jnp.float32(absmax.shape[-1]))
    offset = torch_cpu_sum(absmax) / count
    codes, scale = dynamic_quantize(absmax - offset[..., None])
    return codes, scale, offset


def double_dequantize(codes: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    """Inverse of `double_quantize`: dynamic_map[code] * scale[block] + offset, float32.

    Example:
      >>> absmax = jnp.linspace(1.0, 2.0, 300)
      >>> float(jnp.abs(double_dequantize(*double_quantize(absmax)) - absmax).max()) < 0.01
      True
    """
    values = dequantize_blocks(codes, scale, _DYNAMIC_FORMAT, NESTED_BLOCK_SIZE,
                               codes.shape[-1])
    return _unfused(values) + offset[..., None]
