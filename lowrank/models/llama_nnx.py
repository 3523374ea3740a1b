"""The Llama-style decoder of :mod:`lowrank.models.llama`, written with Flax NNX.

Same architecture, same math (the pieces are shared: rotary embeddings, the causal mask,
attention), and the same parameter paths as the linen model (``model/embed_tokens/embedding``,
``model/layers_{i}/self_attn/q_proj/kernel``, ... or ``model/layers/...`` with a leading layer
axis when ``scan_layers``: the layers are built with ``nnx.vmap`` and run with ``nnx.scan``).
So a params tree, an adapters tree, a checkpoint or a PEFT file of one runs on the other, and
:func:`from_linen` makes the NNX model of a linen one (abstract: no weights allocated).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from lowrank.models import llama as linen_llama
from lowrank.models.common import activation, dot_product_attention
from lowrank.models.llama import LlamaConfig, apply_rotary, causal_mask, rotary_cos_sin


def _linear(c: LlamaConfig, n_in: int, n_out: int, bias: bool, dtype, param_dtype,
            rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.normal(c.initializer_range), rngs=rngs)


def _rms_norm(c: LlamaConfig, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


class LlamaAttention(nnx.Module):
    def __init__(self, c: LlamaConfig, dtype, param_dtype, rngs: nnx.Rngs):
        self.config = c
        q, kv, b = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, \
            c.attention_bias
        self.q_proj = _linear(c, c.hidden_size, q, b, dtype, param_dtype, rngs)
        self.k_proj = _linear(c, c.hidden_size, kv, b, dtype, param_dtype, rngs)
        self.v_proj = _linear(c, c.hidden_size, kv, b, dtype, param_dtype, rngs)
        self.o_proj = _linear(c, q, c.hidden_size, b, dtype, param_dtype, rngs)

    def __call__(self, x, mask, cos, sin):
        c = self.config
        heads = lambda y, n: y.reshape(*x.shape[:-1], n, c.head_dim)  # noqa: E731
        q = apply_rotary(heads(self.q_proj(x), c.num_attention_heads), cos, sin)
        k = apply_rotary(heads(self.k_proj(x), c.num_key_value_heads), cos, sin)
        v = heads(self.v_proj(x), c.num_key_value_heads)
        out = dot_product_attention(q, k, v, mask)
        return self.o_proj(out.reshape(*x.shape[:-1], c.num_attention_heads * c.head_dim))


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, c: LlamaConfig, dtype, param_dtype, rngs: nnx.Rngs):
        self.act = activation(c.hidden_act)
        b = c.mlp_bias
        self.gate_proj = _linear(c, c.hidden_size, c.intermediate_size, b, dtype, param_dtype,
                                 rngs)
        self.up_proj = _linear(c, c.hidden_size, c.intermediate_size, b, dtype, param_dtype,
                               rngs)
        self.down_proj = _linear(c, c.intermediate_size, c.hidden_size, b, dtype, param_dtype,
                                 rngs)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, c: LlamaConfig, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = _rms_norm(c, dtype, param_dtype, rngs)
        self.self_attn = LlamaAttention(c, dtype, param_dtype, rngs)
        self.post_attention_layernorm = _rms_norm(c, dtype, param_dtype, rngs)
        self.mlp = LlamaMLP(c, dtype, param_dtype, rngs)

    def __call__(self, x, mask, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), mask, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def _run_layer(layer: LlamaDecoderLayer, x, mask, cos, sin):
    return layer(x, mask, cos, sin)


class LlamaModel(nnx.Module):
    """The decoder stack without the output head: returns the final normed hidden states."""

    def __init__(self, c: LlamaConfig, dtype, param_dtype, scan_layers: bool, remat: bool,
                 rngs: nnx.Rngs):
        self.config, self.scan_layers, self.remat = c, scan_layers, remat
        self.embed_tokens = nnx.Embed(
            c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(c.initializer_range), rngs=rngs)
        if scan_layers:
            @nnx.split_rngs(splits=c.num_hidden_layers)
            @nnx.vmap(in_axes=0, out_axes=0)
            def make(rngs):
                return LlamaDecoderLayer(c, dtype, param_dtype, rngs)

            self.layers = make(rngs)
        else:
            for i in range(c.num_hidden_layers):
                setattr(self, f"layers_{i}", LlamaDecoderLayer(c, dtype, param_dtype, rngs))
        self.norm = _rms_norm(c, dtype, param_dtype, rngs)

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        c = self.config
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        cos, sin = rotary_cos_sin(position_ids, c.head_dim, c.rope_theta)
        mask = causal_mask(input_ids.shape[-1], attention_mask)
        run = nnx.remat(_run_layer) if self.remat else _run_layer
        if self.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry, None, None, None), out_axes=nnx.Carry)
            def body(layer, x, mask, cos, sin):
                return run(layer, x, mask, cos, sin)

            x = body(self.layers, x, mask, cos, sin)
        else:
            for i in range(c.num_hidden_layers):
                x = run(getattr(self, f"layers_{i}"), x, mask, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nnx.Module):
    """Hugging Face's ``LlamaForCausalLM`` in NNX: next-token logits ``[batch, seq, vocab]``.

    The fields are those of :class:`lowrank.models.llama.LlamaForCausalLM` (attention dropout
    aside: this model runs deterministically). Its parameters (``lowrank.nnx.params``) have the
    linen model's paths and values given the same tree, the same outputs.

    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 7), jnp.int32)).shape
    (2, 7, 64)
    """

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, scan_layers: bool = False,
                 remat: bool = False, rngs: nnx.Rngs):
        c = self.config = config
        self.dtype, self.param_dtype = dtype, param_dtype
        self.scan_layers, self.remat = scan_layers, remat
        self.model = LlamaModel(c, dtype, param_dtype, scan_layers, remat, rngs)
        if not c.tie_word_embeddings:
            self.lm_head = _linear(c, c.hidden_size, c.vocab_size, False, dtype, param_dtype,
                                   rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> jax.Array:
        """``attention_mask``: 1 for real tokens, 0 for padding, ``[batch, seq]``."""
        x = self.model(input_ids, attention_mask, position_ids)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(x)
        return self.lm_head(x)


def from_linen(model: nn.Module) -> LlamaForCausalLM:
    """The NNX twin of a linen ``LlamaForCausalLM`` (same config and options), abstract
    (``nnx.eval_shape``: no weights allocated): run it with the linen model's params.

    >>> import lowrank
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=2, num_attention_heads=4)
    >>> twin = from_linen(linen_llama.LlamaForCausalLM(cfg, scan_layers=True))
    >>> lowrank.nnx.params(twin)["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape
    (2, 16, 32)
    """
    if not isinstance(model, linen_llama.LlamaForCausalLM):
        raise TypeError(f"from_linen takes a LlamaForCausalLM, got {type(model).__name__}")
    return nnx.eval_shape(lambda: LlamaForCausalLM(
        model.config, dtype=model.dtype, param_dtype=model.param_dtype,
        scan_layers=model.scan_layers, remat=model.remat, rngs=nnx.Rngs(0)))
