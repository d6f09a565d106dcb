"""Causal linear attention with a feature map; decoding from a recurrent state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from attnlab import ops
from attnlab.models import layers
from attnlab.models.attention import base, common_form, registry

FEATURE_MAPS = {
  "identity": lambda x: x,
  "elu1": lambda x: jax.nn.elu(x) + 1.0,
  "relu": jax.nn.relu,
}


def _forms(mixer: LinearAttention, x: jax.Array) -> common_form.Forms:
  """Normalised: see `common_form.normalized_linear_form`; unnormalised:
  λ_t = 1, b_t = φ(k_t), c_t = φ(q_t)/√D."""
  dt = common_form.analysis_dtype(x)
  q, k, v = mixer.features(x, jnp.arange(x.shape[1]))
  q, k, v = (common_form.heads_first(a, dt) for a in (q, k, v))
  if not mixer.normalize:
    scaled = q * q.shape[-1] ** -0.5
    return {"main": common_form.ScalarForm(jnp.zeros(q.shape[:3], dt), k, scaled, v)}
  # Non-negative feature maps keep η_t > 0.
  positive = mixer.feature_map in ("elu1", "relu")
  return {"main": common_form.normalized_linear_form(q, k, v, positive=positive)}


def _readout(mixer: LinearAttention, x: jax.Array, outputs: dict[str, jax.Array]) -> jax.Array:
  del x
  return mixer.output(common_form.time_first(outputs["main"]).astype(mixer.dtype))


@registry.register(
  "linear",
  uses_rope=False,
  analysis=common_form.Adapter(forms=_forms, readout=_readout, hooks=("features", "output")),
)
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

  def features(self, x: jax.Array, positions: jax.Array):
    """x [B, T, d_model] at absolute positions [T] -> φ(q), φ(k), v, each
    [B, T, H, hd] (after qk-norm and RoPE; kv heads repeated for GQA)."""
    q, k, v = self.qkv(x, positions)
    group = self.num_heads // self.num_kv_heads
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    phi = FEATURE_MAPS[self.feature_map]
    return phi(q), phi(k), v

  def output(self, o: jax.Array) -> jax.Array:
    """Attention output o [B, T, H, hd] -> [B, T, d_model] (output projection)."""
    b, t = o.shape[:2]
    return self.out(o.reshape(b, t, -1))

  def _attend(self, x, positions, state, segment_ids=None):
    q, k, v = self.features(x, positions)
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
    return self.output(o), state

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, T, d_model] -> [B, T, d_model]; segment_ids [B, T] int (packed) or None."""
    return self._attend(x, jnp.arange(x.shape[1]), None, segment_ids)[0]

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype):
    del max_len, dtype  # the state is O(1) in length and kept in float32
    kv = jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim), jnp.float32)
    if self.normalize:
      return (kv, jnp.zeros((batch, self.num_heads, self.head_dim), jnp.float32))
    return kv

  def step(self, x: jax.Array, cache, start: jax.Array, docs: base.Documents):
    del start  # positions come from docs (within each document)
    y, state = self._attend(x, docs.positions, docs.carry(cache), docs.chunk)
    return y, jax.tree.map(lambda s: s.astype(jnp.float32), state)
