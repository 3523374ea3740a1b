"""Codebooks of the block-wise quantization formats, as bitsandbytes defines them.

Every format maps a code (an unsigned integer) to a value in [-1, 1]; a block's values are
`codebook[code] * absmax`. Codes are found by rounding to the nearest codebook value.
"""

import dataclasses
import functools

import numpy as np

FORMATS = ("nf4", "fp4", "int4", "int8")
"""The accepted format names."""

# QLoRA's NormalFloat4, index = code (bitsandbytes' `get_4bit_type("nf4")`).
_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# bitsandbytes' E2M1 FP4 (sign bit, 2 exponent bits with bias 2, 1 mantissa bit), index = code,
# normalized by its maximum 12. Code 8 is "-0": bitsandbytes' C kernel returns -0.0 for it.
_FP4_UNNORMALIZED = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                     -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
# The order in which bitsandbytes sorts the FP4 codebook (`torch.argsort`), which decides
# which of the two zero codes a value rounds to: values in (-0.0026, 0] get code 0 and
# values in (0, 0.0026] get code 8.
_FP4_SORT_ORDER = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]


@dataclasses.dataclass(frozen=True)
class Format:
    """A quantization format: its codebook and how values round to codes.

    Attributes:
      name: the format name, one of `FORMATS`.
      bits: bits per code (4 codes are packed two per byte).
      codebook: float32 `[2**bits]`, the value of each code.
      sort_order: int32 indices that sort `codebook` ascending (ties broken as bitsandbytes).
    """

    name: str
    bits: int
    codebook: np.ndarray
    sort_order: np.ndarray

    @property
    def midpoints(self) -> np.ndarray:
        """float32 midpoints between consecutive sorted codebook values (rounding bounds)."""
        ordered = self.codebook[self.sort_order]
        return (ordered[:-1] + ordered[1:]) / np.float32(2.0)


def _symmetric_int(bits: int) -> np.ndarray:
    # Signed codes -qmax..qmax stored offset by 2**(bits-1); code 0 (value -2**(bits-1)) is
    # never produced but keeps the table indexable by every code.
    qmax = 2 ** (bits - 1) - 1
    signed = np.arange(2**bits, dtype=np.float32) - np.float32(2 ** (bits - 1))
    return signed / np.float32(qmax)


@functools.cache
def get_format(name: str) -> Format:
    """The `Format` called `name`.

    Example:
      >>> get_format("nf4").codebook[7]
      np.float32(0.0)
    """
    if not isinstance(name, str) or name not in FORMATS:
        raise ValueError(f"unknown quantization format {name!r}; accepted formats: {FORMATS}")
    if name == "nf4":
        codebook = np.array(_NF4, np.float32)
        order = np.arange(16)
    elif name == "fp4":
        raw = np.array(_FP4_UNNORMALIZED, np.float32)
        codebook = raw / np.float32(12.0)
        order = np.array(_FP4_SORT_ORDER)
    else:
        codebook = _symmetric_int(4 if name == "int4" else 8)
        order = np.arange(codebook.size)
    codebook.setflags(write=False)
    return Format(name, 8 if name == "int8" else 4, codebook, order.astype(np.int32))


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    # A float32 a*b+c with one rounding, as torch's FMA-compiled CPU kernels compute it
    # (the float64 product of two float32 values is exact).
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _torch_linspace32(start: float, end: float, steps: int) -> np.ndarray:
    # torch.linspace in float32 on CPU: the first half counts up from start, the second half
    # down from end, each value one fused multiply-add.
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    idx = np.arange(steps)
    up = _fma32(np.float32(step), idx.astype(np.float32), start32)
    down = _fma32(-np.float32(step), (steps - 1 - idx).astype(np.float32), end32)
    return np.where(idx < steps // 2, up, down).astype(np.float32)


@functools.cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map, sorted: the codebook of double quantization.

    Equal, bit for bit, to `bitsandbytes.functional.create_dynamic_map(signed=True,
    max_exponent_bits=7, total_bits=8)`: for each exponent 10**-6 .. 10**0, the midpoints of
    2**i + 1 evenly spaced fractions in [0.1, 1], both signs, plus 0 and 1.

    Example:
      >>> m = dynamic_map()
      >>> m.shape, m[-1], m[127]
      ((256,), np.float32(1.0), np.float32(0.0))
    """
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        bounds = _torch_linspace32(0.1, 1.0, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scaled = np.float32(10.0 ** (i - 6)) * means
        values += scaled.tolist() + (-scaled).tolist()
    table = np.array(sorted(values), np.float32)
    table.setflags(write=False)
    return table
