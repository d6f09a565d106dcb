"""Chunked causal linear attention in plain XLA.

Within a chunk of C steps the causal product is a masked C×C matmul; across
chunks an exclusive prefix sum of per-chunk Kᵀ V carries the state. Memory is
O(T·C + (T/C)·D·Dv); T×T is never formed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _dtypes


def _split_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[B, T, H, D] (T a multiple of chunk) -> [B, N, C, H, D]."""
  b, t, h, d = x.shape
  return x.reshape(b, t // chunk, chunk, h, d)


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
):
  dtype = _dtypes.compute_dtype(q, k, v)
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
  scores = jnp.einsum("bnqhd,bnshd->bnhqs", qc, kc)
  scores = jnp.where(causal, scores, 0.0)
  intra = jnp.einsum("bnhqs,bnshe->bnqhe", scores, vc)

  chunk_kv = jnp.einsum("bnshd,bnshe->bnhde", kc, vc)  # [B, N, H, D, Dv]
  kv_before = kv0[:, None] + jnp.cumsum(chunk_kv, axis=1) - chunk_kv
  inter = jnp.einsum("bnqhd,bnhde->bnqhe", qc, kv_before)
  numerator = intra + inter

  if normalize:
    chunk_z = kc.sum(axis=2)  # [B, N, H, D]
    z_before = z0[:, None] + jnp.cumsum(chunk_z, axis=1) - chunk_z
    denominator = scores.sum(axis=-1).transpose(0, 1, 3, 2) + jnp.einsum(
      "bnqhd,bnhd->bnqh", qc, z_before
    )
    # Padded rows have a zero denominator; keep them finite so their (unused)
    # gradients do not turn into NaN.
    valid = (jnp.arange(t + pad) < t).reshape(1, -1, chunk, 1)
    out = numerator / jnp.where(valid, denominator, 1.0)[..., None]
  else:
    out = scale * numerator
  o = out.reshape(b, t + pad, h, dv)[:, :t].astype(q.dtype)

  final = None
  if output_final_state:
    kv = kv0 + chunk_kv.sum(axis=1)
    final = (kv, z0 + kc.sum(axis=(1, 2))) if normalize else kv
  return o, final
