"""Dtype helpers shared by every op (jax and numpy only); dispatch lives in _dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
  """At least float32; float64 when inputs are float64 (needs jax_enable_x64)."""
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def default_scale(head_dim: int, scale: float | None) -> float:
  return head_dim**-0.5 if scale is None else scale
