"""Oracles for NAtS-L's operators: explicit per-token recurrences.

The delta-rule oracle keeps the state at the start of the current block and
a running state; at a block's end the state becomes
e^{Σg} S_start + m (S_running − e^{Σg} S_start), i.e. the block's write is
kept with gate m and the decay always applies. The softmax oracles handle one
query at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _delta_chunks


def block_gated_delta_rule(
  q, k, v, g, beta, block_write, initial_state, *, block_size, scale, segment_ids=None
):
  """segment_ids [B, T]: every state restarts from zero where a document starts
  (documents start on block boundaries, as packed NAtS-L rows are laid out)."""
  t = q.shape[1]
  steps = jnp.arange(t)
  gate = block_write[:, steps // block_size]  # [B, T, H]
  ends = (steps % block_size) == block_size - 1
  b = q.shape[0]
  if segment_ids is None:
    fresh = jnp.zeros((b, t), bool)
  else:
    fresh = jnp.concatenate(
      [jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )

  def step(carry, inputs):
    start_state, state, log_decay = carry
    qt, kt, vt, gt, bt, mt, end, new = inputs
    reset = new[:, None, None, None]
    start_state, state = (jnp.where(reset, 0.0, s) for s in (start_state, state))
    log_decay = jnp.where(new[:, None], 0.0, log_decay)
    state, o = _delta_chunks.recurrent_step(state, qt, kt, vt, gt, bt, scale)
    log_decay = log_decay + gt
    decayed = jnp.exp(log_decay)[..., None, None] * start_state
    closed = decayed + mt[..., None, None] * (state - decayed)
    start_state = jnp.where(end, closed, start_state)
    state = jnp.where(end, closed, state)
    log_decay = jnp.where(end, 0.0, log_decay)
    return (start_state, state, log_decay), o

  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta, gate)) + (ends, fresh.T)
  log_decay = jnp.zeros(q.shape[:1] + q.shape[2:3], q.dtype)
  (_, state, _), out = jax.lax.scan(step, (initial_state, initial_state, log_decay), xs)
  return jnp.moveaxis(out, 0, 1), state


def block_sparse_softmax(q, k, v, block_visible, *, block_size, scale, segment_ids=None):
  t = q.shape[1]
  block = jnp.arange(t) // block_size
  key_gate = block_visible[:, block]  # [B, T(key), H]
  seg = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids

  def one_query(_, i):
    logits = jnp.einsum("bhd,bshd->bsh", q[:, i], k) * scale  # [B, T, H]
    own = (block == block[i]) & (jnp.arange(t) <= i)
    weight = jnp.where(
      own[None, :, None], 1.0, jnp.where((block < block[i])[None, :, None], key_gate, 0.0)
    )
    weight = jnp.where((seg == seg[:, i, None])[:, :, None], weight, 0.0)
    logits = jnp.where(weight > 0, logits, -jnp.inf)
    p = weight * jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=1, keepdims=True)))
    p = p / p.sum(axis=1, keepdims=True)
    return None, jnp.einsum("bsh,bshd->bhd", p, v)

  _, out = jax.lax.scan(one_query, None, jnp.arange(t))
  return jnp.moveaxis(out, 0, 1)


def block_sparse_softmax_prefill(q, k, v, block_visible, k_slots, v_slots, num_blocks, *, scale):
  """One query at a time: the cached slots below num_blocks, then the chunk's keys."""
  b, t, h, _ = q.shape
  size = k_slots.shape[2]
  block = jnp.arange(t) // size
  cached = k_slots.reshape(b, -1, h, k_slots.shape[-1])
  cached_v = v_slots.reshape(b, -1, h, v_slots.shape[-1])
  cache_seen = (jnp.arange(cached.shape[1]) // size)[None, :, None] < num_blocks[:, None, :]
  key_gate = block_visible[:, block]  # [B, T(key), H]

  def one_query(_, i):
    own = (block == block[i]) & (jnp.arange(t) <= i)
    weight = jnp.where(
      own[None, :, None], 1.0, jnp.where((block < block[i])[None, :, None], key_gate, 0.0)
    )
    weight = jnp.concatenate([cache_seen.astype(weight.dtype), weight], axis=1)
    keys = jnp.concatenate([cached, k], axis=1)
    logits = jnp.einsum("bhd,bshd->bsh", q[:, i], keys) * scale
    logits = jnp.where(weight > 0, logits, -jnp.inf)
    p = weight * jnp.exp(logits - logits.max(axis=1, keepdims=True))
    p = p / p.sum(axis=1, keepdims=True)
    return None, jnp.einsum("bsh,bshd->bhd", p, jnp.concatenate([cached_v, v], axis=1))

  _, out = jax.lax.scan(one_query, None, jnp.arange(t))
  return jnp.moveaxis(out, 0, 1)
