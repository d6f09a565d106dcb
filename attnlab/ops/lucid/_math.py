"""LUCID's shared math: key normalisation and the exponential key kernel.

Every backend (xla.py, the Pallas solves through _solve.py) builds L from
these, so they agree by construction; reference.py keeps its own copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize_keys(k: jax.Array, eps: float) -> jax.Array:
  """RMS normalisation without gain: k / sqrt(mean(k²) + eps); ‖k̂‖ ≈ √D."""
  return k * jax.lax.rsqrt(jnp.mean(k * k, axis=-1, keepdims=True) + eps)


def kernel(a: jax.Array, b: jax.Array) -> jax.Array:
  """exp(a bᵀ/√D − √D) for [..., n, D] and [..., m, D]; every exponent is ≤ ~0."""
  d = a.shape[-1]
  return jnp.exp(jnp.einsum("...nd,...md->...nm", a, b) * d**-0.5 - d**0.5)
