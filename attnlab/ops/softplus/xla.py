"""Softplus attention (LSSA / LSSAR) with dense [Tq, Tk] scores in plain XLA.

Cost choices, each measured (`python -m benchmarks.xla_paths`): the per-query
factor log D · log i multiplies q̂ (O(T·D)) instead of the scores; per-row
normalisers are reciprocals applied with one multiply; and the full causal op
runs query chunks against their key prefixes (`attnlab.ops._causal_chunks`),
exact because every row is normalised over its own visible keys.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnlab.ops import _causal_chunks, _segments
from attnlab.ops import _softplus_semantics as semantics


def _weights(logits: jax.Array, visible: jax.Array, i: jax.Array, power):
  """Attention weights from logits log D · log i · q̂·k̂ [..., Tq, Tk]; i [Tq, 1] 1-based.

  Returns (unnormalised weights [..., Tq, Tk], row normaliser [..., Tq, 1]): the
  callers apply the normaliser to the [Tq, Dv] output, not to the [Tq, Tk]
  weights (one elementwise pass over the scores fewer).
  """
  a = jnp.where(visible, jax.nn.softplus(logits), 0.0)
  inverse_sum = semantics.safe_reciprocal(a.sum(-1, keepdims=True))
  if power is None:
    return a, inverse_sum
  # The offset carries the rounding slack and is > 0, so hidden keys (a = 0)
  # stay 0 through the ReLU.
  offset = semantics.lssar_offset(i, logits.dtype)
  sharpen = lambda y: jax.nn.relu(y * (inverse_sum * i) - offset)  # noqa: E731
  # The op is scale-invariant per row: dividing by the row max before the power
  # keeps x^p representable (0.3^15 ≈ 1e-8 would drown in any eps). `sharpen` is
  # monotone, so the row max of x is sharpen(max a), bit for bit, and max a
  # shares its pass over the scores with a's sum.
  row_max = jax.lax.stop_gradient(sharpen(a.max(-1, keepdims=True)))
  b = (sharpen(a) * semantics.safe_reciprocal(row_max)) ** power
  return b, semantics.safe_reciprocal(b.sum(-1, keepdims=True))


def row_weights(scores: jax.Array, visible: jax.Array, rows: jax.Array, power, head_dim: int):
  """Attention weights from cosine scores.

  Args:
    scores: [..., Tq, Tk] q̂·k̂ in [-1, 1]. visible: [Tq, Tk] bool.
    rows: [Tq] 1-based absolute query positions i (= visible keys in a causal row).
  """
  i = rows.astype(scores.dtype)[:, None]
  weights, normaliser = _weights(math.log(head_dim) * jnp.log(i) * scores, visible, i, power)
  return weights * normaliser


def _normalize(x):
  return x * semantics.inverse_norm(x)


def _attend(qs, k_hat, v, visible, i, power):
  """qs [B,H,Tq,D] (q̂ · log D · log i), k̂ [B,H,S,D], v [B,H,S,Dv] -> [B,H,Tq,Dv]."""
  w, normaliser = _weights(jnp.einsum("bhtd,bhsd->bhts", qs, k_hat), visible, i, power)
  return jnp.einsum("bhts,bhse->bhte", w, v) * normaliser


def softplus_attention(q, k, v, *, power, query_positions, key_length, segment_ids=None):
  """q [B,Tq,H,D]; k, v [B,Tk,H,*] (heads already repeated) -> [B,Tq,H,Dv].

  The queries sit at absolute 0-based positions `query_positions` [Tq] =
  key_length − Tq + arange(Tq) (as both public ops pass them); keys
  0..key_length−1 are valid. A static `key_length` equal to Tq = Tk is thus
  the full causal op (queries at 0..T−1), which runs in query chunks; only it
  takes `segment_ids` [B, T] (packed documents: the row index i restarts at
  each document, and documents do not see each other); against a cache,
  `segment_ids` [B, Tk] name the cache rows' documents.
  """
  tq, tk, d = q.shape[1], k.shape[1], q.shape[-1]
  first = query_positions[0]
  if segment_ids is None:
    rows = (query_positions + 1).astype(q.dtype)[:, None]  # [Tq, 1]
    docs = None
  else:  # per-row positions within the document: [B, 1, Tq, 1]
    within = jax.lax.dynamic_slice_in_dim(_segments.positions(segment_ids), first, tq, axis=1)
    rows = (within + 1).astype(q.dtype)[:, None, :, None]
    docs = _segments.document_index(segment_ids)
  qs = jnp.swapaxes(_normalize(q), 1, 2) * (math.log(d) * jnp.log(rows))
  k_hat, vh = jnp.swapaxes(_normalize(k), 1, 2), jnp.swapaxes(v, 1, 2)
  if isinstance(key_length, int) and key_length == tq == tk:
    outs = []
    for start, end in _causal_chunks.query_chunks(tq):
      visible = (start + jnp.arange(end - start))[:, None] >= jnp.arange(end)[None, :]
      if docs is not None:
        same = _segments.same_document(docs[:, start:end], docs[:, :end])
        visible = (visible & same)[:, None]
      outs.append(
        _attend(qs[:, :, start:end], k_hat[:, :, :end], vh[:, :, :end], visible,
                rows[..., start:end, :], power)
      )  # fmt: skip
    return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)
  key_pos = jnp.arange(tk)
  visible = (key_pos[None, :] <= query_positions[:, None]) & (key_pos[None, :] < key_length)
  if segment_ids is not None:
    visible = _segments.visible_in_cache(visible, segment_ids, first, tq)[:, None]
  return jnp.swapaxes(_attend(qs, k_hat, vh, visible, rows, power), 1, 2)
