"""Causal linear attention with a feature map; decoding from a recurrent state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from attnlab import ops
from attnlab.models import layers
from attnlab.models.attention import base, registry

FEATURE_MAPS = {
  "identity": lambda x: x,
  "elu1": lambda x: jax.nn.elu(x) + 1.0,
  "relu": jax.nn.relu,
}


@registry.register("linear", uses_rope=False)
class LinearAttention(base.Mixer):
  """φ(q)·φ(k) attention (Katharopoulos et al., 2020); state [B,H,D,D]."""

  supports_segments = True  # packed documents: __call__(x, segment_ids)

  def __init__(self, model: ConfigDict, options: ConfigDict, *, use_rope: bool, rngs: nnx.Rngs):
    super().__init__(model, options, rngs=rngs)
    if options.feature_map not in FEATURE_MAPS:
      raise ValueError(
        f"linear attention: unknown feature_map {options.feature_map!r}; "
        f"choose from {sorted(FEATURE_MAPS)}"
      )
    self.qkv = base.QKVProjection(self, model, use_rope=use_rope, rngs=rngs)
    self.out = layers.dense(
      self.num_heads * self.head_dim,
      self.d_model,
      ("heads", "embed"),
      dtype=self.dtype,
      rngs=rngs,
    )
    self.feature_map = options.feature_map
    self.normalize = options.normalize
    self.chunk_size = options.chunk_size
    self.implementation = options.implementation

  def _features(self, x: jax.Array, positions: jax.Array):
    q, k, v = self.qkv(x, positions)
    group = self.num_heads // self.num_kv_heads
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    phi = FEATURE_MAPS[self.feature_map]
    return phi(q), phi(k), v

  def _attend(self, x, positions, state, segment_ids=None):
    b, t, _ = x.shape
    q, k, v = self._features(x, positions)
    o, state = ops.linear_attention(
      q,
      k,
      v,
      normalize=self.normalize,
      initial_state=state,
      output_final_state=True,
      chunk_size=self.chunk_size,
      segment_ids=segment_ids,
      implementation=self.implementation,
    )
    return self.out(o.reshape(b, t, -1)), state

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, T, d_model] -> [B, T, d_model]; segment_ids [B, T] int (packed) or None."""
    return self._attend(x, jnp.arange(x.shape[1]), None, segment_ids)[0]

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype):
    del max_len, dtype  # the state is O(1) in length and kept in float32
    kv = jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim), jnp.float32)
    if self.normalize:
      return (kv, jnp.zeros((batch, self.num_heads, self.head_dim), jnp.float32))
    return kv

  def step(self, x: jax.Array, cache, start: jax.Array):
    y, state = self._attend(x, start + jnp.arange(x.shape[1]), cache)
    return y, jax.tree.map(lambda s: s.astype(jnp.float32), state)
