"""Source of notebooks/01_quickstart.ipynb (python notebooks/build.py)."""
# %% [md]
# # Quickstart: LoRA on MiniLM, BBC News topics
#
# This notebook fine-tunes the real `all-MiniLM-L6-v2` (22.7M parameters) to classify BBC News
# articles into five topics, training only low-rank adapters on the attention's query and
# value weights plus the new classifier head. It then evaluates, merges the adapters into
# plain weights, and compares parameter counts and memory.
#
# Set `LOWRANK_NOTEBOOK_SMALL=1` for a quick run (a few steps on every 8th
# article): the tests run that mode.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import pandas as pd
import treescope
from IPython.display import display

import lowrank as lr
from lowrank import assets, data, models
from lowrank import train as lt

SMALL = os.environ.get("LOWRANK_NOTEBOOK_SMALL", "0") not in ("", "0")
STEPS, BATCH_SIZE, MAX_LENGTH = (4, 8, 32) if SMALL else (60, 32, 32)
treescope.basic_interactive_setup(autovisualize_arrays=False)  # trees shown as trees
print(f"small mode: {SMALL}; {STEPS} steps of {BATCH_SIZE} articles, {MAX_LENGTH} tokens each")

# %% [md]
# ## 1. The model
#
# `lowrank.assets` fetches MiniLM's Hugging Face files once (config, safetensors, tokenizer)
# into a cache. `models.from_pretrained` builds a plain Flax linen BERT from them, with a fresh
# five-way classifier head on mean-pooled tokens. The parameters are an ordinary nested dict:
# here is one encoder layer.

# %%
model, params = models.from_pretrained(assets.minilm_dir(), num_labels=5, pooling="mean",
                                       key=jax.random.key(0))
print(type(model).__name__, "-", lr.memory_report(params))
display(params["bert"]["encoder"]["layer_0"])

# %% [md]
# ## 2. The data
#
# 2225 articles, split 80/10/10 per topic by a hash of their ids (the same split on every
# machine), tokenized with MiniLM's own tokenizer. `MAX_LENGTH` tokens hold the headline
# and the first sentence or two, which is enough to tell the topics apart.

# %%
splits = data.split_bbc(data.load_bbc())
if SMALL:  # every 8th article still covers all five topics
    splits = {name: split.subset(list(split.ids[::8])) for name, split in splits.items()}
tokenizer = data.load_tokenizer(assets.minilm_dir(), max_length=MAX_LENGTH)
columns = ("input_ids", "attention_mask", "labels")
arrays = {name: {k: v for k, v in data.classification_arrays(split, tokenizer).items()
                 if k in columns}
          for name, split in splits.items()}
topics = splits["train"].label_names
print({name: len(split) for name, split in splits.items()}, topics)

# %% [md]
# ## 3. Adapters
#
# A `LoraSpec` names the weights to adapt by a regex over their paths; `trainable` adds
# full-rank leaves to train as they are (the new head). `init_adapters` returns the
# **trainable tree**: a `LoraPair(a, b)` beside each adapted weight, `a` random and `b` zero,
# so training starts exactly from the pretrained model. The frozen `params` are untouched.

# %%
spec = lr.LoraSpec(rank=8, alpha=16, targets=r".*/attention/self/(query|value)/kernel",
                   trainable=r"classifier/.*")
adapters = lr.init_adapters(jax.random.key(1), params, spec)
display(adapters["bert"]["encoder"]["layer_0"])

# %% [md]
# ## 4. Training
#
# The forward pass runs the **unmodified** model through `lr.apply(model, frozen, adapters,
# ...)`, which adds `scale * (x A) B` to each adapted layer's output. `lowrank.train` turns it
# into a pure, jitted step that differentiates the adapters only: the frozen weights get
# neither gradients nor optimizer state.

# %%
def forward(model, frozen, trainable, batch, rng):
    return lr.apply(model, frozen, trainable, batch["input_ids"], batch["attention_mask"],
                    lora_rng=rng)


loss_fn = lt.make_loss_fn(model, forward, "classification")
tx = lr.optim.adamw(3e-3, weight_decay=0.01, clip_norm=1.0)
train_step = jax.jit(lt.make_train_step(loss_fn, tx))
eval_step = jax.jit(lt.make_eval_step(loss_fn))
state = lt.TrainState.create(adapters, tx, jax.random.key(2))

before = lt.evaluate(eval_step, state.trainable, params, data.eval_batches(arrays["test"], 64))
losses = []
for step in range(STEPS):
    batch = data.batch_at(arrays["train"], step, BATCH_SIZE, seed=0)
    state, metrics = train_step(state, params, batch)
    losses.append(float(metrics["loss"]))
print(f"loss: {losses[0]:.3f} at the first step, {losses[-1]:.3f} at the last")

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(losses)
ax.set(xlabel="step", ylabel="training loss", title="LoRA r=8 on query and value")
plt.show()

# %% [md]
# ## 5. Evaluation
#
# Accuracy on the held-out test articles, before training (a random head: chance is 20%) and
# after.

# %%
after = lt.evaluate(eval_step, state.trainable, params, data.eval_batches(arrays["test"], 64))
display(pd.DataFrame({"before": before, "after": after}).T[["accuracy", "loss"]])

# %% [md]
# ## 6. Merging
#
# For export and inference, `lr.merge` folds each update into its weight, `W + scale * A B`,
# giving a plain params tree that the model runs with its own `model.apply`, at no extra cost
# per token. Training keeps the factored form, which never builds a full-size matrix.

# %%
adapters = state.trainable
merged = lr.merge(params, adapters)
batch = next(data.eval_batches(arrays["test"], 64))
factored = jax.jit(forward, static_argnums=0)(model, params, adapters, batch, None)
plain = jax.jit(model.apply)({"params": merged}, batch["input_ids"], batch["attention_mask"])
gap = float(jnp.abs(plain - factored).max())
print(f"merged vs factored logits: max difference {gap:.1e}")
assert gap < 1e-3, gap

# %% [md]
# ## 7. Parameters and memory
#
# `lr.memory_report` counts the bytes each tree really holds. LoRA trains a fraction of a
# percent of the parameters, so its optimizer state (Adam keeps two moments per trained
# parameter) is tiny next to full fine-tuning's. QLoRA goes one step further and stores the
# frozen encoder weights in 4 bits (NF4 with double quantization), dequantizing them on the
# fly inside the step.

# %%
nf4 = lr.QuantSpec("nf4", double_quant=True, targets=r"bert/encoder/.*")
qlora_base = jax.eval_shape(lambda p: lr.quantize_tree(p, nf4), params)  # shapes: no compute
rows = {
    "frozen base (float32)": lr.memory_report(params),
    "frozen base, encoder in NF4 + DQ": lr.memory_report(qlora_base),
    "LoRA trainable tree": lr.memory_report(adapters),
    "LoRA optimizer state": lr.memory_report(state.opt_state),
    "full fine-tuning optimizer state": lr.memory_report(jax.eval_shape(tx.init, params)),
}
display(pd.DataFrame({"parameters": [f"{r.params:,}" for r in rows.values()],
                      "MB": [round(r.bytes / 2**20, 2) for r in rows.values()],
                      "bits / parameter": [round(r.bits_per_param, 2) for r in rows.values()]},
                     index=list(rows)))
share = rows["LoRA trainable tree"].params / rows["frozen base (float32)"].params
print(f"LoRA trains {100 * share:.2f}% of the parameters")
