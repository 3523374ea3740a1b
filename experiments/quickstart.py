"""The smallest complete LoRA fine-tune: a plain linen MLP, adapters on every Dense, optax.

    .venv/bin/python experiments/quickstart.py

Prints trainable vs total parameters and the loss as it falls.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lowrank as lr


class MLP(nn.Module):
    width: int = 256

    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = nn.gelu(nn.Dense(self.width, name=f"hidden_{i}")(x))
        return nn.Dense(1, name="head")(x)


def main(steps: int = 200) -> list[float]:
    key_data, key_init, key_lora = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_data, (512, 32))
    y = jnp.sin(x[:, :1] * 3.0) + 0.5 * x[:, 1:2] * x[:, 2:3]  # a task the base never saw

    model = MLP()
    frozen = model.init(key_init, x)["params"]
    spec = lr.LoraSpec(rank=4, alpha=8, targets=r"hidden_\d/kernel", trainable=r"head/.*")
    adapters = lr.init_adapters(key_lora, frozen, spec)
    n_total = sum(v.size for v in jax.tree.leaves(frozen))
    n_train = sum(v.size for v in jax.tree.leaves(adapters))
    print(f"trainable parameters: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.2f}%)")

    tx = lr.optim.adamw(3e-3, weight_decay=0.01, clip_norm=1.0)
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state):
        loss_fn = lambda a: jnp.mean((lr.apply(model, frozen, a, x) - y) ** 2)  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(adapters)  # the frozen tree gets no gradient
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    losses = []
    for i in range(steps):
        adapters, opt_state, loss = step(adapters, opt_state)
        losses.append(float(loss))
        if i % 25 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {losses[-1]:.4f}")
    merged = lr.merge(frozen, adapters)  # a plain params tree for export
    gap = jnp.abs(model.apply({"params": merged}, x) - lr.apply(model, frozen, adapters, x)).max()
    print(f"merged vs factored max difference: {float(gap):.2e}")
    return losses


if __name__ == "__main__":
    main()
