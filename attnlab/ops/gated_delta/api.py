"""Public gated delta rule ops (Gated DeltaNet, Yang et al., 2025) with dispatch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnlab.ops import _dispatch, _dtypes
from attnlab.ops.gated_delta import xla

_DISPATCH = _dispatch.Dispatch(
  op="gated_delta_rule",
  package="attnlab.ops.gated_delta",
  implementations=("xla", "reference", "pallas_tpu", "pallas_gpu"),
  preferred={"tpu": ("pallas_tpu",), "gpu": ("pallas_gpu",)},
)


def _check(q, k, v, g, beta, initial_state, segment_ids) -> None:
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
  if segment_ids is not None and (
    segment_ids.shape != q.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
  ):
    raise ValueError(
      f"segment_ids must be integer [batch, time] = {q.shape[:2]}, "
      f"got {segment_ids.dtype}{segment_ids.shape}"
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
  segment_ids: jax.Array | None = None,
  inverse_dtype: jnp.dtype | str | None = None,
  implementation: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """The gated delta rule, causal over time (fla's `chunk_gated_delta_rule`
  with q and k already L2-normalised by the caller):

      S_t = e^{g_t} S_{t-1} + k_t u_tᵀ,   u_t = β_t (v_t − (e^{g_t} S_{t-1})ᵀ k_t)
      o_t = S_tᵀ (scale · q_t)

  Args:
    q, k: [batch, time, heads, head_dim]
    v: [batch, time, v_heads, head_dim_v]; v_heads a multiple of heads (grouped
      value heads share a q/k head; q and k are not repeated).
    g: [batch, time, v_heads] log decay (≤ 0). beta: [batch, time, v_heads].
    scale: default head_dim**-0.5.
    initial_state: [batch, v_heads, head_dim, head_dim_v] or None (zeros).
    output_final_state: also return the state after the last step.
    chunk_size: chunk length of the parallel form; any T works.
    segment_ids: [batch, time] int or None (one sequence per row). Packed
      documents: a document starts wherever the id changes; no state passes
      between documents. initial_state applies to each row's first document,
      the final state is its last document's.
    inverse_dtype: dtype of the in-chunk inverse (I + A)⁻¹ and of its products.
      None: float32 (float64 for float64 inputs), also for bf16 inputs, since
      bf16 destabilises the inverse; 'bfloat16' trades that for speed.
    implementation: None (best for the platform compiled for: 'pallas_tpu' on
      TPU, 'pallas_gpu' on GPU, 'xla' elsewhere and for float64), 'xla'
      (chunked), 'reference' (the recurrence), 'pallas_tpu' or 'pallas_gpu'.

  Precision: the matmuls take q/k/v's dtype as operands (bf16 stays bf16)
  and accumulate in float32 (preferred_element_type); float32 operands run at
  Precision.HIGHEST. g, beta and the state are kept in float32.

  Returns:
    (o [batch, time, v_heads, head_dim_v] in q.dtype, final state in the
    compute dtype, or None).
  """
  _check(q, k, v, g, beta, initial_state, segment_ids)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  impl = _DISPATCH.choose(implementation, q, k, v)
  backend = _DISPATCH.module(impl)
  dtype = _dtypes.compute_dtype(q, k, v)
  operand = jnp.result_type(q, k, v)
  state = (
    jnp.zeros((v.shape[0], v.shape[2], q.shape[3], v.shape[3]), dtype)
    if initial_state is None
    else initial_state.astype(dtype)
  )
  run = lambda q, k, v, g, beta, state, segment_ids: backend.gated_delta_rule(
    q, k, v, g, beta,
    scale=_dtypes.default_scale(q.shape[-1], scale),
    initial_state=state,
    chunk_size=chunk_size,
    segment_ids=segment_ids,
    inverse_dtype=None if inverse_dtype is None else jnp.dtype(inverse_dtype),
  )  # fmt: skip
  if impl.startswith("pallas"):  # XLA cannot partition a kernel: one call per batch shard
    run = functools.partial(_dispatch.per_shard, run)
  o, final = run(
    q.astype(operand), k.astype(operand), v.astype(operand), g.astype(dtype), beta.astype(dtype),
    state, segment_ids,
  )  # fmt: skip
  return o.astype(q.dtype), final if output_final_state else None


def gated_delta_rule_step(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  g: jax.Array,
  beta: jax.Array,
  state: jax.Array,
  *,
  scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step of the gated delta rule (the recurrence for one token).

  Args:
    q, k: [batch, heads, head_dim] (L2-normalised by the caller).
    v: [batch, v_heads, head_dim_v], v_heads a multiple of heads.
    g, beta: [batch, v_heads].
    state: [batch, v_heads, head_dim, head_dim_v].
    scale: default head_dim**-0.5.

  Returns:
    (o [batch, v_heads, head_dim_v] in q.dtype, new state in the compute
    dtype, at least float32).
  """
  if q.ndim != 3 or q.shape != k.shape or v.ndim != 3 or v.shape[0] != q.shape[0]:
    raise ValueError(
      "gated_delta_rule_step expects q, k [batch, heads, head_dim] of equal shape and "
      f"v [batch, v_heads, head_dim_v]; got q{q.shape} k{k.shape} v{v.shape}"
    )
  if v.shape[1] % q.shape[1]:
    raise ValueError(f"v heads ({v.shape[1]}) must be a multiple of q/k heads ({q.shape[1]})")
  expected = (v.shape[0], v.shape[1], q.shape[2], v.shape[2])
  if g.shape != v.shape[:2] or beta.shape != v.shape[:2] or state.shape != expected:
    raise ValueError(
      f"g, beta must be [batch, v_heads] = {v.shape[:2]} and state {expected}; got "
      f"g{g.shape} beta{beta.shape} state{state.shape}"
    )
  dtype = _dtypes.compute_dtype(q, k, v, state)
  o, new_state = xla.gated_delta_rule_step(
    *(a.astype(dtype) for a in (q, k, v, g, beta, state)),
    scale=_dtypes.default_scale(q.shape[-1], scale),
  )
  return o.astype(q.dtype), new_state
