"""Oracle for causal softmax attention: one query at a time, no tricks.

Slow by design; it is the independent reference the fast paths are tested
against (run it in float64 for gradient checks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _dtypes


def softmax_attention_cached(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  cache_length: jax.Array | int,
  *,
  scale: float | None = None,
  logit_scale: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """Queries at positions `cache_length - Tq .. cache_length - 1` over a cache.

  Args:
    q: [batch, q_time, heads, head_dim]
    k, v: [batch, kv_time, kv_heads, head_dim]; rows >= cache_length ignored.
    cache_length: number of valid cache rows (queries are the last Tq).
    logit_scale: optional [batch, q_time, heads], multiplies each query's logits.
    segment_ids: optional [batch, kv_time] document ids of the cache rows (the
      queries are its last Tq rows); a query sees only keys with its own id.

  Returns:
    [batch, q_time, heads, head_dim_v] in q.dtype.
  """
  dtype = _dtypes.compute_dtype(q, k, v)
  _, tq, h, d = q.shape
  group = h // k.shape[2]
  scale = _dtypes.default_scale(d, scale)
  kv_pos = jnp.arange(k.shape[1])
  outputs = []
  for t in range(tq):
    position = cache_length - tq + t
    heads = []
    for head in range(h):
      qt = q[:, t, head].astype(dtype)  # [B, D]
      kh = k[:, :, head // group].astype(dtype)  # [B, S, D]
      vh = v[:, :, head // group].astype(dtype)  # [B, S, Dv]
      logits = jnp.einsum("bd,bsd->bs", qt, kh) * scale
      if logit_scale is not None:
        logits = logits * logit_scale[:, t, head, None].astype(dtype)
      visible = kv_pos[None] <= position
      if segment_ids is not None:
        visible = visible & (segment_ids == segment_ids[:, position, None])
      logits = jnp.where(visible, logits, -jnp.inf)
      weights = jax.nn.softmax(logits, axis=-1)
      heads.append(jnp.einsum("bs,bse->be", weights, vh))
    outputs.append(jnp.stack(heads, axis=1))
  return jnp.stack(outputs, axis=1).astype(q.dtype)


def softmax_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float | None = None,
  logit_scale: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """Causal attention over one sequence: [B,T,H,D] x [B,T,Hkv,D] -> [B,T,H,Dv]."""
  return softmax_attention_cached(
    q, k, v, q.shape[1], scale=scale, logit_scale=logit_scale, segment_ids=segment_ids
  )
