"""Small linear-algebra helpers shared by ops and kernel bodies (jax only)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from attnlab.ops import _dispatch


def matmul_precision(dtype: jnp.dtype) -> lax.Precision:
  """HIGHEST for float32/float64 operands (full-precision passes on TPU), else DEFAULT."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else lax.Precision.DEFAULT


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=matmul_precision(a.dtype))


def unit_lower_inverse(
  a: jax.Array, dot: Callable[[jax.Array, jax.Array], jax.Array] | None = None
) -> jax.Array:
  """(I + a)⁻¹ for strictly lower-triangular a [..., n, n] (any n).

  Recursive 2×2 blocking, done level by level on the whole matrix so it needs
  no slicing: with X_s the inverse of the block-diagonal part of I + a in
  blocks of s, and E_s the part of a inside 2s-blocks but outside s-blocks,

      X_2s = X_s − X_s E_s X_s        (exact, because E_s X_s E_s = 0).

  That is 2·⌈log₂ n⌉ full-size matmuls with static masks: as stable as
  forward substitution (the same products as the block recursion, unlike the
  Neumann product (I − a)(I + a²)(I + a⁴)…, whose intermediate powers overflow
  float32 for long chunks), MXU / tensor-core friendly, and a handful of ops
  for the compiler (the sliced recursion took the TPU compiler a minute for
  one 64×64 batch). Also a kernel body: `dot` is the backend's 2-D matmul.

  Compiled for a CPU (and `dot` not given) it takes the sliced recursion
  instead, the same products at their own sizes: on a CPU the full-size
  masked matmuls are ~6× slower (64×64 blocks, measured), and compiling is
  cheap there.
  """
  if dot is not None:
    return _masked_inverse(a, dot)
  if _dispatch.target_platform(a) == "cpu":
    return _sliced_inverse(a)
  # The update not fused into the matmul: on v6e the compiler (libtpu 0.0.42.1) fails a
  # register-allocation check on x ± X (E X) fused at HIGHEST precision.
  return _masked_inverse(a, _matmul, settle=lax.optimization_barrier)


def _masked_inverse(
  a: jax.Array,
  dot: Callable[[jax.Array, jax.Array], jax.Array],
  settle: Callable[[jax.Array], jax.Array] = lambda y: y,
) -> jax.Array:
  """`unit_lower_inverse` level by level with static masks."""
  n = a.shape[-1]
  rows = lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = lax.broadcasted_iota(jnp.int32, (n, n), 1)
  x = jnp.broadcast_to(jnp.where(rows == cols, 1.0, 0.0).astype(a.dtype), a.shape)
  level = 0
  while (1 << level) < n:
    pair = lax.shift_right_logical(rows, level + 1) == lax.shift_right_logical(cols, level + 1)
    half = lax.shift_right_logical(rows, level) != lax.shift_right_logical(cols, level)
    e = jnp.where(pair & half, a, 0.0)
    x = x - settle(dot(x, dot(e, x)))
    level += 1
  return x


def _sliced_inverse(a: jax.Array) -> jax.Array:
  """`unit_lower_inverse` by explicit 2×2 block recursion on slices."""
  n = a.shape[-1]
  if n == 1:
    return jnp.ones_like(a)
  h = n // 2
  top = _sliced_inverse(a[..., :h, :h])
  bottom = _sliced_inverse(a[..., h:, h:])
  corner = -_matmul(_matmul(bottom, a[..., h:, :h]), top)
  zeros = jnp.zeros((*a.shape[:-2], h, n - h), a.dtype)
  return jnp.concatenate(
    [jnp.concatenate([top, zeros], -1), jnp.concatenate([corner, bottom], -1)], -2
  )
