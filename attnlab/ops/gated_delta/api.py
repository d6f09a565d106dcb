"""Public gated delta rule op (Gated DeltaNet, Yang et al., 2025) with dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _dtypes
from attnlab.ops.gated_delta import reference, xla

_IMPLEMENTATIONS = {"xla": xla, "reference": reference}


def _check(q, k, v, g, beta, initial_state) -> None:
  if q.ndim != 4 or q.shape != k.shape or v.ndim != 4 or v.shape[:2] != q.shape[:2]:
    raise ValueError(
      "gated_delta_rule expects q, k [batch, time, heads, head_dim] of equal shape "
      f"and v [batch, time, v_heads, head_dim_v]; got q{q.shape} k{k.shape} v{v.shape}"
    )
  if v.shape[2] % q.shape[2]:
    raise ValueError(f"v heads ({v.shape[2]}) must be a multiple of q/k heads ({q.shape[2]})")
  if g.shape != v.shape[:3] or beta.shape != v.shape[:3]:
    raise ValueError(
      f"g and beta must be [batch, time, v_heads] = {v.shape[:3]}; got g{g.shape} beta{beta.shape}"
    )
  expected = (v.shape[0], v.shape[2], q.shape[3], v.shape[3])
  if initial_state is not None and initial_state.shape != expected:
    raise ValueError(
      f"initial_state must be [batch, v_heads, head_dim, head_dim_v] = {expected}, "
      f"got {initial_state.shape}"
    )


def gated_delta_rule(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  g: jax.Array,
  beta: jax.Array,
  *,
  scale: float | None = None,
  initial_state: jax.Array | None = None,
  output_final_state: bool = False,
  chunk_size: int = 64,
  implementation: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """The gated delta rule, causal over time (fla's `chunk_gated_delta_rule`
  with q and k already L2-normalised by the caller):

      S_t = e^{g_t} S_{t-1} + k_t u_tᵀ,   u_t = β_t (v_t − (e^{g_t} S_{t-1})ᵀ k_t)
      o_t = S_tᵀ (scale · q_t)

  Args:
    q, k: [batch, time, heads, head_dim]
    v: [batch, time, v_heads, head_dim_v]; v_heads a multiple of heads (grouped
      value heads share a q/k head).
    g: [batch, time, v_heads] log decay (≤ 0). beta: [batch, time, v_heads].
    scale: default head_dim**-0.5.
    initial_state: [batch, v_heads, head_dim, head_dim_v] or None (zeros).
    output_final_state: also return the state after the last step.
    chunk_size: chunk length of the parallel form; any T works.
    implementation: None (best for backend), 'xla' (chunked) or 'reference'
      (the recurrence).

  Returns:
    (o [batch, time, v_heads, head_dim_v] in q.dtype, final state in the
    compute dtype, or None).
  """
  _check(q, k, v, g, beta, initial_state)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  impl = _dtypes.resolve_implementation(implementation, tuple(_IMPLEMENTATIONS), "gated_delta_rule")
  dtype = _dtypes.compute_dtype(q, k, v)
  group = v.shape[2] // q.shape[2]
  qc, kc = (jnp.repeat(a.astype(dtype), group, axis=2) for a in (q, k))
  state = (
    jnp.zeros((v.shape[0], v.shape[2], q.shape[3], v.shape[3]), dtype)
    if initial_state is None
    else initial_state.astype(dtype)
  )
  o, final = _IMPLEMENTATIONS[impl].gated_delta_rule(
    qc,
    kc,
    v.astype(dtype),
    g.astype(dtype),
    beta.astype(dtype),
    scale=_dtypes.default_scale(q.shape[-1], scale),
    initial_state=state,
    chunk_size=chunk_size,
  )
  return o.astype(q.dtype), final if output_final_state else None
