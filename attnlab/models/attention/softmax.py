"""Causal softmax attention with GQA, optional qk-norm and RoPE, KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from attnlab import ops
from attnlab.models import layers
from attnlab.models.attention import base, common_form, registry


def kernel_form(mixer: SoftmaxAttention, x: jax.Array) -> common_form.KernelForm:
  """A softmax-family layer on x [B, T, d_model] as a softmax `KernelForm`,
  read from the mixer's own `project` and `values` hooks (so SSA's
  temperatures and LUCID's values come along)."""
  dt = common_form.analysis_dtype(x)
  b, t, _ = x.shape
  q, k, v, logit_scale = mixer.project(x, jnp.arange(t))
  group = q.shape[2] // k.shape[2]
  repeat = lambda a: jnp.repeat(a, group, axis=2)
  scale = jnp.full(q.shape[:3], q.shape[-1] ** -0.5, dt)
  if logit_scale is not None:
    scale = scale * logit_scale.astype(dt)
  value_map = None
  if type(mixer).values is not SoftmaxAttention.values:
    # The values are a linear map of v (LUCID: L⁻¹ v); read it off the
    # mixer's own `values` applied to the identity.
    eye = jnp.broadcast_to(jnp.eye(t, dtype=v.dtype)[None, :, None], (b, t, k.shape[2], t))
    value_map = common_form.heads_first(repeat(mixer.values(k, eye)), dt)
  return common_form.KernelForm(
    q=common_form.heads_first(q, dt),
    k=common_form.heads_first(repeat(k), dt),
    scale=jnp.swapaxes(scale, 1, 2),
    u=common_form.heads_first(repeat(mixer.values(k, v)), dt),
    value_map=value_map,
  )


def output_readout(
  mixer: SoftmaxAttention, x: jax.Array, outputs: dict[str, jax.Array]
) -> jax.Array:
  """The kernel form's output {'main': [B, H, T, hd]} through the output projection."""
  del x
  return mixer.output(common_form.time_first(outputs["main"]).astype(mixer.dtype))


# Shared by the variants that keep softmax attention's map (SSA, LUCID).
ANALYSIS = common_form.Adapter(
  forms=lambda mixer, x: {"main": kernel_form(mixer, x)},
  readout=output_readout,
  hooks=("project", "values", "output"),
)


@registry.register("softmax", uses_rope=True, analysis=ANALYSIS)
class SoftmaxAttention(base.Mixer):
  """Multi-head causal softmax attention; the cache holds k and v.

  Variants that keep the projections and the KV cache override hooks:
  `project` (q, k, v and per-query logit scales, e.g. SSA), `values` /
  `cached_values` (what is attended to, e.g. LUCID) and `attend` /
  `attend_cached` (the attention map, e.g. softplus). The analysis reads the
  layer through `project`, `values` and `output` (`kernel_form`).
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
    """x [B, T, d_model] at positions [T] or [B, T] -> (q, k, v, logit_scale or None)."""
    q, k, v = self.qkv(x, positions)
    return q, k, v, None

  def values(self, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """The values attended to, from k, v [B, T, Hkv, hd] (segment_ids [B, T]: packed rows)."""
    del k, segment_ids
    return v

  def cached_values(
    self, k: jax.Array, v: jax.Array, cache: dict, start: jax.Array, segment_ids: jax.Array
  ) -> jax.Array:
    """`values` for new tokens after `start` cached ones; segment_ids [B, max_len]
    name the documents of the cache rows, the new tokens' included."""
    del cache, start, segment_ids
    return self.values(k, v)

  def attend(
    self, q: jax.Array, k: jax.Array, v: jax.Array, logit_scale=None, segment_ids=None
  ) -> jax.Array:
    """q [B,T,H,hd], k, v [B,T,Hkv,hd], logit_scale [B,T,H] or None -> [B,T,H,hd];
    segment_ids [B, T] int keep packed documents apart."""
    return ops.softmax_attention(
      q, k, v, logit_scale=logit_scale, segment_ids=segment_ids,
      implementation=self.implementation,
    )  # fmt: skip

  def attend_cached(
    self, q, k_cache, v_cache, length, logit_scale=None, segment_ids=None
  ) -> jax.Array:
    """q [B,t,H,hd] after length − t cached tokens, over the cache [B,max_len,Hkv,hd];
    segment_ids [B, max_len] name the cache rows' documents."""
    return ops.softmax_attention_cached(
      q, k_cache, v_cache, length, logit_scale=logit_scale, segment_ids=segment_ids,
      implementation=self.implementation,
    )  # fmt: skip

  def output(self, o: jax.Array) -> jax.Array:
    """Attention output o [B, T, H, hd] -> [B, T, d_model] (output projection)."""
    b, t = o.shape[:2]
    return self.out(o.reshape(b, t, -1))

  supports_segments = True  # packed documents: __call__(x, segment_ids)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, T, d_model] -> [B, T, d_model]; segment_ids [B, T] int (packed
    documents: positions restart and attention stays within each one) or None."""
    if segment_ids is None:
      positions = jnp.arange(x.shape[1])
    else:
      positions = ops.segment_positions(segment_ids)  # [B, T]
    q, k, v, logit_scale = self.project(x, positions)
    values = self.values(k, v, segment_ids)
    return self.output(self.attend(q, k, values, logit_scale, segment_ids))

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict:
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def step(
    self, x: jax.Array, cache: dict, start: jax.Array, docs: base.Documents
  ) -> tuple[jax.Array, dict]:
    t = x.shape[1]
    q, k, v, logit_scale = self.project(x, docs.positions)
    v = self.cached_values(k, v, cache, start, docs.ids)
    index = (0, start, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), index)
    v_cache = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), index)
    o = self.attend_cached(q, k_cache, v_cache, start + t, logit_scale, docs.ids)
    return self.output(o), {"k": k_cache, "v": v_cache}
