"""Chunked causal linear attention in plain XLA.

Within a chunk of C steps the causal product is a masked C×C matmul; across
chunks an exclusive prefix sum of per-chunk Kᵀ V carries the state. Memory is
O(T·C + (T/C)·D·Dv); T×T is never formed.

Packed rows (`segment_ids`): the C×C product is masked to pairs within one
document, tokens after a document start inside a chunk do not read the
carried state, and the carry becomes the affine recurrence
S_{n+1} = keep_n · S_n + (Kᵀ V of chunk n's last document), keep_n = 0 when a
document starts in chunk n, evaluated by an associative scan over chunks.
Matmuls run at Precision.HIGHEST (operands are ≥ float32 here).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnlab.ops import _delta_chunks, _dtypes, _linalg


def _split_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[B, T, H, D] (T a multiple of chunk) -> [B, N, C, H, D]."""
  b, t, h, d = x.shape
  return x.reshape(b, t // chunk, chunk, h, d)


def _carried(x0: jax.Array, keep: jax.Array | None, per_chunk: jax.Array):
  """States before each chunk and after the last: x0 [B, ...], per_chunk [B, N, ...]."""
  if keep is None:
    after = x0[:, None] + jnp.cumsum(per_chunk, axis=1)
  else:
    keep = keep.reshape(keep.shape + (1,) * (per_chunk.ndim - 2)).astype(per_chunk.dtype)

    def compose(first, second):  # x ↦ a2 (a1 x + b1) + b2
      (a1, b1), (a2, b2) = first, second
      return a1 * a2, a2 * b1 + b2

    gain, offset = jax.lax.associative_scan(compose, (keep, per_chunk), axis=1)
    after = gain * x0[:, None] + offset
  before = jnp.concatenate([x0[:, None], after[:, :-1]], axis=1)
  return before, after[:, -1]


def linear_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  normalize: bool = False,
  scale: float | None = None,
  initial_state=None,
  output_final_state: bool = False,
  chunk_size: int = 64,
  segment_ids: jax.Array | None = None,
):
  dtype = _dtypes.compute_dtype(q, k, v)
  out_dtype = q.dtype
  einsum = functools.partial(jnp.einsum, precision=_linalg.matmul_precision(dtype))
  b, t, h, d = q.shape
  dv = v.shape[-1]
  scale = _dtypes.default_scale(d, scale)
  chunk = max(1, min(chunk_size, t))
  pad = -t % chunk
  # Zero padding at the end is harmless: padded keys/values add nothing.
  q, k, v = (jnp.pad(a.astype(dtype), ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
  qc, kc, vc = (_split_chunks(a, chunk) for a in (q, k, v))

  if initial_state is None:
    kv0 = jnp.zeros((b, h, d, dv), dtype)
    z0 = jnp.zeros((b, h, d), dtype)
  elif normalize:
    kv0, z0 = (s.astype(dtype) for s in initial_state)
  else:
    kv0, z0 = initial_state.astype(dtype), jnp.zeros((b, h, d), dtype)

  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  keep = None
  kc_write = kc
  if segment_ids is not None:
    same, fresh, last, keep = _delta_chunks.segment_masks(segment_ids, t + pad, chunk)
    causal = causal & same[:, :, None]  # [B,N,1,C,C]
    qc_read = qc * fresh[..., None, None]
    kc_write = kc * last[..., None, None]  # only the last document leaves the chunk
  else:
    qc_read = qc
  scores = einsum("bnqhd,bnshd->bnhqs", qc, kc)
  scores = jnp.where(causal, scores, 0.0)
  intra = einsum("bnhqs,bnshe->bnqhe", scores, vc)

  chunk_kv = einsum("bnshd,bnshe->bnhde", kc_write, vc)  # [B, N, H, D, Dv]
  kv_before, kv_final = _carried(kv0, keep, chunk_kv)
  inter = einsum("bnqhd,bnhde->bnqhe", qc_read, kv_before)
  numerator = intra + inter

  z_final = None
  if normalize or output_final_state:
    chunk_z = kc_write.sum(axis=2)  # [B, N, H, D]
    z_before, z_final = _carried(z0, keep, chunk_z)
  if normalize:
    denominator = scores.sum(axis=-1).transpose(0, 1, 3, 2) + einsum(
      "bnqhd,bnhd->bnqh", qc_read, z_before
    )
    # Padded rows have a zero denominator; keep them finite so their (unused)
    # gradients do not turn into NaN.
    valid = (jnp.arange(t + pad) < t).reshape(1, -1, chunk, 1)
    out = numerator / jnp.where(valid, denominator, 1.0)[..., None]
  else:
    out = scale * numerator
  o = out.reshape(b, t + pad, h, dv)[:, :t].astype(out_dtype)

  final = None
  if output_final_state:
    final = (kv_final, z_final) if normalize else kv_final
  return o, final
