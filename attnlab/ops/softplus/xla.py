"""Softplus attention (LSSA / LSSAR) with dense [Tq, Tk] scores in plain XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp

ROUNDING_SLACK = 16  # in units of the dtype's machine epsilon


def _safe_divide(x: jax.Array, denominator: jax.Array) -> jax.Array:
  """x / denominator, with 0 where the denominator is 0 (and finite gradients)."""
  positive = denominator > 0
  return jnp.where(positive, x / jnp.where(positive, denominator, 1.0), 0.0)


def row_weights(scores: jax.Array, visible: jax.Array, rows: jax.Array, power, head_dim: int):
  """Attention weights from cosine scores.

  Args:
    scores: [..., Tq, Tk] q̂·k̂ in [-1, 1]. visible: [Tq, Tk] bool.
    rows: [Tq] 1-based absolute query positions i (= visible keys in a causal row).
  """
  i = rows.astype(scores.dtype)[:, None]
  a = jnp.where(visible, jax.nn.softplus(jnp.log(head_dim) * jnp.log(i) * scores), 0.0)
  a = _safe_divide(a, a.sum(-1, keepdims=True))
  if power is None:
    return a
  # A slack of a few ulps makes rows that are uniform up to rounding vanish as
  # they do in exact arithmetic, instead of the max rescale below inflating
  # their rounding noise into a full row.
  offset = jnp.where(i <= 3, 0.0, 1.0) + ROUNDING_SLACK * jnp.finfo(scores.dtype).eps
  x = jnp.where(visible, jax.nn.relu(a * i - offset), 0.0)
  # The op is scale-invariant per row: dividing by the row max before the power
  # keeps x^p representable (0.3^15 ≈ 1e-8 would drown in any eps).
  x = _safe_divide(x, jax.lax.stop_gradient(x.max(-1, keepdims=True)))
  b = x**power
  return _safe_divide(b, b.sum(-1, keepdims=True))


def inverse_norm(x: jax.Array) -> jax.Array:
  """1/‖x‖ over the last axis, keepdims; 0 for a zero vector (finite gradient)."""
  squared = jnp.sum(x * x, -1, keepdims=True)
  nonzero = squared > 0
  return jnp.where(nonzero, jax.lax.rsqrt(jnp.where(nonzero, squared, 1.0)), 0.0)


def _normalize(x):
  return x * inverse_norm(x)


def softplus_attention(q, k, v, *, power, query_positions, key_length):
  """q [B,Tq,H,D]; k, v [B,Tk,H,*] (heads already repeated); queries at
  absolute 0-based `query_positions` [Tq]; keys 0..key_length-1 are valid."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", _normalize(q), _normalize(k))
  key_pos = jnp.arange(k.shape[1])
  visible = (key_pos[None, :] <= query_positions[:, None]) & (key_pos[None, :] < key_length)
  w = row_weights(scores, visible, query_positions + 1, power, q.shape[-1])
  return jnp.einsum("bhqk,bkhd->bqhd", w, v)
