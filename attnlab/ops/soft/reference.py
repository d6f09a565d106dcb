"""The oracle: SOFT's Nyström attention as an explicit T×T matrix.

Ŝ = P (A + ridge·I)⁻¹ Pᵀ with a direct inverse (no Newton iterations, no
linear-attention scan), masked, applied to V and optionally row-normalised, the row sum floored at
eps · Σ_a |(P A⁺)_ta| Σ_s P_sa as in the fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_attention(
  q: jax.Array,
  v: jax.Array,
  landmarks: jax.Array,
  *,
  ridge: float,
  normalize: bool,
  eps: float,
  causal: bool,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """q [B,T,H,D], v [B,T,H,Dv], landmarks [H,m,D] -> [B,T,H,Dv] (compute dtype);
  segment_ids [B, T]: Ŝ keeps only pairs within one document."""
  d, m, t = q.shape[-1], landmarks.shape[1], q.shape[1]

  def kernel(x, y):
    diff = x[..., :, None, :] - y[..., None, :, :]
    return jnp.exp(-jnp.sum(diff * diff, -1) / (2.0 * d**0.5))

  p = kernel(jnp.moveaxis(q, 2, 1), landmarks[None])  # [B, H, T, m]
  a_inv = jnp.linalg.inv(kernel(landmarks, landmarks) + ridge * jnp.eye(m, dtype=q.dtype))
  s = jnp.einsum("bhtm,hmn,bhsn->bhts", p, a_inv, p)
  visible = jnp.tril(jnp.ones((t, t), bool))[None, None] if causal else jnp.ones((1, 1, t, t), bool)
  if segment_ids is not None:
    visible = visible & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  s = jnp.where(visible, s, 0.0)
  out = jnp.einsum("bhts,bshe->bthe", s, v)
  if normalize:
    # Σ_{s visible} P_s, per query: the row sums' terms, for the floor.
    key_sums = jnp.einsum("bhts,bhsm->bhtm", visible.astype(p.dtype), p)
    bound = jnp.sum(jnp.abs(jnp.einsum("bhtm,hmn->bhtn", p, a_inv)) * key_sums, -1)
    floor = jnp.maximum(eps * bound, jnp.finfo(q.dtype).tiny)
    out = out / jnp.moveaxis(jnp.maximum(s.sum(-1), floor), 1, 2)[..., None]
  return out
