"""The shared definitions of softplus attention (LSSA / LSSAR), jax only.

One module, so that the implementations cannot drift apart on a rule that
decides which entries survive:

- `attnlab.ops.softplus.xla` (the dense path) and the flash kernels' tile
  math (`attnlab.ops.flash._tile`, called inside both Pallas backends) use
  the functions below;
- the float64 oracle (`attnlab.ops.softplus.reference`) takes only the
  constant `ROUNDING_SLACK` (part of the spec) and computes everything else
  itself, so it stays independent of the code it checks.

It sits beside the ops, not inside one backend, because backend modules
(`xla.py`, `pallas_tpu.py`, `pallas_gpu.py`) never import one another.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# LSSAR subtracts O_i plus this many machine epsilons of the compute dtype:
# rows that are uniform up to rounding (A·i = 1 ± a few ulps) then vanish as
# they do in exact arithmetic, instead of the row-max rescale inflating their
# rounding noise into a full row.
ROUNDING_SLACK = 16


def lssar_offset(i: jax.Array, dtype) -> jax.Array:
  """O_i + slack: O_i = 0 for 1-based rows i ≤ 3 and 1 after; > 0 everywhere."""
  return jnp.where(i <= 3, 0.0, 1.0) + ROUNDING_SLACK * jnp.finfo(dtype).eps


def safe_reciprocal(x: jax.Array) -> jax.Array:
  """1 / x, and 0 where x == 0 (empty or vanished rows), with finite gradients."""
  positive = x > 0
  return jnp.where(positive, 1.0 / jnp.where(positive, x, 1.0), 0.0)


def inverse_norm(x: jax.Array) -> jax.Array:
  """1/‖x‖ over the last axis (keepdims) in x's dtype; 0 for a zero vector."""
  squared = jnp.sum(x * x, -1, keepdims=True)
  nonzero = squared > 0
  return jnp.where(nonzero, jax.lax.rsqrt(jnp.where(nonzero, squared, 1.0)), 0.0)
