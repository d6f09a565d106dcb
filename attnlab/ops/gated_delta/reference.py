"""Oracle for the gated delta rule: the explicit recurrence, one step at a time."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _delta_chunks


def gated_delta_rule(
  q, k, v, g, beta, *, scale, initial_state, chunk_size, segment_ids=None, inverse_dtype=None
):
  """Same contract as `xla.gated_delta_rule`; chunk_size and inverse_dtype are unused.

  With segment_ids the state is zeroed wherever the id changes (before the
  step's decay), so each document starts from zeros except the row's first.
  """
  del chunk_size, inverse_dtype  # the recurrence has no chunks and no inverse
  dtype = initial_state.dtype
  b, t = q.shape[:2]
  if segment_ids is None:
    resets = jnp.zeros((b, t), bool)
  else:
    resets = jnp.concatenate(
      [jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )

  def step(state, inputs):
    reset, *token = inputs
    state = jnp.where(reset[:, None, None, None], jnp.zeros_like(state), state)
    return _delta_chunks.recurrent_step(state, *token, scale)

  xs = tuple(jnp.moveaxis(a.astype(dtype), 1, 0) for a in (q, k, v, g, beta))
  final, out = jax.lax.scan(step, initial_state, (jnp.moveaxis(resets, 1, 0), *xs))
  return jnp.moveaxis(out, 0, 1), final
