"""Causal softmax attention in plain XLA: dense masked logits, softmax in the compute dtype.

Layout and cost choices, each measured (`python -m benchmarks.xla_paths`):

* Query heads are grouped by their kv head, [B, Hkv, G, T, D], so k and v are
  never repeated and every logit block is one batched matmul.
* `scale` and the per-query `logit_scale` multiply q (O(T·D)) instead of the
  [T, S] logits: (q·s)·k = s·(q·k) for a per-query s.
* The full causal op runs query chunks against their key prefixes
  (`attnlab.ops._causal_chunks`): each chunk is an exact softmax over a
  shorter key range, which skips most of the masked upper triangle, in the
  logits, exp and matmuls and in the probabilities autodiff keeps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _causal_chunks, _dtypes, _segments


def _grouped(q, k, v, scale, logit_scale, dtype):
  """q [B,T,H,D] -> [B,Hkv,G,T,D] pre-scaled; k, v [B,S,Hkv,*] -> [B,Hkv,S,*]."""
  b, t, h, d = q.shape
  hkv = k.shape[2]
  q = q.astype(dtype) * jnp.asarray(scale, dtype)
  if logit_scale is not None:
    q = q * logit_scale.astype(dtype)[..., None]
  qg = jnp.transpose(q.reshape(b, t, hkv, h // hkv, d), (0, 2, 3, 1, 4))
  return qg, jnp.swapaxes(k.astype(dtype), 1, 2), jnp.swapaxes(v.astype(dtype), 1, 2)


def _attend(qg, kg, vg, visible):
  """Softmax attention of grouped queries [B,Hkv,G,Tq,D] over [B,Hkv,S,*]; visible
  [Tq,S] or [B,1,1,Tq,S] (packed documents)."""
  logits = jnp.einsum("bkgtd,bksd->bkgts", qg, kg)
  weights = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
  return jnp.einsum("bkgts,bkse->bkgte", weights, vg)


def _ungrouped(out, dtype):
  """[B,Hkv,G,T,Dv] -> [B,T,H,Dv]."""
  b, hkv, g, t, dv = out.shape
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, hkv * g, dv).astype(dtype)


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
  """See `attnlab.ops.softmax_attention_cached`."""
  dtype = _dtypes.compute_dtype(q, k, v)
  tq = q.shape[1]
  qg, kg, vg = _grouped(q, k, v, _dtypes.default_scale(q.shape[-1], scale), logit_scale, dtype)
  q_pos = cache_length - tq + jnp.arange(tq)
  visible = jnp.arange(k.shape[1])[None, :] <= q_pos[:, None]  # [Tq, S]
  if segment_ids is not None:
    visible = _segments.visible_in_cache(visible, segment_ids, cache_length - tq, tq)[:, None, None]
  return _ungrouped(_attend(qg, kg, vg, visible), q.dtype)


def softmax_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float | None = None,
  logit_scale: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """See `attnlab.ops.softmax_attention`: q [B,T,H,D], k/v [B,T,Hkv,*] -> [B,T,H,Dv]."""
  dtype = _dtypes.compute_dtype(q, k, v)
  qg, kg, vg = _grouped(q, k, v, _dtypes.default_scale(q.shape[-1], scale), logit_scale, dtype)
  docs = None if segment_ids is None else _segments.document_index(segment_ids)
  outs = []
  for start, end in _causal_chunks.query_chunks(q.shape[1]):
    visible = (start + jnp.arange(end - start))[:, None] >= jnp.arange(end)[None, :]
    if docs is not None:
      same = _segments.same_document(docs[:, start:end], docs[:, :end])
      visible = (visible & same)[:, None, None]
    outs.append(
      _attend(qg[:, :, :, start:end], kg[:, :, :end], vg[:, :, :end], visible)
    )  # fmt: skip
  return _ungrouped(jnp.concatenate(outs, axis=3), q.dtype)
