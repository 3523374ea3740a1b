"""The training step under test: full fine-tuning, LoRA or QLoRA of a linen model with lowrank.

One builder for every benchmark (MiniLM against the peers, the scaling sweep, the GPU script),
so that all of them time the same step: ``lowrank.train.make_train_step`` over
``lowrank.train.make_loss_fn``, AdamW from ``lowrank.optim``, jitted with the state donated.

    >>> step = make_step(model, params, batch, forward, "lm", mode="qlora",
    ...                  spec=lr.LoraSpec(rank=8, targets=r".*kernel"))  # doctest: +SKIP
    >>> seconds = time_steps(step, 5)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lowrank as lr
from lowrank import paths, prng
from lowrank import train as lt

MODES = ("full", "lora", "qlora")
NF4_DOUBLE = lr.QuantSpec("nf4", block_size=64, double_quant=True)
"""QLoRA's storage: NormalFloat4 in blocks of 64, double-quantized scales (4.127 bits)."""


@dataclasses.dataclass
class Step:
    """A compiled training step with its state, ready to be timed.

    Attributes:
      run: performs one step (state donated and replaced) and waits for it.
      mode: "full", "lora" or "qlora".
      trainable_params: parameters that get gradients and optimizer state.
      adapter_params: parameters in LoRA factors (0 for full fine-tuning).
      quantized_params: parameters stored quantized in the frozen tree (0 unless QLoRA).
      frozen_bytes / trainable_bytes / opt_state_bytes: exact sizes of the step's trees.
      xla: XLA's own accounting of the compiled step (bytes): ``argument``, ``output``,
        ``alias`` (outputs written into donated arguments), ``temp`` (activations and other
        intermediates), and ``peak`` = argument + output - alias + temp.
      losses: the loss of every step run so far (to check that it trains).
      compiled: the compiled step (its optimized HLO and cost analysis, for profiling).
    """

    run: Callable[[], None]
    mode: str
    trainable_params: int
    adapter_params: int
    quantized_params: int
    frozen_bytes: int
    trainable_bytes: int
    opt_state_bytes: int
    xla: dict[str, int]
    losses: list[float]
    compiled: Any = None


def _xla_memory(compiled: Any) -> dict[str, int]:
    stats = compiled.memory_analysis()
    if stats is None:  # a backend without buffer accounting
        return {}
    out = {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
    }
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _adapter_params(trainable: Any) -> int:
    pairs = [x for x in jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, lr.LoraPair))
             if isinstance(x, lr.LoraPair)]
    return sum(int(p.a.size + p.b.size) for p in pairs)


def make_step(
    model: Any,
    params: Mapping,
    batch: Mapping[str, Any],
    forward: Callable[..., Any],
    loss: str,
    *,
    mode: str,
    spec: lr.LoraSpec | None = None,
    quant: lr.QuantSpec = NF4_DOUBLE,
    layouts: Mapping | None = None,
    compute_dtype: Any = jnp.float32,
    frozen_dtype: Any = None,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.01,
    seed: int = 0,
) -> Step:
    """Compiles one training step of ``model`` on ``batch`` and returns it with its state.

    Args:
      model, params: the unmodified linen model and its float params.
      batch: the (fixed) batch every timed step trains on.
      forward: ``fn(model, frozen, trainable, batch, rng) -> outputs``, as a
        ``lowrank.train.Task``'s forward.
      loss: "classification" or "lm" (see ``lowrank.train.losses``).
      mode: "full" (every parameter trained, from float32 master weights), "lora" (adapters
        of ``spec`` over a frozen base) or "qlora" (the same over the base quantized by
        ``quant``).
      spec: the adapters (required unless ``mode == "full"``).
      quant: how QLoRA stores the base (default nf4, blocks of 64, double quantization).
      layouts: ``lowrank.discover_layouts`` output, for scanned (stacked) kernels.
      compute_dtype: the dtype the step computes in (float32 on CPU, bfloat16 on GPUs).
      frozen_dtype: store the frozen tree's unquantized leaves in this dtype (None: as
        given), as peers load the base in their compute dtype; trainable leaves stay float32.

    >>> import flax.linen as nn
    >>> from lowrank.train.task import default_forward
    >>> model = nn.Dense(4)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
    >>> batch = {"inputs": jnp.ones((8, 64)), "labels": jnp.zeros(8, jnp.int32)}
    >>> step = make_step(model, params, batch, default_forward, "classification",
    ...                  mode="lora", spec=lr.LoraSpec(rank=2))
    >>> step.run(); step.trainable_params, len(step.losses)
    (136, 1)
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    key = jax.random.key(seed)
    if mode == "full":
        # A copy: the state is donated to the step, which must not delete the caller's params.
        trainable, frozen = jax.tree.map(jnp.copy, dict(params)), {}

        def step_forward(model, frozen, trainable, batch, rng):
            return forward(model, trainable, {}, batch, rng)
    else:
        if spec is None:
            raise ValueError(f"mode {mode!r} needs a LoraSpec (spec=...)")
        frozen, trainable = lr.init(key, params, spec, quant=quant if mode == "qlora" else None,
                                    layouts=layouts)
        if frozen_dtype is not None:
            frozen = jax.tree.map(
                lambda x: x if lr.is_quantized(x) else x.astype(frozen_dtype), frozen,
                is_leaf=lr.is_quantized)
        step_forward = forward
    loss_fn = lt.make_loss_fn(model, step_forward, loss, compute_dtype=compute_dtype)
    tx = lr.optim.adamw(learning_rate, weight_decay=weight_decay)
    state = lt.TrainState.create(trainable, tx, key)
    batch = jax.device_put(dict(batch))
    jitted = jax.jit(lt.make_train_step(loss_fn, tx), donate_argnums=0)
    compiled = jitted.lower(state, frozen, batch).compile()
    losses: list[float] = []
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready(holder["state"])
        losses.append(float(metrics["loss"]))

    return describe(run, mode, trainable, frozen, state.opt_state, compiled, losses)


def describe(run: Callable[[], None], mode: str, trainable: Any, frozen: Any, opt_state: Any,
             compiled: Any, losses: list[float]) -> Step:
    """The :class:`Step` of a compiled step and its initial trees (sizes read off the trees),
    so that every step builder (this module's, ``recipe_step``'s) accounts alike.

    >>> step = describe(lambda: None, "lora", {"w": jnp.ones(3)}, {}, {}, None, [])
    >>> step.trainable_params, step.trainable_bytes, step.xla
    (3, 12, {})
    """

    def size(tree):
        return lr.memory_report(tree).bytes

    return Step(
        run=run, mode=mode,
        trainable_params=lr.memory_report(trainable).params,
        adapter_params=_adapter_params(trainable),
        quantized_params=sum(int(x.size) for x in jax.tree.leaves(frozen, is_leaf=lr.is_quantized)
                             if lr.is_quantized(x)),
        frozen_bytes=size(frozen) if mode != "full" else 0,
        trainable_bytes=size(trainable), opt_state_bytes=size(opt_state),
        xla=_xla_memory(compiled) if compiled is not None else {}, losses=losses,
        compiled=compiled,
    )


def time_steps(step: Step, n: int) -> list[float]:
    """Seconds of each of ``n`` steps (each waits for its results).

    >>> time_steps(step, 3)  # doctest: +SKIP
    [0.21, 0.2, 0.2]
    """
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step.run()
        times.append(time.perf_counter() - start)
    return times


def matmul_rate(m: int, k: int, n: int, dtype: Any = jnp.float32, reps: int = 20) -> float:
    """Measured FLOP/s of one jitted ``[m, k] @ [k, n]`` on random data (median of ``reps``).

    >>> matmul_rate(64, 64, 64, reps=3) > 0
    True
    """
    a = jax.random.normal(jax.random.key(0), (m, k), dtype)
    b = jax.random.normal(jax.random.key(1), (k, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / float(np.median(times))


def matmul_params(params: Mapping) -> int:
    """Parameters that multiply activations in a matmul: every ``kernel`` leaf (Dense, an
    untied LM head); embedding tables are looked up, not multiplied, and norms and biases are
    elementwise.

    >>> matmul_params({"d": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
    ...                "emb": {"embedding": jnp.ones((10, 4))}})
    12
    """
    flat = paths.flatten(paths.params_of(params))
    return sum(int(np.prod(np.shape(v))) for p, v in flat.items()
               if p.rsplit(paths.SEP, 1)[-1] == "kernel")


def model_flops(mode: str, n_matmul: int, tokens: int, adapter_params: int = 0) -> float:
    """Model FLOPs of one training step (attention's token-token products not counted).

    - full: ``6 N T`` (forward 2NT, input gradients 2NT, weight gradients 2NT).
    - lora / qlora: ``4 N T + 6 T P``: the frozen weights' forward and input gradients (no
      weight gradients), plus for the adapters' P parameters (P = sum of r (d_in + d_out)) a
      forward, an input gradient and a weight gradient, 2TP each. Dequantizing the base is
      not model work and is not counted.

    >>> model_flops("full", 10, 2), model_flops("lora", 10, 2, adapter_params=1)
    (120.0, 92.0)
    """
    if mode == "full":
        return 6.0 * n_matmul * tokens
    if mode in ("lora", "qlora"):
        return 4.0 * n_matmul * tokens + 6.0 * tokens * adapter_params
    raise ValueError(f"mode {mode!r} is not one of {MODES}")


def bert_forward(model, frozen, trainable, batch, rng, *, dropout=False, prng_name="threefry"):
    """A BERT classifier's forward on ``input_ids``, ``attention_mask``, ``token_type_ids``.

    ``dropout=True`` runs the model's own dropout (``deterministic=False``: hidden and
    attention-probability dropout, as torch's ``train()`` mode), drawing from ``rng`` re-made
    as a key of generator ``prng_name`` (``lowrank.prng``); bind them with ``functools.partial``.

    >>> forward = functools.partial(bert_forward, dropout=True, prng_name="hash")  # doctest: +SKIP
    """
    if rng is not None:
        rng = prng.rewrap(rng, prng_name)
    return lr.apply(model, frozen, trainable, batch["input_ids"], batch["attention_mask"],
                    batch["token_type_ids"], deterministic=not dropout, lora_rng=rng)


def lm_forward(model, frozen, trainable, batch, rng):
    """A causal LM's forward on ``batch["inputs"]`` (the loss reads ``batch["targets"]``)."""
    return lr.apply(model, frozen, trainable, batch["inputs"], lora_rng=rng)


LLAMA_TARGETS = r"model/layers/.*/kernel"
"""Every linear layer of the decoder layers (PEFT's "all-linear": the LM head left out)."""
LLAMA_QUANT_TARGETS = r"model/layers/.*"


@dataclasses.dataclass
class Llama:
    """A Llama-style causal LM with random weights and a batch of random tokens.

    Attributes: ``model`` (layers scanned, so compile time does not grow with depth),
    ``params``, ``batch`` (``inputs``, ``targets``), ``layouts`` (of the stacked kernels),
    ``params_count`` (all parameters), ``matmul_params`` (see :func:`matmul_params`).
    """

    model: Any
    params: Any
    batch: dict
    layouts: dict
    params_count: int
    matmul_params: int

    @property
    def tokens(self) -> int:
        return int(np.prod(self.batch["inputs"].shape))


def llama(hidden: int, layers: int, heads: int, intermediate: int, *, vocab: int,
          batch: int, seq: int, kv_heads: int | None = None, seed: int = 0) -> Llama:
    """Builds a random Llama-style LM (untied head, SwiGLU) and a random batch.

    >>> m = llama(32, 2, 4, 64, vocab=128, batch=2, seq=8)
    >>> m.params_count, m.tokens
    (28832, 16)
    """
    from lowrank import models

    cfg = models.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, max_position_embeddings=max(seq, 128))
    model = models.LlamaForCausalLM(cfg, scan_layers=True)
    ids = jax.random.randint(jax.random.key(seed), (batch, seq + 1), 0, vocab, jnp.int32)
    data = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
    params = jax.jit(model.init)(jax.random.key(seed + 1), data["inputs"])["params"]
    layouts = lr.discover_layouts(model, params, data["inputs"])
    return Llama(model, params, data, layouts, lr.memory_report(params).params,
                 matmul_params(params))
