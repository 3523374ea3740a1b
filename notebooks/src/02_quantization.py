"""Source of notebooks/02_quantization.ipynb (python notebooks/build.py)."""
# %% [md]
# # Quantization: NF4, FP4 and INT4 on MiniLM's weights
#
# QLoRA keeps the frozen base in 4 bits. Each block of 64 consecutive weights is divided by
# its largest magnitude (its *absmax*, kept as a scale), which puts it in [-1, 1], and every
# value is rounded to the nearest of 16 code values: the format's *codebook*. The formats
# differ only in where those 16 values lie. This notebook draws the codebooks, measures the
# error each format makes on the real MiniLM weights, and counts the bits per parameter with
# and without double quantization (the block scales themselves stored in 8 bits).
#
# `LOWRANK_NOTEBOOK_SMALL=1` measures one encoder layer instead of all six.

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import treescope
from IPython.display import display
from matplotlib.ticker import NullLocator

import lowrank as lr
from lowrank import assets, models, paths
from lowrank.quant.formats import get_format

SMALL = os.environ.get("LOWRANK_NOTEBOOK_SMALL", "0") not in ("", "0")
# The weights QLoRA quantizes: the transformer layers' kernels (embeddings and norms stay).
TARGETS = r"encoder/layer_0/.*" if SMALL else r"encoder/.*"
FOUR_BIT = ("nf4", "fp4", "int4")
treescope.basic_interactive_setup(autovisualize_arrays=False)
print(f"small mode: {SMALL}; quantizing {TARGETS!r}")

# %% [md]
# ## 1. The codebooks, against MiniLM's weights
#
# The histogram shows MiniLM's kernels after scaling each block of 64 by its absmax (blocks run
# along each kernel's input axis, as `quantize_tree` stores them): the values a codebook has to
# cover. **NF4** puts its codes at quantiles of a normal distribution, so bell-shaped weights
# use every code about equally often. **FP4** (a 4-bit float, E2M1) crowds its codes near zero
# and leaves big gaps near ±1. **INT4** spaces 15 codes evenly.

# %%
model, params = models.from_pretrained(assets.minilm_dir())
kernels = {path: np.asarray(w) for path, w in paths.flatten(params).items()
           if paths.select([path], TARGETS) and path.endswith("kernel")}
blocks = np.concatenate([w.T.reshape(-1, 64) for w in kernels.values()])
unit = blocks / np.abs(blocks).max(axis=1, keepdims=True)
print(f"{len(kernels)} kernels, {blocks.size:,} weights")

fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4), sharex=True,
                                  gridspec_kw={"height_ratios": [2, 1]})
top.hist(unit.ravel(), bins=200, color="gray")
top.set(ylabel="weights", title="MiniLM kernels / block absmax, and the 4-bit codebooks")
codebooks = {}  # the values codes take in [-1, 1] (INT4's code 0, -8/7, is never produced)
for fmt in FOUR_BIT:
    codebook = np.unique(get_format(fmt).codebook)
    codebooks[fmt] = codebook[np.abs(codebook) <= 1]
for row, codes in enumerate(codebooks.values()):
    bottom.scatter(codes, np.full(codes.shape, row), marker="|", s=250)
    for code in codes:
        top.axvline(code, color=f"C{row}", alpha=0.25, linewidth=0.8)
bottom.set(yticks=range(len(FOUR_BIT)), yticklabels=FOUR_BIT, xlabel="value / absmax",
           ylim=(-0.7, len(FOUR_BIT) - 0.3))
fig.tight_layout()
plt.show()
for fmt, codes in codebooks.items():
    print(f"{fmt:>4}: {len(codes)} values: {np.round(codes.astype(float), 3).tolist()}")

# %% [md]
# ## 2. What a quantized weight holds
#
# `quantize_tree` replaces each chosen kernel by a `QuantizedArray`: packed codes (two per
# byte), one absmax per block, and static metadata (logical shape, format, block size). It is
# an ordinary pytree, so it passes through `jit` and `lr.apply` like any array; it is
# dequantized inside the step, in the compute dtype.

# %%
quantized = {fmt: lr.quantize_tree(params, lr.QuantSpec(fmt, targets=TARGETS))
             for fmt in (*FOUR_BIT, "int8")}
display(quantized["nf4"]["encoder"]["layer_0"]["attention"]["self"]["query"])

# %% [md]
# ## 3. The error each format makes
#
# Dequantize and subtract the original weights. NF4's error is the smallest of the 4-bit
# formats on these bell-shaped weights; INT8 is shown for scale.

# %%
errors = {}
for fmt, frozen in quantized.items():
    restored = paths.flatten(lr.dequantize_tree(frozen))
    errors[fmt] = np.concatenate([(np.asarray(restored[p]) - w).ravel()
                                  for p, w in kernels.items()])
scale = np.concatenate([w.ravel() for w in kernels.values()]).std()
rmse = {fmt: np.sqrt(np.mean(e**2)) for fmt, e in errors.items()}
display(pd.DataFrame({"RMSE": rmse,
                      "RMSE / weight std": {fmt: r / scale for fmt, r in rmse.items()},
                      "max |error|": {fmt: np.abs(e).max() for fmt, e in errors.items()}}))
assert rmse["int8"] < rmse["nf4"] < min(rmse["fp4"], rmse["int4"]), rmse

fig, ax = plt.subplots(figsize=(7, 3.5))
edges = np.linspace(-1, 1, 201) * np.abs(errors["fp4"]).max()
for fmt in FOUR_BIT:
    ax.hist(errors[fmt], bins=edges, histtype="step", linewidth=1.5,
            label=f"{fmt} (RMSE {rmse[fmt]:.1e})")
ax.set(yscale="log", xlabel="dequantized - original", ylabel="weights",
       title="Quantization error on MiniLM's kernels (blocks of 64)")
ax.legend()
plt.show()

# %% [md]
# ## 4. Bits per parameter
#
# A block of B codes costs 4B bits plus its 32-bit absmax: 4 + 32/B bits per parameter.
# Double quantization stores the absmaxes in 8 bits, in blocks of 256 with one 32-bit scale
# each (and one mean offset per weight): 4 + 8/B + 32/(256 B). At B = 64 that is 4.5 against
# 4.127 bits. `lr.memory_report` reads the bytes off the arrays themselves; `jax.eval_shape`
# gets them without quantizing anything.

# %%
rows = []
for block_size in (32, 64, 128, 256):
    for double_quant in (False, True):
        spec = lr.QuantSpec("nf4", block_size, double_quant, targets=TARGETS)
        frozen = jax.eval_shape(lambda p, spec=spec: lr.quantize_tree(p, spec), params)
        leaves = [leaf for leaf in jax.tree.leaves(frozen, is_leaf=lr.is_quantized)
                  if lr.is_quantized(leaf)]
        formula = (4 + 8 / block_size + 32 / (256 * block_size) if double_quant
                   else 4 + 32 / block_size)
        rows.append({"block size": block_size, "double quant": double_quant,
                     "bits / param (measured)": lr.memory_report(leaves).bits_per_param,
                     "bits / param (formula)": formula,
                     "whole model, bits / param": lr.memory_report(frozen).bits_per_param})
bits = pd.DataFrame(rows)
display(bits.round(3))
assert np.allclose(bits["bits / param (measured)"], bits["bits / param (formula)"], atol=0.01)

fig, ax = plt.subplots(figsize=(5, 3))
for double_quant, group in bits.groupby("double quant"):
    ax.plot(group["block size"], group["bits / param (measured)"], marker="o",
            label="double quantization" if double_quant else "float32 absmax")
ax.set_xscale("log", base=2)
ax.set(xlabel="block size", ylabel="bits / quantized parameter", title="NF4 storage cost")
sizes = bits["block size"].unique()
ax.set_xticks(sizes, [str(b) for b in sizes])
ax.xaxis.set_minor_locator(NullLocator())  # a log axis would also label 3x10^1, 6x10^1, ...
ax.legend()
fig.canvas.draw()
assert [t.get_text() for t in ax.get_xticklabels(which="both")] == ["32", "64", "128", "256"]
plt.show()

# %% [md]
# The whole-model column stays far above 4 bits because MiniLM is small and embedding-heavy:
# its 11.7M word-embedding parameters stay in float32, as in QLoRA. Double quantization saves
# 0.37 bits per parameter at blocks of 64, and it costs almost nothing in accuracy:

# %%
nf4_dq = lr.quantize_tree(params, lr.QuantSpec("nf4", double_quant=True, targets=TARGETS))
restored = paths.flatten(lr.dequantize_tree(nf4_dq))
error_dq = np.concatenate([(np.asarray(restored[p]) - w).ravel() for p, w in kernels.items()])
print(f"NF4 RMSE: {rmse['nf4']:.4e} with float32 absmax, "
      f"{np.sqrt(np.mean(error_dq**2)):.4e} with double quantization")
