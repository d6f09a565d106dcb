"""Chunkwise gated delta rule (WY / UT transform) in plain jnp.

Shared by the gated delta rule op and NAtS-L's gated-write variant. For a
chunk with in-chunk cumulative log decay γ and Γ_ij = exp(γ_i − γ_j) (i ≥ j):

    A  = strict_lower(diag(β) K Kᵀ ⊙ Γ)
    U  = (I + A)⁻¹ diag(β) V           W = (I + A)⁻¹ diag(β) (K ⊙ e^γ)
    O  = (Q ⊙ e^γ) S + (Q Kᵀ ⊙ Γ) (U − W S)
    S' = e^{γ_C} S + m (K ⊙ e^{γ_C − γ})ᵀ (U − W S)

with S the state at the chunk start and m the chunk's write gate (1 for the
plain rule). Everything that does not depend on S is computed for all chunks
at once; a scan over chunks carries only the affine map S' = (e^{γ_C} − Y) S + X,
so no T×T matrix is formed. Every exponent is ≤ 0, so nothing overflows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _linalg


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[B, T, H, ...] (T a multiple of chunk) -> [B, H, N, C, ...]."""
  b, t, h = x.shape[:3]
  x = x.reshape(b, t // chunk, chunk, h, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def pad_time(x: jax.Array, pad: int) -> jax.Array:
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def chunked_gated_delta(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  g: jax.Array,
  beta: jax.Array,
  *,
  scale: float,
  initial_state: jax.Array,
  chunk: int,
  write_gate: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Chunked gated delta rule on already-cast, equal-head inputs.

  Args:
    q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H]; T any length.
    initial_state: [B, H, K, V].
    chunk: chunk length C.
    write_gate: optional [B, ceil(T/C), H]; scales each chunk's write into the
      state (its own outputs still see it). None writes every chunk fully.

  Returns:
    (o [B, T, H, V], final state [B, H, K, V]).
  """
  b, t, h, dk = q.shape
  pad = -t % chunk
  # Padding with k = v = β = g = 0 leaves the state untouched.
  q, k, v, g, beta = (pad_time(a, pad) for a in (q, k, v, g, beta))
  q, k, v, g, beta = (_to_chunks(a, chunk) for a in (q, k, v, g, beta))  # [B,H,N,C,..]

  gamma = jnp.cumsum(g, axis=-1)  # [B,H,N,C]
  diff = gamma[..., :, None] - gamma[..., None, :]
  inclusive = jnp.tril(jnp.ones((chunk, chunk), bool))
  strict = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
  decay = jnp.where(inclusive, jnp.exp(jnp.where(inclusive, diff, 0.0)), 0.0)  # Γ

  kk = jnp.einsum("...ik,...jk->...ij", k, k)
  a = jnp.where(strict, beta[..., :, None] * kk * decay, 0.0)
  rhs = jnp.concatenate([beta[..., None] * v, beta[..., None] * k * jnp.exp(gamma)[..., None]], -1)
  solved = _linalg.unit_lower_inverse(a) @ rhs
  u, w = solved[..., : v.shape[-1]], solved[..., v.shape[-1] :]

  p = jnp.einsum("...ik,...jk->...ij", q * scale, k) * decay
  q_eff = q * scale * jnp.exp(gamma)[..., None] - p @ w  # [B,H,N,C,K]
  pu = p @ u  # [B,H,N,C,V]

  decay_end = jnp.exp(gamma[..., -1])  # [B,H,N]
  k_end = k * jnp.exp(gamma[..., -1:] - gamma)[..., None]
  x = jnp.einsum("...ck,...cv->...kv", k_end, u)  # [B,H,N,K,V]
  y = jnp.einsum("...ck,...cj->...kj", k_end, w)  # [B,H,N,K,K]
  if write_gate is not None:
    gate = jnp.moveaxis(write_gate, 2, 1)[..., None, None]  # [B,H,N,1,1]
    x, y = x * gate, y * gate

  def advance(state, inputs):
    decay_n, x_n, y_n = inputs
    return decay_n[..., None, None] * state - y_n @ state + x_n, state

  xs = tuple(jnp.moveaxis(a, 2, 0) for a in (decay_end, x, y))
  final, starts = jax.lax.scan(advance, initial_state, xs)
  starts = jnp.moveaxis(starts, 0, 2)  # [B,H,N,K,V]

  o = q_eff @ starts + pu  # [B,H,N,C,V]
  o = jnp.moveaxis(o, 1, 3).reshape(b, t + pad, h, -1)[:, :t]
  return o, final


def recurrent_step(
  state: jax.Array,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  g: jax.Array,
  beta: jax.Array,
  scale: float,
) -> tuple[jax.Array, jax.Array]:
  """One step of the rule: state [B,H,K,V]; q, k [B,H,K]; v [B,H,V]; g, beta [B,H].

  S ← e^g S;  u = β (v − Sᵀk);  S ← S + k uᵀ;  o = Sᵀ (scale · q).
  """
  state = state * jnp.exp(g)[..., None, None]
  u = beta[..., None] * (v - jnp.einsum("bhkv,bhk->bhv", state, k))
  state = state + k[..., :, None] * u[..., None, :]
  return state, jnp.einsum("bhkv,bhk->bhv", state, scale * q)
