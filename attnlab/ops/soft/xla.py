"""SOFT's Nyström pieces in plain XLA: Gaussian kernel features and the
Newton–Schulz pseudo-inverse with SOFT's one-shot gradient.

The causal product itself is linear attention over these features; `api.py`
composes the two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def log_gaussian_kernel(x: jax.Array, y: jax.Array) -> jax.Array:
  """−‖x_i − y_j‖² / (2√d) over the last axis.

  Args:
    x: [..., n, d]; y: [..., m, d] (leading axes broadcast).

  Returns:
    [..., n, m]. Squared distances use ‖x‖² + ‖y‖² − 2x·y, clamped at 0.
  """
  d = x.shape[-1]
  sq = (
    jnp.sum(x * x, -1)[..., :, None]
    + jnp.sum(y * y, -1)[..., None, :]
    - 2.0 * jnp.einsum("...nd,...md->...nm", x, y)
  )
  return -jnp.maximum(sq, 0.0) / (2.0 * d**0.5)


def gaussian_kernel(x: jax.Array, y: jax.Array) -> jax.Array:
  """exp(−‖x_i − y_j‖² / (2√d)): [..., n, d], [..., m, d] -> [..., n, m]."""
  return jnp.exp(log_gaussian_kernel(x, y))


def _newton_iterations(a: jax.Array, iters: int, ridge: float) -> jax.Array:
  m = a.shape[-1]
  p = a + ridge * jnp.eye(m, dtype=a.dtype)
  # SOFT's safe start α = 0.9·2/σ², with σ² ≤ ‖P‖₁‖P‖∞ bounding σ_max(P)²
  # (the max row sum squared for symmetric P, as in SOFT).
  row = jnp.max(jnp.sum(jnp.abs(p), -1), -1)
  col = jnp.max(jnp.sum(jnp.abs(p), -2), -1)
  alpha = 0.9 * 2.0 / (row * col)
  x0 = alpha[..., None, None] * jnp.swapaxes(p, -1, -2)
  return jax.lax.fori_loop(0, iters, lambda _, x: 2.0 * x - x @ p @ x, x0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def newton_inverse(a: jax.Array, iters: int, ridge: float) -> jax.Array:
  """(A + ridge·I)⁻¹ by `iters` Newton–Schulz steps X ← 2X − X(A + ridge·I)X.

  The backward is the inverse's analytic gradient, dA = −Xᵀ G Xᵀ, evaluated
  once at the output (SOFT's rule): nothing of the iterations is kept.
  """
  return _newton_iterations(a, iters, ridge)


def _newton_fwd(a, iters, ridge):
  x = _newton_iterations(a, iters, ridge)
  return x, x


def _newton_bwd(iters, ridge, x, g):
  del iters, ridge
  xt = jnp.swapaxes(x, -1, -2)
  return (-(xt @ g @ xt),)


newton_inverse.defvjp(_newton_fwd, _newton_bwd)


def nystrom_features(
  q: jax.Array, landmarks: jax.Array, *, newton_iters: int, ridge: float
) -> tuple[jax.Array, jax.Array]:
  """Query- and key-side features of Ŝ = P A⁺ Pᵀ with K = Q.

  Args:
    q: [batch, time, heads, head_dim] (in the compute dtype).
    landmarks: [heads, num_landmarks, head_dim].

  Returns:
    (P A⁺, P), each [batch, time, heads, num_landmarks], so that
    Ŝ_ts = (P A⁺)_t · P_s.
  """
  p = gaussian_kernel(jnp.moveaxis(q, 2, 1), landmarks[None])  # [B, H, T, m]
  a_inv = newton_inverse(gaussian_kernel(landmarks, landmarks), newton_iters, ridge)
  query_side = jnp.einsum("bhtm,hmn->bthn", p, a_inv)
  return query_side, jnp.moveaxis(p, 1, 2)


def rescaled_nystrom_features(
  q: jax.Array, landmarks: jax.Array, *, newton_iters: int, ridge: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`nystrom_features` up to factors that cancel in a row-normalised output.

  The kernel scales like exp(−‖q − l‖² / (2√d)), so as ‖q‖ grows P underflows
  while every row's normalised weights stay well defined. Working in log
  space, each query's row is divided by its own largest entry, and every key
  by exp(r), r the largest log-kernel entry of the (batch, head): then
  Ŝ_ts = c_t e^r (P̂ A⁺)_t · P̂_s with c_t > 0. Both factors leave the
  normalised output unchanged, so they carry no gradient.

  Args:
    q: [batch, time, heads, head_dim] (in the compute dtype).
    landmarks: [heads, num_landmarks, head_dim].

  Returns:
    (P̂ A⁺ [batch, time, heads, m], P̂ [batch, time, heads, m], r [batch, heads]).
  """
  log_p = log_gaussian_kernel(jnp.moveaxis(q, 2, 1), landmarks[None])  # [B, H, T, m]
  row_peak = jax.lax.stop_gradient(jnp.max(log_p, -1, keepdims=True))
  reference = jnp.max(row_peak, axis=(2, 3))  # [B, H]
  a_inv = newton_inverse(gaussian_kernel(landmarks, landmarks), newton_iters, ridge)
  query_side = jnp.einsum("bhtm,hmn->bthn", jnp.exp(log_p - row_peak), a_inv)
  key_side = jnp.exp(log_p - reference[..., None, None])
  return query_side, jnp.moveaxis(key_side, 1, 2), reference


def normalizer_floor(query_side: jax.Array, key_sums: jax.Array, eps: float) -> jax.Array:
  """eps · Σ_a |(P A⁺)_ta| Σ_s P_sa: a floor for the row sum Σ_s Ŝ_ts
  relative to the size of the terms it sums, which A⁺'s negative entries can
  cancel. Scale-free, unlike an absolute clamp.

  Args:
    query_side: [batch, time, heads, m] from `nystrom_features`.
    key_sums: [batch, time or 1, heads, m] Σ_s P_s over the keys each query
      sees (a cumulative sum when causal).

  Returns:
    [batch, time, heads, 1], never below the dtype's smallest normal number
    (a row whose keys all underflow gives 0, not NaN).
  """
  bound = jnp.sum(jnp.abs(query_side) * key_sums, -1, keepdims=True)
  return jnp.maximum(eps * bound, jnp.finfo(bound.dtype).tiny)
