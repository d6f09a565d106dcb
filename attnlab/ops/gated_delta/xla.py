"""Chunked gated delta rule (WY / UT transform) in plain XLA; any T."""

from __future__ import annotations

from attnlab.ops import _delta_chunks


def gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, chunk_size):
  chunk = max(1, min(chunk_size, q.shape[1]))
  return _delta_chunks.chunked_gated_delta(
    q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk=chunk
  )
