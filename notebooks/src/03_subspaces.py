"""Source of notebooks/03_subspaces.ipynb (python notebooks/build.py)."""
# %% [md]
# # Subspaces: what r=8 and r=64 adapters learn (LoRA paper, section 7)
#
# Hu et al. (2021) trained adapters of rank 8 and 64 on the same task and asked how much of
# the r=64 adapter's subspace the r=8 one already finds. With `U_8`, `U_64` the left-singular
# vectors of the two `A` matrices (top directions first), their normalised subspace similarity
#
# $$\phi(A_8, A_{64}, i, j) = \frac{\lVert U_8[:, :i]^\top U_{64}[:, :j] \rVert_F^2}{\min(i, j)}$$
#
# is 1 when the top-`i` directions of one lie inside the top-`j` of the other and 0 when they are
# orthogonal. They also measured how strongly the update `ΔW` amplifies directions of the
# pretrained `W`: the *amplification factor* `‖ΔW‖_F / ‖Uᵀ W V‖_F`, with `U`, `V` the top
# singular directions of `ΔW`. Here both come from `lowrank.analysis`, on MiniLM fine-tuned on
# BBC News topics with LoRA on the attention's query and value weights.
#
# The full run trains each adapter for 200 steps (several minutes on two CPU cores);
# `LOWRANK_NOTEBOOK_SMALL=1` trains a tiny random BERT for a few steps instead (seconds, and
# the numbers mean nothing then).

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import treescope
from IPython.display import display

import lowrank as lr
from lowrank import analysis, assets, data, models
from lowrank import train as lt

SMALL = os.environ.get("LOWRANK_NOTEBOOK_SMALL", "0") not in ("", "0")
RANKS = (8, 64)
STEPS, BATCH_SIZE, MAX_LENGTH = (10, 16, 32) if SMALL else (200, 32, 32)
treescope.basic_interactive_setup(autovisualize_arrays=False)
print(f"small mode: {SMALL}; {STEPS} steps of {BATCH_SIZE} articles per rank {RANKS}")

# %% [md]
# ## 1. Model and data
#
# MiniLM with a fresh five-way head (a tiny random BERT in small mode), and the BBC News
# articles tokenized to `MAX_LENGTH` tokens.

# %%
if SMALL:
    config = models.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=256)
    model = models.BertForSequenceClassification(config, num_labels=5, pooling="mean")
    params = jax.jit(model.init)(jax.random.key(0), np.ones((1, 8), np.int32))["params"]
else:
    model, params = models.from_pretrained(assets.minilm_dir(), num_labels=5, pooling="mean",
                                           key=jax.random.key(0))
splits = data.split_bbc(data.load_bbc())
if SMALL:
    splits = {name: split.subset(list(split.ids[::8])) for name, split in splits.items()}
tokenizer = data.load_tokenizer(assets.minilm_dir(), max_length=MAX_LENGTH)
arrays = {name: {k: v for k, v in data.classification_arrays(split, tokenizer).items()
                 if k in ("input_ids", "attention_mask", "labels")}
          for name, split in splits.items()}
LAYERS = model.config.num_hidden_layers
print(type(model).__name__, f"{LAYERS} layers,", lr.memory_report(params))

# %% [md]
# ## 2. Training an r=8 and an r=64 adapter
#
# `lowrank.train.train` runs the whole loop from a config: a `Task` says what to train on
# (model, frozen weights, a batch for each step, the loss), the config how (`lora.*` is the
# `LoraSpec`, `optimizer.*` AdamW). Both runs see the same batches in the same order; alpha is
# fixed at 16, so the update is scaled by 16 / r, as in the paper.

# %%
def forward(model, frozen, trainable, batch, rng):
    return lr.apply(model, frozen, trainable, batch["input_ids"], batch["attention_mask"],
                    lora_rng=rng)


task = lt.Task(model, params,
               train_batch=lambda seed, step: data.batch_at(arrays["train"], step, BATCH_SIZE,
                                                            seed),
               loss="classification",
               eval_batches=lambda: data.eval_batches(arrays["test"], 64),
               forward=forward, source="bbc")


def train_adapters(rank: int) -> lt.TrainResult:
    config = lt.default_config()
    config.steps, config.batch_size, config.quiet = STEPS, BATCH_SIZE, True
    config.lora.rank, config.lora.alpha = rank, 16.0
    config.lora.targets = r".*/attention/self/(query|value)/kernel"
    config.lora.trainable = r"classifier/.*"
    config.optimizer.learning_rate, config.optimizer.clip_norm = 3e-3, 1.0
    config.optimizer.schedule, config.optimizer.warmup_steps = "warmup_cosine", STEPS // 10
    return lt.train(config, task)


runs = {rank: train_adapters(rank) for rank in RANKS}
display(pd.DataFrame({f"r={rank}": run.eval_metrics for rank, run in runs.items()}).T)


def adapter(rank: int, layer: int, weight: str) -> lr.LoraPair:
    return runs[rank].trainable["bert"]["encoder"][f"layer_{layer}"]["attention"]["self"][
        weight]["kernel"]


LAYER = LAYERS // 2
display(adapter(8, LAYER, "value"))

# %% [md]
# ## 3. Subspace similarity of A_8 and A_64
#
# `analysis.subspace_similarity_grid(a8, a64)` is the `[8, 64]` grid of φ for every `i ≤ 8`,
# `j ≤ 64` (the paper's Figure 3). The dashed lines are what chance gives: two random
# Gaussian matrices of the same shapes, whose φ grows only as `j / d`.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 2.8))
for ax, weight in zip(axes, ("query", "value"), strict=True):
    grid = analysis.subspace_similarity_grid(adapter(8, LAYER, weight).a,
                                             adapter(64, LAYER, weight).a)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                      extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
    ax.set(xlabel="j (top directions of A, r=64)", ylabel="i (r=8)",
           title=f"W_{weight[0]}, layer {LAYER}: φ(A_8, A_64, i, j)")
    fig.colorbar(image, ax=ax)
fig.tight_layout()
plt.show()

# %% [md]
# The paper found the *top* direction of the r=8 adapter largely contained in the r=64 one's
# top directions, far above chance, and the further directions of each mostly noise: a low
# rank already finds what matters. The first row of each grid, φ(A_8, A_64, 1, j), for every
# layer against chance:

# %%
d = adapter(8, 0, "query").a.shape[0]
noise = jax.random.normal(jax.random.key(3), (2, d, 64))
chance = analysis.subspace_similarity_grid(noise[0][:, :8], noise[1])[0]
fig, axes = plt.subplots(1, 2, figsize=(11, 3), sharey=True)
for ax, weight in zip(axes, ("query", "value"), strict=True):
    for layer in range(LAYERS):
        grid = analysis.subspace_similarity_grid(adapter(8, layer, weight).a,
                                                 adapter(64, layer, weight).a)
        ax.plot(range(1, 65), grid[0], label=f"layer {layer}")
    ax.plot(range(1, 65), chance, "k--", label="random")
    ax.set(xlabel="j", title=f"W_{weight[0]}: φ(A_8, A_64, 1, j)", ylim=(0, 1))
axes[0].set_ylabel("φ")
axes[1].legend(fontsize=8, ncol=2)
fig.tight_layout()
plt.show()

# %% [md]
# ## 4. Amplification factor
#
# `analysis.amplification_factor(ΔW, W, r)` projects `W` onto the top-`r` singular directions
# of `ΔW = (α/r) A B` (from `LoraPair.delta()`) and divides `‖ΔW‖_F` by what is left. A large
# factor means the update strengthens directions the pretrained weight barely uses. The paper
# measured 21.5 for r=4 and 1.9 for r=64 (GPT-3's W_q, layer 48): the many directions of a
# large rank are mostly ones `W` already has. `analysis.effective_rank` tells how many
# directions `ΔW` really uses.

# %%
rows = []
for rank in RANKS:
    for layer in range(LAYERS):
        for weight in ("query", "value"):
            pair = adapter(rank, layer, weight)
            w = params["bert"]["encoder"][f"layer_{layer}"]["attention"]["self"][weight]["kernel"]
            delta = pair.delta()
            rows.append({"rank": rank, "layer": layer, "weight": f"W_{weight[0]}",
                         "‖ΔW‖_F": float(np.linalg.norm(delta)),
                         "amplification": float(analysis.amplification_factor(delta, w, rank)),
                         "effective rank of ΔW": float(analysis.effective_rank(delta))})
amplification = pd.DataFrame(rows)
display(amplification.pivot_table(index=["weight", "layer"], columns="rank",
                                  values=["amplification", "effective rank of ΔW"]).round(2))

fig, ax = plt.subplots(figsize=(7, 3))
table = amplification.pivot_table(index=["weight", "layer"], columns="rank",
                                  values="amplification")
table.plot.bar(ax=ax, rot=0)
ax.set(ylabel="‖ΔW‖_F / ‖Uᵀ W V‖_F", title="Amplification factor by rank")
ax.set_xticklabels([f"{w}\nlayer {layer}" for w, layer in table.index], fontsize=8)
fig.tight_layout()
plt.show()
