"""Oracle for the gated delta rule: the explicit recurrence, one step at a time.

Also the decoding path: one token is one scan step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _delta_chunks


def gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, chunk_size):
  del chunk_size  # the recurrence has no chunks

  def step(state, inputs):
    return _delta_chunks.recurrent_step(state, *inputs, scale)

  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta))
  final, out = jax.lax.scan(step, initial_state, xs)
  return jnp.moveaxis(out, 0, 1), final
