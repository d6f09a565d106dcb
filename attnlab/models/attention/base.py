"""The interface every attention mixer implements.

A mixer maps [batch, time, d_model] -> [batch, time, d_model] and offers:
  * `__call__(x)`: the parallel (training) form over a whole sequence;
  * `init_cache(batch, max_len, dtype)`: an empty decoding cache/state;
  * `step(x, cache, start, docs)`: consume `time` new tokens at absolute
    positions `start .. start+time-1` given the cache, returning outputs and
    the new cache. A prompt is prefilled with one `step`; decoding is `step`
    with time == 1. Caches are plain pytrees passed in and out explicitly;
    `docs` (`Documents`, kept by the trunk) says which document each cached
    and new token belongs to, so packed prompts decode as their documents
    would alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from ml_collections import ConfigDict

from attnlab.models import layers

Cache = Any


@struct.dataclass
class Documents:
  """Which document each token of a decoding step belongs to (packed prompts).

  The trunk numbers documents 0, 1, 2, ... along each row and keeps the
  numbers of every cached token; a mixer's `step` uses them so that a token
  sees only its own document, exactly as the parallel form with
  `segment_ids` does.

  Attributes:
    ids: [batch, max_len] int32 document numbers of the cache rows, the new
      tokens' (rows start .. start+time-1) included; later rows are unused.
      The cached ops take them as `segment_ids`.
    positions: [batch, time] int32 position of each new token within its
      document (RoPE, SSA's and softplus attention's position factors).
    chunk: [batch, time] int32 document numbers of the new tokens when the
      step was given `segment_ids` (a document may start inside it), or None:
      the new tokens then all continue the cached document.
    continues: [batch] bool, the first new token continues the cached
      document (a recurrent state carries over), or None with `chunk`.
  """

  ids: jax.Array
  positions: jax.Array
  chunk: jax.Array | None = None
  continues: jax.Array | None = None

  def carry(self, state: Any) -> Any:
    """A recurrent state (any pytree; None leaves stay None) kept only for the rows
    whose new tokens continue its document, zero for rows that start a new one."""
    if self.continues is None:
      return state

    def keep(leaf):
      mask = self.continues.reshape((-1,) + (1,) * (leaf.ndim - 1))
      return jnp.where(mask, leaf, jnp.zeros_like(leaf))

    return jax.tree.map(keep, state)


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

  def step(
    self, x: jax.Array, cache: Cache, start: jax.Array, docs: Documents
  ) -> tuple[jax.Array, Cache]:
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
