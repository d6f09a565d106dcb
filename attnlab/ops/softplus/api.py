"""Softplus attention with re-weighting (Gao & Spratling, 2026): LSSA and LSSAR.

LSSA, for query i (1-based) and keys j ≤ i, with q̂, k̂ L2-normalised:

    A_ij = softplus(log D · log i · q̂_i·k̂_j),   rows L1-normalised

LSSAR (`power=p`) then sharpens: A ← ReLU(A_ij·i − O_i)^p, O_i = 0 for i ≤ 3
and 1 after, and renormalises; a row that vanishes outputs 0. No parameters,
no 1/√D. Rows are divided by their maximum before the power, which leaves the
result unchanged and keeps p = 15 inside float32 range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _dispatch, _dtypes, _segments

_DISPATCH = _dispatch.Dispatch(
  op="softplus_attention",
  package="attnlab.ops.softplus",
  implementations=("xla", "reference", "pallas_tpu", "pallas_gpu"),
  preferred={"tpu": ("pallas_tpu",), "gpu": ("pallas_gpu",)},
)
# The flash kernels serve full sequences; the cached op runs 'xla' for them.
_KERNELS = ("pallas_tpu", "pallas_gpu")


def _check(q, k, v, power, name) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3]:
    raise ValueError(f"{name}: expected [B,T,H,D] arrays; got q{q.shape} k{k.shape} v{v.shape}")
  if q.shape[2] % k.shape[2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"{name}: q{q.shape} and k{k.shape} need equal head_dim and GQA heads")
  if power is not None and power <= 0:
    raise ValueError(f"{name}: power must be positive or None (LSSA), got {power}")


def _run(q, k, v, power, query_positions, key_length, implementation, name, segment_ids=None):
  """The dense paths ('xla', 'reference') on GQA-expanded keys and values."""
  _check(q, k, v, power, name)
  impl = "reference" if _DISPATCH.choose(implementation) == "reference" else "xla"
  dtype = _dtypes.compute_dtype(q, k, v)
  group = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(jnp.asarray(a, dtype), group, axis=2) for a in (k, v))
  o = _DISPATCH.module(impl).softplus_attention(
    jnp.asarray(q, dtype), k, v, power=power, query_positions=query_positions,
    key_length=key_length, segment_ids=segment_ids,
  )  # fmt: skip
  return o.astype(q.dtype)


def softplus_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  power: float | None = None,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """Causal LSSA (power=None) or LSSAR (power=p).

  Args:
    q: [batch, time, heads, head_dim]; k: [batch, time, kv_heads, head_dim];
    v: [batch, time, kv_heads, head_dim_v]; kv_heads divides heads.
    power: None for LSSA; p (e.g. 3 or 15) for LSSAR.
    segment_ids: optional [batch, time] int document ids of packed rows: a
      query sees only its own document's earlier keys, and the row index i
      (in log i, and LSSAR's i and O_i) is its position within the document.
    implementation: None (the Pallas kernel when compiled for a TPU or GPU,
      else 'xla'), 'xla' (dense scores), 'reference' (per row), 'pallas_tpu' or
      'pallas_gpu' (flash kernels; interpreted on other backends).

  Returns:
    [batch, time, heads, head_dim_v] in q.dtype.
  """
  if q.shape[1] != k.shape[1]:
    raise ValueError("softplus_attention: q and k lengths differ; use softplus_attention_cached")
  _segments.check(segment_ids, q.shape[:2], "softplus_attention")
  implementation = _DISPATCH.choose(implementation, q, k, v)
  if implementation in _KERNELS:
    _check(q, k, v, power, "softplus_attention")
    kernel = _DISPATCH.module(implementation).softplus_attention
    if segment_ids is None:
      return _dispatch.per_shard(lambda q, k, v: kernel(q, k, v, power=power), q, k, v)
    call = lambda q, k, v, seg: kernel(q, k, v, power=power, segment_ids=seg)
    return _dispatch.per_shard(call, q, k, v, segment_ids)
  t = q.shape[1]
  return _run(q, k, v, power, jnp.arange(t), t, implementation, "softplus_attention", segment_ids)


def softplus_attention_cached(
  q: jax.Array,
  k_cache: jax.Array,
  v_cache: jax.Array,
  cache_length: jax.Array | int,
  *,
  power: float | None = None,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """New queries against a KV cache: q [B, Tq, H, D] sits at absolute
  positions cache_length − Tq … cache_length − 1, so log i stays correct.

  segment_ids: optional [batch, max_time] int document ids of the cache rows,
  the queries' own rows included (packed prompts): a query sees only its own
  document, and i is its position within it."""
  _segments.check(segment_ids, k_cache.shape[:2], "softplus_attention_cached")
  tq = q.shape[1]
  positions = cache_length - tq + jnp.arange(tq)
  return _run(
    q, k_cache, v_cache, power, positions, cache_length, implementation,
    "softplus_attention_cached", segment_ids,
  )  # fmt: skip
