"""The interface every attention mixer implements.

A mixer maps [batch, time, d_model] -> [batch, time, d_model] and offers:
  * `__call__(x)`: the parallel (training) form over a whole sequence;
  * `init_cache(batch, max_len, dtype)`: an empty decoding cache/state;
  * `step(x, cache, start)`: consume `time` new tokens at absolute positions
    `start .. start+time-1` given the cache, returning outputs and the new
    cache. A prompt is prefilled with one `step`; decoding is `step` with
    time == 1. Caches are plain pytrees passed in and out explicitly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from attnlab.models import layers

Cache = Any


class Mixer(nnx.Module):
  """Base class: holds the trunk's head geometry; subclasses add projections."""

  def __init__(self, model: ConfigDict, options: ConfigDict, *, rngs: nnx.Rngs):
    self.d_model = model.d_model
    self.num_heads = model.num_heads
    self.num_kv_heads = model.num_kv_heads or model.num_heads
    self.head_dim = model.head_dim or model.d_model // model.num_heads
    self.dtype = jnp.dtype(model.dtype)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )

  def __call__(self, x: jax.Array) -> jax.Array:
    raise NotImplementedError

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> Cache:
    raise NotImplementedError

  def step(self, x: jax.Array, cache: Cache, start: jax.Array) -> tuple[jax.Array, Cache]:
    raise NotImplementedError


class QKVProjection(nnx.Module):
  """q/k/v projections with optional per-head qk RMSNorm and RoPE.

  Shared by the mixers whose inputs are plain projected heads.
  """

  def __init__(self, mixer: Mixer, model: ConfigDict, *, use_rope: bool, rngs: nnx.Rngs):
    d, h, hkv, hd = mixer.d_model, mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    dt = mixer.dtype
    bias = model.qkv_bias
    self.q = layers.dense(d, h * hd, ("embed", "heads"), dtype=dt, rngs=rngs, use_bias=bias)
    self.k = layers.dense(d, hkv * hd, ("embed", "kv_heads"), dtype=dt, rngs=rngs, use_bias=bias)
    self.v = layers.dense(d, hkv * hd, ("embed", "kv_heads"), dtype=dt, rngs=rngs, use_bias=bias)
    self.q_norm = layers.RMSNorm(hd, eps=model.norm_eps) if model.qk_norm else None
    self.k_norm = layers.RMSNorm(hd, eps=model.norm_eps) if model.qk_norm else None
    self.use_rope = use_rope
    self.rope_theta = model.rope_theta
    self.rope_fraction = model.rope_fraction
    self.rope_scaling = layers.rope_scaling(model)
    self.shape = (h, hkv, hd)

  def project(self, x: jax.Array):
    """x [B, T, d_model] -> raw q [B,T,H,hd], k, v [B,T,Hkv,hd] (no norm, no RoPE)."""
    b, t, _ = x.shape
    h, hkv, hd = self.shape
    return (
      self.q(x).reshape(b, t, h, hd),
      self.k(x).reshape(b, t, hkv, hd),
      self.v(x).reshape(b, t, hkv, hd),
    )

  def position(self, q: jax.Array, k: jax.Array, positions: jax.Array):
    """qk-norm and RoPE at absolute `positions` [T]."""
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.use_rope:
      q = layers.apply_rope(q, positions, self.rope_theta, self.rope_fraction, self.rope_scaling)
      k = layers.apply_rope(k, positions, self.rope_theta, self.rope_fraction, self.rope_scaling)
    return q, k

  def __call__(self, x: jax.Array, positions: jax.Array):
    """x [B, T, d_model], positions [T] -> q [B,T,H,hd], k, v [B,T,Hkv,hd]."""
    q, k, v = self.project(x)
    q, k = self.position(q, k, positions)
    return q, k, v
