"""Public causal softmax attention ops with backend dispatch.

Implementations: 'xla' (dense, any backend), 'reference' (per-query oracle),
'pallas_tpu' and 'pallas_gpu' (flash kernels, `attnlab.ops.flash`; on other
backends they run in interpret mode), 'splash' (jax's splash attention
kernel, TPU; interpreted elsewhere) and 'cudnn'
(`jax.nn.dot_product_attention`, GPU only).

The rule of `implementation=None`: on GPU cuDNN where it takes the inputs,
else our flash kernel; on TPU splash attention, which MaxText runs at scale,
until a TPU measurement shows our flash kernel ahead (ours stays selectable as
'pallas_tpu'); 'xla' on other backends and for float64. The kernel paths serve full
sequences; `softmax_attention_cached` (prefill chunks, decoding) runs 'xla'
for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _dispatch, _segments


def _eligible(kernel: str, arrays) -> bool:
  """cuDNN's limits: one 16-bit dtype, head_dim <= 128 and a multiple of 8,
  equal q/v head dims, no packed documents; splash's: not under
  jax_enable_x64. Our Pallas kernels take any KERNEL_DTYPES input."""
  if kernel == "splash":
    return not jax.config.jax_enable_x64
  if kernel != "cudnn":
    return True
  q, k, v = arrays[:3]
  d = q.shape[-1]
  # segment_ids are the one integer input; cuDNN's call here takes no document masks.
  packed = any(jnp.issubdtype(a.dtype, jnp.integer) for a in arrays[3:])
  return not packed and (
    len({q.dtype, k.dtype, v.dtype}) == 1 and q.dtype.itemsize == 2 and d <= 128 and d % 8 == 0
    and v.shape[-1] == d
  )  # fmt: skip


_DISPATCH = _dispatch.Dispatch(
  op="softmax_attention",
  package="attnlab.ops.softmax",
  implementations=("xla", "reference", "pallas_tpu", "pallas_gpu", "cudnn", "splash"),
  preferred={"tpu": ("splash", "pallas_tpu"), "gpu": ("cudnn", "pallas_gpu")},
  eligible=_eligible,
)


def _check(q: jax.Array, k: jax.Array, v: jax.Array, logit_scale) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
      "softmax_attention expects [batch, time, heads, head_dim] arrays; got "
      f"q{q.shape} k{k.shape} v{v.shape}"
    )
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k{k.shape} and v{v.shape} disagree on batch/time/heads")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"q{q.shape} and k{k.shape} disagree on head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(
      f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]}) for GQA"
    )
  if logit_scale is not None and logit_scale.shape != q.shape[:3]:
    raise ValueError(
      f"logit_scale must be [batch, time, heads] = {q.shape[:3]}, got {logit_scale.shape}"
    )


def softmax_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float | None = None,
  logit_scale: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """Causal softmax attention with GQA.

  Args:
    q: [batch, time, heads, head_dim]
    k: [batch, time, kv_heads, head_dim]; kv_heads divides heads.
    v: [batch, time, kv_heads, head_dim_v]
    scale: logit scale, default head_dim**-0.5.
    logit_scale: optional [batch, time, heads] multiplier of each query's
      logits (selective attention's temperature).
    segment_ids: optional [batch, time] int document ids of packed rows: a
      query sees only earlier keys of its own document (`attnlab.ops._segments`).
    implementation: None (best for the platform compiled for: 'splash'
      on TPU, 'cudnn' or 'pallas_gpu' on GPU, 'xla' elsewhere and for
      float64), 'xla', 'reference', 'pallas_tpu', 'pallas_gpu', 'splash' or
      'cudnn'.

  Returns:
    [batch, time, heads, head_dim_v] in q.dtype.
  """
  _check(q, k, v, logit_scale)
  if q.shape[1] != k.shape[1]:
    raise ValueError(
      f"q has {q.shape[1]} steps but k has {k.shape[1]}; use "
      "softmax_attention_cached for queries against a cache"
    )
  _segments.check(segment_ids, q.shape[:2], "softmax_attention")
  module = _DISPATCH.module(implementation, q, k, v, segment_ids)
  if segment_ids is None:
    call = lambda q, k, v, ls: module.softmax_attention(q, k, v, scale=scale, logit_scale=ls)
    return _dispatch.per_shard(call, q, k, v, logit_scale)
  call = lambda q, k, v, ls, seg: module.softmax_attention(
    q, k, v, scale=scale, logit_scale=ls, segment_ids=seg
  )
  return _dispatch.per_shard(call, q, k, v, logit_scale, segment_ids)


def softmax_attention_cached(
  q: jax.Array,
  k_cache: jax.Array,
  v_cache: jax.Array,
  cache_length: jax.Array | int,
  *,
  scale: float | None = None,
  logit_scale: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """New queries against a KV cache (prefill chunks and decoding).

  The queries sit at positions `cache_length - Tq, ..., cache_length - 1`;
  the cache already holds their keys/values. Cache rows at or past
  `cache_length` are masked out.

  Args:
    q: [batch, q_time, heads, head_dim]
    k_cache: [batch, max_time, kv_heads, head_dim]
    v_cache: [batch, max_time, kv_heads, head_dim_v]
    cache_length: scalar int, the number of valid cache rows.
    segment_ids: optional [batch, max_time] int document ids of the cache
      rows, the queries' own rows included (packed prompts): a query sees
      only the keys of its own document.

  Returns:
    [batch, q_time, heads, head_dim_v] in q.dtype. The kernel implementations
    run 'xla' here.
  """
  _check(q, k_cache, v_cache, logit_scale)
  _segments.check(segment_ids, k_cache.shape[:2], "softmax_attention_cached")
  _DISPATCH.choose(implementation)  # validates the name
  impl = "reference" if implementation == "reference" else "xla"
  return _DISPATCH.module(impl).softmax_attention_cached(
    q, k_cache, v_cache, cache_length, scale=scale, logit_scale=logit_scale,
    segment_ids=segment_ids,
  )  # fmt: skip
