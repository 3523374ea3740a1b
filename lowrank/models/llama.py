"""A Llama-style decoder whose parameter paths follow Hugging Face's ``LlamaForCausalLM``.

``model/embed_tokens``, ``model/layers_{i}/self_attn/q_proj``, ``mlp/gate_proj``,
``input_layernorm``, ``model/norm``, ``lm_head``; with ``scan_layers=True`` the layers are one
``model/layers`` with a leading layer axis. RMSNorm, rotary position embeddings, SwiGLU,
grouped-query attention, tied or untied output embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowrank.models.common import activation, dot_product_attention, layer_stack


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture fields of a Hugging Face Llama ``config.json`` (same names).

    ``num_key_value_heads`` defaults to ``num_attention_heads`` (no grouping) and ``head_dim`` to
    ``hidden_size // num_attention_heads``.

    >>> LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...             num_attention_heads=4, num_key_value_heads=2).head_dim
    4
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self):
        set_ = object.__setattr__
        if self.num_key_value_heads is None:
            set_(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        activation(self.hidden_act)


def rotary_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, ...]:
    """``cos, sin`` of shape ``[*positions.shape, head_dim]`` in Hugging Face's half-split layout.

    >>> cos, sin = rotary_cos_sin(jnp.arange(3)[None], 8, 10000.0)
    >>> cos.shape, float(cos[0, 0, 0]), float(sin[0, 0, 0])
    ((1, 3, 8), 1.0, 0.0)
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [batch, seq, heads, head_dim]`` by the angles of ``cos, sin [batch, seq, hd]``.

    >>> x = jnp.ones((1, 2, 1, 4)); cos, sin = rotary_cos_sin(jnp.zeros((1, 2)), 4, 1e4)
    >>> bool((apply_rotary(x, cos, sin) == x).all())
    True
    """
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class _Module(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def dense(self, features: int, name: str, use_bias: bool = False) -> nn.Dense:
        return nn.Dense(
            features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(self.config.initializer_range), name=name,
        )

    def rms_norm(self, name: str) -> nn.RMSNorm:
        return nn.RMSNorm(
            epsilon=self.config.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
            name=name,
        )


class LlamaAttention(_Module):
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        c = self.config
        bias = c.attention_bias

        def project(features, name, heads):
            y = self.dense(features, name, bias)(x)
            return y.reshape(*x.shape[:-1], heads, c.head_dim)

        q = project(c.num_attention_heads * c.head_dim, "q_proj", c.num_attention_heads)
        k = project(c.num_key_value_heads * c.head_dim, "k_proj", c.num_key_value_heads)
        v = project(c.num_key_value_heads * c.head_dim, "v_proj", c.num_key_value_heads)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Dropout off: no mask of ones to build and multiply by.
        active = not self.deterministic and c.attention_dropout > 0
        drop = nn.Dropout(c.attention_dropout, deterministic=False) if active else None
        out = dot_product_attention(q, k, v, mask, dropout=drop)
        out = out.reshape(*x.shape[:-1], c.num_attention_heads * c.head_dim)
        return self.dense(c.hidden_size, "o_proj", bias)(out)


class LlamaMLP(_Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = activation(c.hidden_act)(self.dense(c.intermediate_size, "gate_proj", c.mlp_bias)(x))
        up = self.dense(c.intermediate_size, "up_proj", c.mlp_bias)(x)
        return self.dense(c.hidden_size, "down_proj", c.mlp_bias)(gate * up)


class LlamaDecoderLayer(_Module):
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        h = self.rms_norm("input_layernorm")(x)
        x = x + LlamaAttention(**kw, deterministic=self.deterministic, name="self_attn")(
            h, mask, cos, sin
        )
        h = self.rms_norm("post_attention_layernorm")(x)
        return x + LlamaMLP(**kw, name="mlp")(h), None


def causal_mask(seq_len: int, attention_mask: jax.Array | None = None) -> jax.Array:
    """Boolean ``[batch or 1, seq, seq]``: query i sees keys j <= i that are not padding.

    >>> causal_mask(3).astype(int).tolist()
    [[[1, 0, 0], [1, 1, 0], [1, 1, 1]]]
    """
    mask = jnp.tril(jnp.ones((seq_len, seq_len), bool))[None]
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, :]
    return mask


class LlamaModel(_Module):
    """The decoder stack without the output head: returns the final normed hidden states."""

    scan_layers: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic=True):
        c = self.config
        embed = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(c.initializer_range), name="embed_tokens",
        )
        x = embed(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        cos, sin = rotary_cos_sin(position_ids, c.head_dim, c.rope_theta)
        mask = causal_mask(input_ids.shape[-1], attention_mask)
        layers = layer_stack(
            LlamaDecoderLayer, c.num_hidden_layers, name="layers", scan=self.scan_layers,
            remat=self.remat, config=c, dtype=self.dtype, param_dtype=self.param_dtype,
            deterministic=deterministic,
        )
        x = layers(x, mask, cos, sin)
        return self.rms_norm("norm")(x), embed


class LlamaForCausalLM(_Module):
    """Hugging Face's ``LlamaForCausalLM``: returns next-token logits ``[batch, seq, vocab]``.

    Attributes:
      config: the architecture (``tie_word_embeddings`` reuses ``model/embed_tokens`` as the
        output projection, so there is no ``lm_head`` parameter).
      dtype: compute dtype; param_dtype: storage dtype of the parameters.
      scan_layers: one ``nn.scan`` over the layers (stacked params ``model/layers/...``).
      remat: recompute each layer's activations in the backward pass.

    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> ids = jnp.ones((2, 7), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> model.apply({"params": params}, ids).shape
    (2, 7, 64)
    """

    scan_layers: bool = False
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """``attention_mask``: 1 for real tokens, 0 for padding, ``[batch, seq]``."""
        c = self.config
        x, embed = LlamaModel(
            c, dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers,
            remat=self.remat, name="model",
        )(input_ids, attention_mask, position_ids, deterministic)
        if c.tie_word_embeddings:
            return embed.attend(x)
        return self.dense(c.vocab_size, "lm_head")(x)
