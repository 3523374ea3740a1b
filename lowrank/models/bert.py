"""A BERT-family encoder whose parameter paths follow Hugging Face's ``BertModel`` names.

``embeddings/word_embeddings``, ``encoder/layer_{i}/attention/self/query``,
``attention/output/dense``, ``intermediate/dense``, ``output/dense``, ``pooler/dense``; with
``scan_layers=True`` the layers are one ``encoder/layer`` with a leading layer axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowrank.models.common import activation, dot_product_attention, layer_stack


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture fields of a Hugging Face BERT ``config.json`` (same names).

    >>> BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2,
    ...            num_attention_heads=4, intermediate_size=32).head_dim
    4
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        activation(self.hidden_act)  # fails early on an unknown activation

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class BertOutput(NamedTuple):
    last_hidden_state: jax.Array
    pooler_output: jax.Array | None


class _Module(nn.Module):
    """Fields every BERT submodule carries."""

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def dense(self, features: int, name: str) -> nn.Dense:
        init = nn.initializers.normal(self.config.initializer_range)
        return nn.Dense(
            features, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init, name=name
        )

    def layer_norm(self) -> nn.LayerNorm:
        # Two-pass variance, as torch computes it: the fast E[x^2]-E[x]^2 drifts by ~1e-4.
        return nn.LayerNorm(
            epsilon=self.config.layer_norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_fast_variance=False,
            name="LayerNorm",
        )

    def embed(self, num: int, name: str) -> nn.Embed:
        init = nn.initializers.normal(self.config.initializer_range)
        return nn.Embed(
            num, self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=init, name=name,
        )


class BertEmbeddings(_Module):
    deterministic: bool = True

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids):
        c = self.config
        x = (
            self.embed(c.vocab_size, "word_embeddings")(input_ids)
            + self.embed(c.max_position_embeddings, "position_embeddings")(position_ids)
            + self.embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        x = self.layer_norm()(x)
        return nn.Dropout(c.hidden_dropout_prob, deterministic=self.deterministic)(x)


class BertSelfAttention(_Module):
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        split = lambda y: y.reshape(*y.shape[:-1], c.num_attention_heads, c.head_dim)  # noqa: E731
        q = split(self.dense(c.hidden_size, "query")(x))
        k = split(self.dense(c.hidden_size, "key")(x))
        v = split(self.dense(c.hidden_size, "value")(x))
        # Dropout off: no mask of ones to build and multiply by.
        active = not self.deterministic and c.attention_probs_dropout_prob > 0
        drop = nn.Dropout(c.attention_probs_dropout_prob, deterministic=False) if active else None
        out = dot_product_attention(q, k, v, mask, dropout=drop)
        return out.reshape(*x.shape[:-1], c.hidden_size)


class BertResidualOutput(_Module):
    """dense -> dropout -> LayerNorm(x + residual): both ``attention/output`` and ``output``."""

    deterministic: bool = True

    @nn.compact
    def __call__(self, x, residual):
        x = self.dense(self.config.hidden_size, "dense")(x)
        x = nn.Dropout(self.config.hidden_dropout_prob, deterministic=self.deterministic)(x)
        return self.layer_norm()(x + residual)


class BertAttention(_Module):
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                  deterministic=self.deterministic)
        attended = BertSelfAttention(**kw, name="self")(x, mask)
        return BertResidualOutput(**kw, name="output")(attended, x)


class BertIntermediate(_Module):
    @nn.compact
    def __call__(self, x):
        x = self.dense(self.config.intermediate_size, "dense")(x)
        return activation(self.config.hidden_act)(x)


class BertLayer(_Module):
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        x = BertAttention(**kw, deterministic=self.deterministic, name="attention")(x, mask)
        h = BertIntermediate(**kw, name="intermediate")(x)
        x = BertResidualOutput(**kw, deterministic=self.deterministic, name="output")(h, x)
        return x, None


class BertEncoder(_Module):
    deterministic: bool = True
    scan_layers: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x, mask):
        layers = layer_stack(
            BertLayer, self.config.num_hidden_layers, name="layer", scan=self.scan_layers,
            remat=self.remat, config=self.config, dtype=self.dtype,
            param_dtype=self.param_dtype, deterministic=self.deterministic,
        )
        return layers(x, mask)


class BertPooler(_Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(self.dense(self.config.hidden_size, "dense")(x[:, 0]))


class BertModel(_Module):
    """Hugging Face's ``BertModel``: embeddings, post-LN encoder, optional pooler.

    Attributes:
      config: the architecture.
      dtype: compute dtype; param_dtype: storage dtype of the parameters.
      add_pooling_layer: include ``pooler/dense`` (tanh of a Dense on the first token).
      scan_layers: one ``nn.scan`` over the layers (stacked params ``encoder/layer/...``).
      remat: recompute each layer's activations in the backward pass.

    >>> cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...                  num_attention_heads=2, intermediate_size=16)
    >>> model = BertModel(cfg)
    >>> ids = jnp.ones((2, 5), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> model.apply({"params": params}, ids).last_hidden_state.shape
    (2, 5, 8)
    """

    add_pooling_layer: bool = True
    scan_layers: bool = False
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> BertOutput:
        """``attention_mask``: 1 for real tokens, 0 for padding, ``[batch, seq]``."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        x = BertEmbeddings(**kw, deterministic=deterministic, name="embeddings")(
            input_ids, token_type_ids, position_ids
        )
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, :]
        x = BertEncoder(
            **kw, deterministic=deterministic, scan_layers=self.scan_layers, remat=self.remat,
            name="encoder",
        )(x, mask)
        pooled = BertPooler(**kw, name="pooler")(x) if self.add_pooling_layer else None
        return BertOutput(x, pooled)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Mean over the real (unpadded) tokens: sentence-transformers' mean pooling.

    >>> h = jnp.array([[[1.0], [3.0], [100.0]]]); m = jnp.array([[1, 1, 0]])
    >>> mean_pool(h, m).tolist()
    [[2.0]]
    """
    if attention_mask is None:
        return hidden.mean(axis=1)
    m = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


POOLINGS = ("pooler", "mean")


class BertForSequenceClassification(_Module):
    """A classifier over BERT: pooled output (or mean of tokens) -> dropout -> ``classifier``.

    With ``pooling="pooler"`` this is Hugging Face's ``BertForSequenceClassification``;
    ``pooling="mean"`` averages the unpadded tokens, as sentence encoders such as MiniLM were
    trained to.

    >>> cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...                  num_attention_heads=2, intermediate_size=16)
    >>> model = BertForSequenceClassification(cfg, num_labels=5, pooling="mean")
    >>> ids = jnp.ones((2, 5), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> model.apply({"params": params}, ids).shape
    (2, 5)
    """

    num_labels: int = 2
    pooling: str = "pooler"
    scan_layers: bool = False
    remat: bool = False

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not supported; accepted: {POOLINGS}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        c = self.config
        out = BertModel(
            c, dtype=self.dtype, param_dtype=self.param_dtype,
            add_pooling_layer=self.pooling == "pooler", scan_layers=self.scan_layers,
            remat=self.remat, name="bert",
        )(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        if self.pooling == "pooler":
            pooled = out.pooler_output
        else:
            pooled = mean_pool(out.last_hidden_state, attention_mask)
        rate = c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout
        pooled = nn.Dropout(rate, deterministic=deterministic)(pooled)
        return self.dense(self.num_labels, "classifier")(pooled)
