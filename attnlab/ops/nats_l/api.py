"""NAtS-L's block-routed operators (Deng et al., 2026), with dispatch.

The sequence is cut into blocks of `block_size` tokens and every (batch,
block, head) has a type: softmax attention or gated delta rule. A block's
type matters only to later blocks, so both operators stay causal:

* `block_sparse_softmax`: each query sees all keys of earlier blocks typed
  attention plus its own block's causal prefix.
* `block_gated_delta_rule`: only complete delta-typed blocks write into the
  state, the decay runs through every block, and each query also runs the
  delta rule over its own block's prefix, starting from the current state.

Decoding reads a block-compacted KV cache (`block_sparse_softmax_cached` for
tokens of the current block, `block_sparse_softmax_prefill` for a chunk of
whole blocks) and continues the delta state with `initial_state`.

Types enter as gates in [0, 1] (hard 0/1 in the forward pass), so a
straight-through estimator upstream gets d(loss)/d(gate): for a softmax gate
that is the sum of the score gradients over the block's key columns, for a
delta gate ⟨dS_end, ΔS_block⟩.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnlab.ops import _dispatch, _dtypes, _segments
from attnlab.ops.nats_l import xla


def _delta_kernel_fits(impl: str, block_size: int) -> bool:
  """The kernels run chunk = block: TPU tiles take multiples of 8, Triton powers of two ≥ 16."""
  if impl == "pallas_tpu":
    return block_size % 8 == 0
  if impl == "pallas_gpu":
    return block_size >= 16 and block_size & (block_size - 1) == 0
  return True


_DELTA = _dispatch.Dispatch(
  op="block_gated_delta_rule",
  package="attnlab.ops.nats_l",
  implementations=("xla", "reference", "pallas_tpu", "pallas_gpu"),
  preferred={"tpu": ("pallas_tpu",), "gpu": ("pallas_gpu",)},
)
_SPARSE_SOFTMAX = _dispatch.Dispatch(
  op="block_sparse_softmax",
  package="attnlab.ops.nats_l",
  implementations=("xla", "reference", "pallas_tpu", "pallas_gpu"),
  preferred={"tpu": ("pallas_tpu",), "gpu": ("pallas_gpu",)},
)
_PREFILL = _dispatch.Dispatch(
  op="block_sparse_softmax_prefill",
  package="attnlab.ops.nats_l",
  implementations=("xla", "reference"),
)
_KERNELS = ("pallas_tpu", "pallas_gpu")


def _num_blocks(t: int, block_size: int) -> int:
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}")
  return -(-t // block_size)


def _check_gate(name: str, gate: jax.Array, q: jax.Array, heads: int, block_size: int) -> None:
  expected = (q.shape[0], _num_blocks(q.shape[1], block_size), heads)
  if gate.shape != expected:
    raise ValueError(f"{name} must be [batch, num_blocks, heads] = {expected}, got {gate.shape}")


def block_gated_delta_rule(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  g: jax.Array,
  beta: jax.Array,
  block_write: jax.Array,
  *,
  block_size: int = 64,
  scale: float | None = None,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
  **kernel_options,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Gated delta rule whose state is written only by delta-typed blocks.

  Args:
    q, k: [batch, time, heads, head_dim] (L2-normalised by the caller).
    v: [batch, time, heads, head_dim_v]
    g: [batch, time, heads] log decay (≤ 0). beta: [batch, time, heads].
    block_write: [batch, ceil(time / block_size), heads] gate of each block's
      write into the state (1 = delta-typed). An incomplete last block never
      writes.
    block_size: tokens per block.
    scale: default head_dim**-0.5.
    initial_state: [batch, heads, head_dim, head_dim_v], the state before the
      first token, which starts a block (None: zeros). Lets a prefill run
      whole blocks from a decoding cache.
    return_final_state: also return the state after the last block; time must
      then be a multiple of block_size (an incomplete block has no type yet).
    segment_ids: optional [batch, time] int document ids of packed rows, each
      document starting on a block boundary (the text pipeline lays packed
      rows out so for NAtS-L; `data.pack_align`): the state restarts at each
      document. An initial state belongs to the row's first document.
    implementation: None (best for the platform compiled for: the chunked
      state-pass kernel 'pallas_tpu' / 'pallas_gpu' where the block size
      fits its tiles, else 'xla'), 'xla' (chunked), 'reference' (recurrence),
      'pallas_tpu' or 'pallas_gpu'.
    kernel_options: passed to a kernel (e.g. `interpret`, `block_v`).

  Returns:
    o [batch, time, heads, head_dim_v] in q.dtype; with return_final_state
    (o, state [batch, heads, head_dim, head_dim_v] in the compute dtype, at
    least float32).
  """
  if q.ndim != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(
      f"expected q, k [B,T,H,K] and v [B,T,H,V]; got q{q.shape} k{k.shape} v{v.shape}"
    )
  if g.shape != q.shape[:3] or beta.shape != q.shape[:3]:
    raise ValueError(f"g and beta must be [batch, time, heads] = {q.shape[:3]}")
  _check_gate("block_write", block_write, q, q.shape[2], block_size)
  b, t, h, dk = q.shape
  state_shape = (b, h, dk, v.shape[3])
  if initial_state is not None and initial_state.shape != state_shape:
    raise ValueError(f"initial_state must be {state_shape}, got {initial_state.shape}")
  if return_final_state and t % block_size:
    raise ValueError(
      f"return_final_state needs whole blocks: time {t} is not a multiple of {block_size}"
    )
  _segments.check(segment_ids, q.shape[:2], "block_gated_delta_rule")
  impl = _DELTA.choose(implementation, q, k, v)
  if implementation is None and not _delta_kernel_fits(impl, block_size):
    impl = "xla"
  dtype = _dtypes.compute_dtype(q, k, v)
  state = jnp.zeros(state_shape, dtype) if initial_state is None else initial_state
  # The kernels take q, k, v as matmul operands in their own dtype (bf16 stays
  # bf16, f32 accumulation); the xla path and the oracle compute in `dtype`.
  operand = jnp.result_type(q, k, v) if impl.startswith("pallas") else dtype
  run = lambda q, k, v, g, beta, block_write, state, seg: _DELTA.module(
    impl
  ).block_gated_delta_rule(
    q, k, v, g, beta, block_write, state,
    block_size=block_size,
    scale=_dtypes.default_scale(dk, scale),
    segment_ids=seg,
    **(kernel_options if impl.startswith("pallas") else {}),
  )  # fmt: skip
  if impl.startswith("pallas"):  # XLA cannot partition a kernel: one call per batch shard
    run = functools.partial(_dispatch.per_shard, run)
  o, final = run(
    *(jnp.asarray(a, operand) for a in (q, k, v)),
    *(jnp.asarray(a, dtype) for a in (g, beta, block_write, state)),
    segment_ids,
  )
  return (o.astype(q.dtype), final) if return_final_state else o.astype(q.dtype)


def block_sparse_softmax(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  block_visible: jax.Array,
  *,
  block_size: int = 64,
  scale: float | None = None,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
  **kernel_options,
) -> jax.Array:
  """Causal softmax over earlier attention-typed blocks plus the own block.

  Args:
    q, k: [batch, time, heads, head_dim]; v: [batch, time, heads, head_dim_v].
    block_visible: [batch, ceil(time / block_size), heads] multiplicative
      weight of each block's keys for later queries (1 = attention-typed).
    block_size: tokens per block.
    scale: default head_dim**-0.5.
    segment_ids: optional [batch, time] int document ids of packed rows: a
      query sees only its own document. Documents must start on block
      boundaries (the text pipeline lays packed rows out so for NAtS-L;
      `data.pack_align`); the kernels read one document per block (its first
      token's) and skip the key blocks of other documents, so a document
      starting inside a block is not kept apart there (not checked).
    implementation: None (the kernel of the compile target: 'pallas_tpu' on
      TPU, 'pallas_gpu' on GPU, when the block size suits it; else 'xla'),
      'xla' (dense mask), 'reference' (per query), 'pallas_tpu' or
      'pallas_gpu' (block-sparse kernels that visit only attention-typed key
      blocks; interpreted off their hardware). The kernels' gate gradient is
      zero for zero gates, as the other paths'.
    kernel_options: passed to the kernel (e.g. `interpret`).

  Returns:
    o [batch, time, heads, head_dim_v] in q.dtype.
  """
  if q.ndim != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(
      f"expected q, k [B,T,H,D] and v [B,T,H,Dv]; got q{q.shape} k{k.shape} v{v.shape}"
    )
  _check_gate("block_visible", block_visible, q, q.shape[2], block_size)
  _segments.check(segment_ids, q.shape[:2], "block_sparse_softmax")
  impl = _SPARSE_SOFTMAX.choose(implementation, q, k, v)
  if implementation is None and impl in _KERNELS and not _kernel_block_ok(impl, block_size):
    impl = "xla"
  scale = _dtypes.default_scale(q.shape[-1], scale)
  if impl in _KERNELS:
    module = _SPARSE_SOFTMAX.module(impl)
    kernel = lambda q, k, v, gates, seg: module.block_sparse_softmax(
      q, k, v, gates, block_size=block_size, scale=scale, segment_ids=seg, **kernel_options
    )
    # One call per batch shard.
    return _dispatch.per_shard(kernel, q, k, v, block_visible, segment_ids)
  dtype = _dtypes.compute_dtype(q, k, v)
  o = _SPARSE_SOFTMAX.module(impl).block_sparse_softmax(
    *(jnp.asarray(a, dtype) for a in (q, k, v, block_visible)),
    block_size=block_size,
    scale=scale,
    segment_ids=segment_ids,
  )
  return o.astype(q.dtype)


def _kernel_block_ok(impl: str, block_size: int) -> bool:
  """TPU tiles need a multiple of 8 rows; Triton dots a power of two >= 16."""
  if impl == "pallas_tpu":
    return block_size % 8 == 0
  return block_size >= 16 and block_size & (block_size - 1) == 0


def block_sparse_softmax_cached(
  q: jax.Array,
  k_slots: jax.Array,
  v_slots: jax.Array,
  num_blocks: jax.Array,
  block_length: jax.Array | int,
  *,
  scale: float | None = None,
) -> jax.Array:
  """NAtS-L's softmax for new tokens of the current block, against the block-compacted cache.

  The cache keeps, per head, only the attention-typed blocks (compacted into
  slots 0 .. num_blocks−1, in order) and the current block (slot
  num_blocks); delta-typed blocks take no KV. Valid because NAtS-L's
  softmax path is NoPE, so a key's slot does not change its logit.

  Args:
    q: [batch, Tq, heads, head_dim], the last Tq tokens of the current block
      (a decoding step: Tq = 1; a prefill chunk inside one block: Tq > 1).
    k_slots: [batch, slots, block_size, heads, head_dim]; v_slots likewise
      with head_dim_v. The current block's rows up to `block_length` (the new
      tokens included) must already be written.
    num_blocks: [batch, heads] int, attention-typed blocks cached per head.
    block_length: tokens of the current block so far, Tq <= it <= block_size.
    scale: default head_dim**-0.5.

  Returns:
    [batch, Tq, heads, head_dim_v] in q.dtype (the same rows as
    `block_sparse_softmax` over the whole sequence).
  """
  b, tq, h, d = q.shape
  if k_slots.ndim != 5 or k_slots.shape[0] != b or k_slots.shape[3:] != (h, d):
    raise ValueError(f"k_slots must be [batch, slots, block, {h}, {d}], got {k_slots.shape}")
  if v_slots.shape[:4] != k_slots.shape[:4]:
    raise ValueError(f"v_slots{v_slots.shape} must match k_slots{k_slots.shape} but for head_dim")
  if num_blocks.shape != (b, h):
    raise ValueError(f"num_blocks must be [batch, heads] = {(b, h)}, got {num_blocks.shape}")
  if tq > k_slots.shape[2]:
    raise ValueError(f"{tq} queries do not fit in one block of {k_slots.shape[2]}")
  dtype = _dtypes.compute_dtype(q, k_slots, v_slots)
  o = xla.block_sparse_softmax_cached(
    *(a.astype(dtype) for a in (q, k_slots, v_slots)),
    num_blocks,
    block_length,
    scale=_dtypes.default_scale(d, scale),
  )
  return o.astype(q.dtype)


def block_sparse_softmax_prefill(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  block_visible: jax.Array,
  k_slots: jax.Array,
  v_slots: jax.Array,
  num_blocks: jax.Array,
  *,
  scale: float | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """NAtS-L's softmax for a prefill chunk that starts at a block boundary.

  Each query sees (a) every cached attention-typed block of its head (slots
  0 .. num_blocks−1 of the block-compacted cache, see
  `block_sparse_softmax_cached`; all earlier than the chunk, so fully
  visible), (b) the chunk's earlier blocks weighted by `block_visible`, and
  (c) its own block's causal prefix: the rows `block_sparse_softmax` gives
  these tokens over the whole sequence.

  Args:
    q, k: [batch, time, heads, head_dim]; v: [batch, time, heads, head_dim_v],
      the chunk's tokens (time need not be a multiple of the block size).
    block_visible: [batch, ceil(time / block_size), heads] weights of the
      chunk's blocks for its later queries (1 = attention-typed).
    k_slots: [batch, slots, block_size, heads, head_dim]; v_slots likewise
      with head_dim_v. Slots from num_blocks on are ignored.
    num_blocks: [batch, heads] int, attention-typed blocks cached per head.
    scale: default head_dim**-0.5.
    implementation: None or 'xla' (dense [time, slots·block + time] logits),
      'reference' (per query).

  Returns:
    o [batch, time, heads, head_dim_v] in q.dtype.
  """
  if q.ndim != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(
      f"expected q, k [B,T,H,D] and v [B,T,H,Dv]; got q{q.shape} k{k.shape} v{v.shape}"
    )
  b, _, h, d = q.shape
  if k_slots.ndim != 5 or k_slots.shape[0] != b or k_slots.shape[3:] != (h, d):
    raise ValueError(f"k_slots must be [batch, slots, block, {h}, {d}], got {k_slots.shape}")
  if v_slots.shape != (*k_slots.shape[:4], v.shape[3]):
    raise ValueError(f"v_slots{v_slots.shape} must match k_slots{k_slots.shape} but for head_dim")
  if num_blocks.shape != (b, h):
    raise ValueError(f"num_blocks must be [batch, heads] = {(b, h)}, got {num_blocks.shape}")
  _check_gate("block_visible", block_visible, q, h, k_slots.shape[2])
  dtype = _dtypes.compute_dtype(q, k, v, k_slots, v_slots)
  o = _PREFILL.module(implementation or "xla").block_sparse_softmax_prefill(
    *(jnp.asarray(a, dtype) for a in (q, k, v, block_visible, k_slots, v_slots)),
    num_blocks,
    scale=_dtypes.default_scale(d, scale),
  )
  return o.astype(q.dtype)
