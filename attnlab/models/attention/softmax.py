"""Causal softmax attention with GQA, optional qk-norm and RoPE, KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from attnlab import ops
from attnlab.models import layers
from attnlab.models.attention import base, registry


@registry.register("softmax", uses_rope=True)
class SoftmaxAttention(base.Mixer):
  """Multi-head causal softmax attention; the cache holds k and v.

  Variants that keep the projections and the KV cache override hooks:
  `project` (q, k, v and per-query logit scales, e.g. SSA), `values` /
  `cached_values` (what is attended to, e.g. LUCID) and `attend` /
  `attend_cached` (the attention map, e.g. softplus).
  """

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

  def project(self, x: jax.Array, positions: jax.Array):
    """x [B, T, d_model] at absolute positions [T] -> (q, k, v, logit_scale or None)."""
    q, k, v = self.qkv(x, positions)
    return q, k, v, None

  def values(self, k: jax.Array, v: jax.Array) -> jax.Array:
    """The values attended to, from k, v [B, T, Hkv, hd]."""
    del k
    return v

  def cached_values(self, k: jax.Array, v: jax.Array, cache: dict, start: jax.Array) -> jax.Array:
    """`values` for new tokens after `start` cached ones."""
    del cache, start
    return self.values(k, v)

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, logit_scale=None) -> jax.Array:
    """q [B,T,H,hd], k, v [B,T,Hkv,hd], logit_scale [B,T,H] or None -> [B,T,H,hd]."""
    return ops.softmax_attention(
      q, k, v, logit_scale=logit_scale, implementation=self.implementation
    )

  def attend_cached(self, q, k_cache, v_cache, length, logit_scale=None) -> jax.Array:
    return ops.softmax_attention_cached(
      q, k_cache, v_cache, length, logit_scale=logit_scale, implementation=self.implementation
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, d_model] -> [B, T, d_model]."""
    b, t, _ = x.shape
    q, k, v, logit_scale = self.project(x, jnp.arange(t))
    o = self.attend(q, k, self.values(k, v), logit_scale)
    return self.out(o.reshape(b, t, -1))

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict:
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def step(self, x: jax.Array, cache: dict, start: jax.Array) -> tuple[jax.Array, dict]:
    b, t, _ = x.shape
    q, k, v, logit_scale = self.project(x, start + jnp.arange(t))
    v = self.cached_values(k, v, cache, start)
    index = (0, start, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), index)
    v_cache = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), index)
    o = self.attend_cached(q, k_cache, v_cache, start + t, logit_scale)
    return self.out(o.reshape(b, t, -1)), {"k": k_cache, "v": v_cache}
