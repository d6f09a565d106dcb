"""Causal softmax attention in plain XLA: dense masked logits, fp32 softmax."""

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
) -> jax.Array:
  """See `attnlab.ops.softmax_attention_cached`."""
  dtype = _dtypes.compute_dtype(q, k, v)
  b, tq, h, d = q.shape
  hkv = k.shape[2]
  group = h // hkv
  scale = _dtypes.default_scale(d, scale)
  # Group query heads by their kv head so k/v are never repeated in memory.
  qg = q.reshape(b, tq, hkv, group, d).astype(dtype)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(dtype)) * scale
  if logit_scale is not None:
    ls = logit_scale.reshape(b, tq, hkv, group).astype(dtype)
    logits = logits * jnp.transpose(ls, (0, 2, 3, 1))[..., None]
  q_pos = cache_length - tq + jnp.arange(tq)
  mask = jnp.arange(k.shape[1])[None, :] <= q_pos[:, None]  # [Tq, S]
  logits = jnp.where(mask, logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgqs,bske->bqkge", weights, v.astype(dtype))
  return out.reshape(b, tq, h, v.shape[-1]).astype(q.dtype)


def softmax_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float | None = None,
  logit_scale: jax.Array | None = None,
) -> jax.Array:
  return softmax_attention_cached(q, k, v, q.shape[1], scale=scale, logit_scale=logit_scale)
