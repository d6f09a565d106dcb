"""Oracle for causal linear attention: the explicit recurrence, one step at a time.

S_t = S_{t-1} + k_t v_tᵀ          z_t = z_{t-1} + k_t
o_t = scale · S_tᵀ q_t            (normalize: o_t = S_tᵀ q_t / (q_t · z_t))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _dtypes


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
  """With segment_ids the state (kv and z) is zeroed wherever the id changes."""
  del chunk_size  # the recurrence has no chunks
  dtype = _dtypes.compute_dtype(q, k, v)
  b, _, h, d = q.shape
  dv = v.shape[-1]
  scale = _dtypes.default_scale(d, scale)
  if initial_state is None:
    kv0 = jnp.zeros((b, h, d, dv), dtype)
    z0 = jnp.zeros((b, h, d), dtype)
  elif normalize:
    kv0, z0 = (s.astype(dtype) for s in initial_state)
  else:
    kv0, z0 = initial_state.astype(dtype), jnp.zeros((b, h, d), dtype)

  t = q.shape[1]
  if segment_ids is None:
    resets = jnp.zeros((b, t), bool)
  else:
    resets = jnp.concatenate(
      [jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )

  def step(carry, inputs):
    kv, z = carry
    reset, qt, kt, vt = inputs  # [B], [B, H, D]
    kv = jnp.where(reset[:, None, None, None], 0.0, kv)
    z = jnp.where(reset[:, None, None], 0.0, z)
    kv = kv + jnp.einsum("bhd,bhe->bhde", kt, vt)
    z = z + kt
    num = jnp.einsum("bhd,bhde->bhe", qt, kv)
    if normalize:
      out = num / jnp.einsum("bhd,bhd->bh", qt, z)[..., None]
    else:
      out = scale * num
    return (kv, z), out

  xs = tuple(jnp.moveaxis(a.astype(dtype), 1, 0) for a in (q, k, v))
  (kv, z), out = jax.lax.scan(step, (kv0, z0), (jnp.moveaxis(resets, 1, 0), *xs))
  o = jnp.moveaxis(out, 0, 1).astype(q.dtype)
  final = None
  if output_final_state:
    final = (kv, z) if normalize else kv
  return o, final
