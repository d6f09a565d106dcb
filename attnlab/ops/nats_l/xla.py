"""NAtS-L's two block-routed operators in plain XLA.

The delta-rule path is the chunked WY form with chunk = block, each block's
state write scaled by its gate. The softmax path builds the dense [T, T]
block mask (O(T²) memory); a block-sparse kernel that skips hidden blocks is
the kernels' job (`pallas_tpu`, `pallas_gpu`). The cached softmax serves
decoding from the block-compacted KV cache, the prefill softmax a chunk of
whole blocks against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _delta_chunks, _segments


def block_gated_delta_rule(
  q, k, v, g, beta, block_write, initial_state, *, block_size, scale, segment_ids=None
):
  """Returns (o, the state after the last block); the api asks for whole blocks
  when it hands the state on, so an incomplete last block's write never leaks."""
  return _delta_chunks.chunked_gated_delta(
    q, k, v, g, beta,
    scale=scale,
    initial_state=initial_state,
    chunk=block_size,
    write_gate=block_write,
    segment_ids=segment_ids,
  )  # fmt: skip


def block_key_weights(block_visible: jax.Array, t: int, block_size: int) -> jax.Array:
  """[B, N, H] block gates -> [B, H, T(query), T(key)] multiplicative key weights."""
  block = jnp.arange(t) // block_size
  same_block = (block[:, None] == block[None, :]) & (jnp.arange(t)[:, None] >= jnp.arange(t))
  earlier = block[None, :] < block[:, None]
  per_key = jnp.moveaxis(block_visible, 2, 1)[:, :, block]  # [B, H, T(key)]
  return jnp.where(same_block, 1.0, jnp.where(earlier, per_key[:, :, None, :], 0.0))


def block_sparse_softmax(q, k, v, block_visible, *, block_size, scale, segment_ids=None):
  t = q.shape[1]
  weights = block_key_weights(block_visible, t, block_size)
  if segment_ids is not None:
    docs = _segments.document_index(segment_ids)
    weights = jnp.where(_segments.same_document(docs, docs)[:, None], weights, 0.0)
  logits = jnp.einsum("bqhd,bshd->bhqs", q, k) * scale
  # The stabiliser only looks at keys that can be visible.
  reachable = jax.lax.stop_gradient(weights) > 0
  peak = jnp.max(jnp.where(reachable, logits, -jnp.inf), axis=-1, keepdims=True)
  p = weights * jnp.exp(jnp.where(reachable, logits - jax.lax.stop_gradient(peak), -jnp.inf))
  p = p / jnp.sum(p, axis=-1, keepdims=True)
  return jnp.einsum("bhqs,bshd->bqhd", p, v)


def block_sparse_softmax_cached(q, k_slots, v_slots, num_blocks, block_length, *, scale):
  """Queries of the current block against a block-compacted KV cache.

  q [B, Tq, H, D] are the last Tq tokens of the current block; k_slots,
  v_slots [B, S, block, H, D] hold each head's attention-typed blocks in
  slots 0 .. num_blocks−1 and the current block in slot num_blocks, whose
  rows below `block_length` are filled. O(S·block) per query.
  """
  tq = q.shape[1]
  size = k_slots.shape[2]
  logits = jnp.einsum("bqhd,bschd->bhqsc", q, k_slots) * scale  # [B, H, Tq, S, block]
  count = num_blocks[:, :, None, None, None]
  slot = jnp.arange(k_slots.shape[1])[:, None]
  row = jnp.arange(size)[None, :]
  offset = (block_length - tq + jnp.arange(tq))[:, None, None]  # each query's row in its block
  visible = (slot < count) | ((slot == count) & (row <= offset))
  logits = jnp.where(visible, logits, -jnp.inf)
  flat = logits.reshape(*logits.shape[:3], -1)
  p = jax.nn.softmax(flat, axis=-1).reshape(logits.shape)
  return jnp.einsum("bhqsc,bschd->bqhd", p, v_slots)


def block_sparse_softmax_prefill(q, k, v, block_visible, k_slots, v_slots, num_blocks, *, scale):
  """A chunk starting at a block boundary against the block-compacted cache.

  q, k, v [B, T, H, D] are the chunk's tokens; every query sees each head's
  cached slots 0 .. num_blocks−1 (all earlier blocks, fully visible) and the
  chunk's keys with `block_key_weights`. One softmax over both key sets.
  """
  b, t, h, _ = q.shape
  size = k_slots.shape[2]
  cached = k_slots.reshape(b, -1, h, k_slots.shape[-1])  # [B, S·block, H, D]
  cached_v = v_slots.reshape(b, -1, h, v_slots.shape[-1])
  slot = jnp.arange(cached.shape[1]) // size
  cache_weights = (slot[None, None, :] < num_blocks[:, :, None]).astype(q.dtype)  # [B, H, S·block]
  cache_weights = jnp.broadcast_to(cache_weights[:, :, None, :], (b, h, t, cached.shape[1]))
  weights = jnp.concatenate(
    [cache_weights, block_key_weights(block_visible, t, size).astype(q.dtype)], axis=-1
  )
  keys = jnp.concatenate([cached, k], axis=1)
  values = jnp.concatenate([cached_v, v], axis=1)
  logits = jnp.einsum("bqhd,bshd->bhqs", q, keys) * scale
  reachable = weights > 0  # the own causal prefix is always reachable, so no row is empty
  peak = jnp.max(jnp.where(reachable, logits, -jnp.inf), axis=-1, keepdims=True)
  p = weights * jnp.exp(jnp.where(reachable, logits - peak, -jnp.inf))
  p = p / jnp.sum(p, axis=-1, keepdims=True)
  return jnp.einsum("bhqs,bshd->bqhd", p, values)
