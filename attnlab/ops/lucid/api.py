"""LUCID attention (Duvvuri et al., 2026): softmax attention over
preconditioned values V′ = L⁻¹V, L = tril(exp(k̂k̂ᵀ/√D − √D)) with unit diagonal."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _dispatch, _dtypes, _segments
from attnlab.ops.lucid import _solve
from attnlab.ops.softmax.api import softmax_attention

_KERNELS = ("pallas_tpu", "pallas_gpu")
_VALUES = _dispatch.Dispatch(
  op="lucid_values",
  package="attnlab.ops.lucid",
  implementations=("xla", "reference", *_KERNELS),
  preferred={"tpu": ("pallas_tpu",), "gpu": ("pallas_gpu",)},
  eligible=lambda impl, arrays: _kernel_fits(impl, *arrays[:2]),
)


# Backends of the softmax part only: LUCID's attention names them for its
# softmax over V′; V′ itself then takes the path these stand for.
SOFTMAX_ONLY = {"cudnn": "xla", "splash": None}


def _kernel_fits(impl: str, k: jax.Array, v: jax.Array) -> bool:
  """The kernels keep a head's whole sequence on chip (TPU) or need Triton's shapes (GPU)."""
  if impl == "pallas_gpu":
    d = k.shape[-1]
    return d >= 16 and d & (d - 1) == 0
  return pallas_tpu_vmem_bytes(k.shape[1], k.shape[-1], v.shape[-1]) <= VMEM_BUDGET


VMEM_BUDGET = 90 * 2**20  # under v5p's 95 MiB of VMEM per core


def pallas_tpu_vmem_bytes(t: int, d: int, dv: int) -> int:
  """VMEM the TPU kernel's backward holds: k, V′, dV′, dk, dV in float32, double-buffered,
  padded to whole lane tiles (without the padding, D = 64 at T = 8K was counted at half its
  size and the kernel ran out of VMEM compiling for v5p: benchmarks.kernel_report, 2026-12-07)."""
  return _solve.tpu_resident_vmem_bytes(t, (d, d, dv, dv, dv))


def lucid_values(
  k: jax.Array,
  v: jax.Array,
  *,
  eps: float = 1e-5,
  context_keys: jax.Array | None = None,
  context_values: jax.Array | None = None,
  context_length: jax.Array | int = 0,
  block_size: int = 64,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
  **kernel_options,
) -> jax.Array:
  """Preconditioned values V′ = L⁻¹V, per kv head, computed in float32 or wider.

  Args:
    k: [batch, time, kv_heads, head_dim] raw keys (RMS-normalised inside).
    v: [batch, time, kv_heads, head_dim_v]
    eps: of the gain-free key RMS normalisation.
    context_keys, context_values: optional cache of earlier raw keys and their
      preconditioned values, [batch, cache_len, kv_heads, ...]; the first
      `context_length` rows are valid and precede the new tokens.
    block_size: rows per forward-substitution block; any T works.
    segment_ids: optional [batch, time] int document ids of packed rows: L has
      no entries between documents, so the solve restarts at each one (any
      layout: documents may start inside a block; trailing padding of its
      own id is a document like any other). Every path takes them; the
      kernels skip the blocks that share no document. With a context they
      are [batch, cache_len]: the cache rows' ids, the new tokens' at rows
      context_length .. context_length+time-1 (as the KV cache holds them;
      the 'xla' and 'reference' paths).
    implementation: None ('pallas_tpu' when compiling for TPU and the
      sequence fits in VMEM, 'pallas_gpu' when compiling for a GPU and
      head_dim is a power of two >= 16, else 'xla'), 'xla' (blocked solve, custom VJP),
      'reference' (the token recurrence), or 'pallas_tpu' / 'pallas_gpu'
      (one program per (batch, kv head) solving the whole sequence in the
      kernel, custom VJP by the transposed solve; interpreted off their
      hardware; float32 inside). The softmax-only names of
      `lucid_attention` are accepted too: 'cudnn' solves on 'xla', 'splash'
      as None does.
    kernel_options: passed to a kernel (e.g. `interpret`).

  Returns:
    V′ [batch, time, kv_heads, head_dim_v] in the compute dtype.
  """
  if k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3]:
    raise ValueError(f"expected k [B,T,H,D] and v [B,T,H,Dv]; got k{k.shape} v{v.shape}")
  if (context_keys is None) != (context_values is None):
    raise ValueError("context_keys and context_values go together")
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}")
  if context_keys is None:
    _segments.check(segment_ids, k.shape[:2], "lucid_values")
  else:
    _segments.check(segment_ids, (k.shape[0], context_keys.shape[1]), "lucid_values (context)")
  implementation = SOFTMAX_ONLY.get(implementation, implementation)
  impl = _VALUES.choose(implementation, k, v)
  if context_keys is not None and segment_ids is not None and impl in _KERNELS:
    impl = "xla"  # a prefill chunk of a packed prompt: the kernels solve full sequences
  dtype = _dtypes.compute_dtype(k, v)
  cast = lambda a: None if a is None else jnp.asarray(a, dtype)
  if impl in _KERNELS:  # one kernel call per batch shard under a mesh
    solve = lambda k, v, ck, cv, seg: _VALUES.module(impl).preconditioned_values(
      k, v, eps=eps, block_size=block_size, context_keys=ck, context_values=cv,
      context_length=context_length, segment_ids=seg, **kernel_options,
    )  # fmt: skip
    arrays = (*map(cast, (k, v, context_keys, context_values)), segment_ids)
    return _dispatch.per_shard(solve, *arrays)
  return _VALUES.module(impl).preconditioned_values(
    cast(k),
    cast(v),
    eps=eps,
    block_size=block_size,
    context_keys=cast(context_keys),
    context_values=cast(context_values),
    context_length=context_length,
    segment_ids=segment_ids,
  )


def lucid_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float | None = None,
  eps: float = 1e-5,
  block_size: int = 64,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """Causal softmax(q kᵀ·scale) V′ with raw keys in the softmax (GQA as in
  `softmax_attention`; V′ is formed per kv head, before repetition).

  Args:
    q: [batch, time, heads, head_dim]; k: [batch, time, kv_heads, head_dim];
    v: [batch, time, kv_heads, head_dim_v].
    segment_ids: optional [batch, time] int document ids of packed rows (the
      solve and the softmax both keep documents apart).

  Returns:
    [batch, time, heads, head_dim_v] in q.dtype.
  """
  # The softmax part can run on a flash kernel, V′ on the solve kernel of the same
  # backend (softmax-only names: see `lucid_values`).
  v_prime = lucid_values(
    k, v, eps=eps, block_size=block_size, segment_ids=segment_ids, implementation=implementation
  )
  return softmax_attention(
    q, k, v_prime, scale=scale, segment_ids=segment_ids, implementation=implementation
  )
