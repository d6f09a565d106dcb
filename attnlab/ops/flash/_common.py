"""Argument preparation shared by the flash kernel backends (jnp only).

Both backends take q, k, v plus an optional row factor α [batch, time, heads]
and column factor β [batch, time, kv_heads] (float32), and compute the
logits u_ij = scale · α_i · β_j · (q_i · k_j). The factors are formed here, in
plain jnp outside the kernels' custom VJP, so autodiff carries their
gradients on to `logit_scale`, q and k.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnlab.ops import _softplus_semantics as semantics


def check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, op_name: str) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3]:
    raise ValueError(f"{op_name}: expected [B,T,H,D] arrays; got q{q.shape} k{k.shape} v{v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
    raise ValueError(f"{op_name}: q{q.shape} and k{k.shape} disagree on batch, time or head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{op_name}: heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")


def inverse_norm(x: jax.Array) -> jax.Array:
  """1/‖x‖ over the last axis (dropped) in float32; 0 for a zero vector."""
  return semantics.inverse_norm(x.astype(jnp.float32))[..., 0]


def softplus_factors(q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """α_i = log D · log i / ‖q_i‖ and β_j = 1/‖k_j‖, so u_ij = log D · log i · q̂_i·k̂_j.

  Args:
    q: [batch, time, heads, head_dim]; k: [batch, time, kv_heads, head_dim].

  Returns:
    α [batch, time, heads] and β [batch, time, kv_heads], float32.
  """
  rows = jnp.arange(1, q.shape[1] + 1, dtype=jnp.float32)
  log_scale = math.log(q.shape[-1]) * jnp.log(rows)  # log D · log i
  return log_scale[None, :, None] * inverse_norm(q), inverse_norm(k)


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def pad_axis(x: jax.Array | None, axis: int, size: int) -> jax.Array | None:
  """Zero-pads `axis` up to `size` (zeros keep padded rows finite)."""
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)
