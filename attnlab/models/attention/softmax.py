"""Causal softmax attention with GQA, optional qk-norm and RoPE, KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from attnlab import ops
from attnlab.models import layers
from attnlab.models.attention import base, registry


@registry.register("softmax", options=dict(implementation=None), uses_rope=True)
class SoftmaxAttention(base.Mixer):
  """Multi-head causal softmax attention; the cache holds k and v."""

  def __init__(self, model: ConfigDict, options: ConfigDict, *, use_rope: bool, rngs: nnx.Rngs):
    super().__init__(model, options, rngs=rngs)
    self.qkv = base.QKVProjection(self, model, use_rope=use_rope, rngs=rngs)
    self.out = layers.dense(
      self.num_heads * self.head_dim,
      self.d_model,
      ("heads", "embed"),
      dtype=self.dtype,
      rngs=rngs,
    )
    self.implementation = options.implementation

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, d_model] -> [B, T, d_model]."""
    b, t, _ = x.shape
    q, k, v = self.qkv(x, jnp.arange(t))
    o = ops.softmax_attention(q, k, v, implementation=self.implementation)
    return self.out(o.reshape(b, t, -1))

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict:
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def step(self, x: jax.Array, cache: dict, start: jax.Array) -> tuple[jax.Array, dict]:
    b, t, _ = x.shape
    q, k, v = self.qkv(x, start + jnp.arange(t))
    index = (0, start, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), index)
    v_cache = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), index)
    o = ops.softmax_attention_cached(
      q, k_cache, v_cache, start + t, implementation=self.implementation
    )
    return self.out(o.reshape(b, t, -1)), {"k": k_cache, "v": v_cache}
