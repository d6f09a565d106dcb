"""Chunked gated delta rule (WY / UT transform) in plain XLA; any T, GVA, packed rows."""

from __future__ import annotations

from attnlab.ops import _delta_chunks


def gated_delta_rule(
  q, k, v, g, beta, *, scale, initial_state, chunk_size, segment_ids=None, inverse_dtype=None
):
  """q, k [B,T,H,K] and v [B,T,HV,V] in the operand dtype; g, beta [B,T,HV] and
  initial_state [B,HV,K,V] in the compute dtype. Returns (o [B,T,HV,V], final state)."""
  chunk = max(1, min(chunk_size, q.shape[1]))
  return _delta_chunks.chunked_gated_delta(
    q,
    k,
    v,
    g,
    beta,
    scale=scale,
    initial_state=initial_state,
    chunk=chunk,
    segment_ids=segment_ids,
    inverse_dtype=inverse_dtype,
  )


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale):
  """One token: q, k [B,H,K]; v [B,HV,V]; g, beta [B,HV]; state [B,HV,K,V]."""
  new_state, o = _delta_chunks.recurrent_step(state, q, k, v, g, beta, scale)
  return o, new_state
