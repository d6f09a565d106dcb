"""Public causal linear attention op with backend dispatch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnlab.ops import _dispatch

_DISPATCH = _dispatch.Dispatch(
  op="linear_attention",
  package="attnlab.ops.linear",
  implementations=("xla", "reference", "pallas_tpu", "pallas_gpu"),
  preferred={"tpu": ("pallas_tpu",), "gpu": ("pallas_gpu",)},
)

# With normalize=True the state is a pair (kv [B,H,D,Dv], k_sum [B,H,D]).
LinearState = jax.Array | tuple[jax.Array, jax.Array]


def linear_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  normalize: bool = False,
  scale: float | None = None,
  initial_state: LinearState | None = None,
  output_final_state: bool = False,
  chunk_size: int = 64,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
) -> tuple[jax.Array, LinearState | None]:
  """Causal linear attention, o_t = scale · Σ_{s≤t} (q_t·k_s) v_s.

  Feature maps are the caller's job; this op sees already-mapped q and k.

  Args:
    q, k: [batch, time, heads, head_dim]
    v: [batch, time, heads, head_dim_v]
    normalize: divide by Σ_{s≤t} q_t·k_s instead of multiplying by `scale`.
    scale: default head_dim**-0.5 (unused when normalize).
    initial_state: kv [batch, heads, head_dim, head_dim_v]; with normalize the
      pair (kv, k_sum [batch, heads, head_dim]).
    output_final_state: also return the state after the last step.
    chunk_size: chunk length of the parallel form; any T works.
    segment_ids: [batch, time] int or None (one sequence per row). Packed
      documents: a document starts wherever the id changes and no state passes
      between documents; initial_state applies to each row's first document,
      the final state is its last document's.
    implementation: None (best for the platform compiled for: 'pallas_tpu' on
      TPU, 'pallas_gpu' on GPU, 'xla' elsewhere and for float64), 'xla'
      (chunked, a prefix sum over chunk states), 'reference' (the
      recurrence), 'pallas_tpu' or 'pallas_gpu' (the gated delta rule's
      state-pass kernels with no correction and no decay; the state stays on
      chip, so no per-chunk state is written).

  Returns:
    (o [batch, time, heads, head_dim_v] in q.dtype, final state or None).
  """
  if q.ndim != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
    raise ValueError(
      "linear_attention expects q, k [batch, time, heads, head_dim] of equal "
      f"shape and v [batch, time, heads, head_dim_v]; got q{q.shape} "
      f"k{k.shape} v{v.shape}"
    )
  if segment_ids is not None and (
    segment_ids.shape != q.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer)
  ):
    raise ValueError(
      f"segment_ids must be integer [batch, time] = {q.shape[:2]}, "
      f"got {segment_ids.dtype}{segment_ids.shape}"
    )
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  impl = _DISPATCH.choose(implementation, q, k, v)
  backend = _DISPATCH.module(impl)
  run = lambda q, k, v, initial_state, segment_ids: backend.linear_attention(
    q, k, v,
    normalize=normalize,
    scale=scale,
    initial_state=initial_state,
    output_final_state=output_final_state,
    chunk_size=chunk_size,
    segment_ids=segment_ids,
  )  # fmt: skip
  if impl.startswith("pallas"):  # XLA cannot partition a kernel: one call per batch shard
    run = functools.partial(_dispatch.per_shard, run)
  return run(q, k, v, initial_state, segment_ids)
