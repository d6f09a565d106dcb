"""Element-wise tile math of the flash kernels (pure jnp, no Pallas).

Every function works on one [block_q, block_k] tile of logits `u` with row
quantities shaped to broadcast against it ([block_q, 1] or already tiled) and
column quantities shaped [1, block_k]. Both backends call these from inside
their kernels, so the formulas below are the single source of the kernels'
semantics. They mirror `attnlab.ops.softplus.xla` step by step (softplus,
L1, ReLU(A·i − O), max rescale, power, L1), and take the rules both share
(the offset with its rounding slack, the safe reciprocal) from
`attnlab.ops._softplus_semantics`, so that rounding-sensitive decisions such
as the slack happen the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops import _softplus_semantics as semantics

# Finite stand-in for -inf: keeps exp(m_old - m_new) NaN-free on fully masked rows.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

KINDS = ("softmax", "lssa", "lssar")


def softplus(u: jax.Array) -> jax.Array:
  """log(1 + e^u), as jax.nn.softplus computes it (log1p keeps e^u ≪ 1 exact)."""
  return jnp.maximum(u, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(u)))


def power(y: jax.Array, p: float) -> jax.Array:
  """y**p for y >= 0: repeated products for integer p, else exp(p·log y)."""
  if float(p).is_integer() and p >= 0:
    return jax.lax.integer_pow(y, int(p))
  positive = y > 0
  return jnp.where(positive, jnp.exp(p * jnp.log(jnp.where(positive, y, 1.0))), 0.0)


def lssar_x(a: jax.Array, z: jax.Array, n: jax.Array) -> jax.Array:
  """ReLU(A·i − O) with A = a / Z (the xla path multiplies by 1/Z instead).

  Monotone in `a`, so applied to the row max of `a` it gives the row max of x
  bit for bit.
  """
  return jnp.maximum(a / z * n - semantics.lssar_offset(n, jnp.float32), 0.0)


def lssar_y(a, z, xmax, n, mask):
  """x / max(x) on visible entries; rows whose max is 0 (vanished rows) give 0."""
  alive = xmax > 0
  y = lssar_x(a, z, n) / jnp.where(alive, xmax, 1.0)
  return jnp.where(mask & alive, y, 0.0)


# 1/x, and 0 where x == 0 (rows that output 0).
safe_reciprocal = semantics.safe_reciprocal


def lssar_dweights(y, dp, delta, n, xmax, bsum, p):
  """dL/dA for the sharpening stage, A = a/Z (before the ReLU).

  With b = y^p, w = b / Σb, out = Σ w v:  dL/dy = p·y^(p−1)·(do·v − δ)/Σb,
  dy/dA = i / max(x) where x > 0 (the max is a constant: the result is
  scale-invariant per row).
  """
  row = n * p * safe_reciprocal(bsum) * safe_reciprocal(xmax)
  return jnp.where(y > 0, row * power(y, p - 1.0) * (dp - delta), 0.0)


def backward_tile(
  kind: str,
  u: jax.Array,
  mask: jax.Array,
  dp: jax.Array,
  delta: jax.Array,
  *,
  lse=None,
  z=None,
  xmax=None,
  bsum=None,
  eps=None,
  n=None,
  p=None,
  base2: bool = False,
):
  """Weights w (for dv = wᵀ·do) and logit cotangents du of one tile.

  Args:
    u: [bq, bk] logits; mask: [bq, bk] visible; dp: [bq, bk] do·vᵀ.
    delta: rows, Σ_d do·o. Residual rows: lse (softmax); z (lssa); z, xmax,
      bsum and eps = Σ_j A_ij·dL/dA_ij (lssar); n: 1-based row positions.
  """
  if kind == "softmax":
    # base2: u and lse are in log2 units (the GPU kernels use exp2); du is
    # still the cotangent of the natural-log logits.
    w = jnp.where(mask, (jnp.exp2 if base2 else jnp.exp)(u - lse), 0.0)
    return w, w * (dp - delta)
  a = softplus(u)
  inv_z = 1.0 / z
  sig = jax.nn.sigmoid(u)
  if kind == "lssa":
    w = jnp.where(mask, a * inv_z, 0.0)
    return w, jnp.where(mask, (dp - delta) * inv_z * sig, 0.0)
  y = lssar_y(a, z, xmax, n, mask)
  w = power(y, p) * safe_reciprocal(bsum)
  da = lssar_dweights(y, dp, delta, n, xmax, bsum, p)
  # A = a/Z: the row sum Z carries -eps/Z back to every visible entry.
  return w, jnp.where(mask, (da - eps) * inv_z * sig, 0.0)


def lssar_eps_tile(u, mask, dp, delta, *, z, xmax, bsum, n, p):
  """A·dL/dA of one tile; its row sums are the eps residual of the backward."""
  a = softplus(u)
  y = lssar_y(a, z, xmax, n, mask)
  da = lssar_dweights(y, dp, delta, n, xmax, bsum, p)
  return jnp.where(mask, a / z * da, 0.0)
