"""Small linear-algebra helpers shared by ops (jax only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def unit_lower_inverse(a: jax.Array) -> jax.Array:
  """(I + a)⁻¹ for strictly lower-triangular a [..., n, n], by recursive 2×2 blocking.

  Only matmuls (tensor cores / MXU friendly) and as stable as forward
  substitution, unlike the Neumann product (I − a)(I + a²)(I + a⁴)…, whose
  intermediate powers overflow float32 for long chunks.
  """
  n = a.shape[-1]
  if n == 1:
    return jnp.ones_like(a)
  h = n // 2
  top = unit_lower_inverse(a[..., :h, :h])
  bottom = unit_lower_inverse(a[..., h:, h:])
  corner = -bottom @ a[..., h:, :h] @ top
  zeros = jnp.zeros((*a.shape[:-2], h, n - h), a.dtype)
  return jnp.concatenate(
    [jnp.concatenate([top, zeros], -1), jnp.concatenate([corner, bottom], -1)], -2
  )
