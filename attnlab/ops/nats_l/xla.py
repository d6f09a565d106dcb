"""NAtS-L's two block-routed operators in plain XLA.

The delta-rule path is the chunked WY form with chunk = block, each block's
state write scaled by its gate. The softmax path builds the dense [T, T]
block mask (O(T²) memory); a block-sparse kernel that skips hidden blocks is
the kernels' job.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _delta_chunks


def block_gated_delta_rule(q, k, v, g, beta, block_write, *, block_size, scale):
  o, _ = _delta_chunks.chunked_gated_delta(
    q, k, v, g, beta,
    scale=scale,
    initial_state=jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), q.dtype),
    chunk=block_size,
    write_gate=block_write,
  )  # fmt: skip
  return o


def block_key_weights(block_visible: jax.Array, t: int, block_size: int) -> jax.Array:
  """[B, N, H] block gates -> [B, H, T(query), T(key)] multiplicative key weights."""
  block = jnp.arange(t) // block_size
  same_block = (block[:, None] == block[None, :]) & (jnp.arange(t)[:, None] >= jnp.arange(t))
  earlier = block[None, :] < block[:, None]
  per_key = jnp.moveaxis(block_visible, 2, 1)[:, :, block]  # [B, H, T(key)]
  return jnp.where(same_block, 1.0, jnp.where(earlier, per_key[:, :, None, :], 0.0))


def block_sparse_softmax(q, k, v, block_visible, *, block_size, scale):
  t = q.shape[1]
  weights = block_key_weights(block_visible, t, block_size)
  logits = jnp.einsum("bqhd,bshd->bhqs", q, k) * scale
  # The stabiliser only looks at keys that can be visible.
  reachable = jax.lax.stop_gradient(weights) > 0
  peak = jnp.max(jnp.where(reachable, logits, -jnp.inf), axis=-1, keepdims=True)
  p = weights * jnp.exp(jnp.where(reachable, logits - jax.lax.stop_gradient(peak), -jnp.inf))
  p = p / jnp.sum(p, axis=-1, keepdims=True)
  return jnp.einsum("bhqs,bshd->bqhd", p, v)
