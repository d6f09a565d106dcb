"""NAtS-L's block-sparse causal softmax on NVIDIA GPUs (Pallas, Triton lowering).

Same tiling and block lists as the TPU kernel (`_sparse`): one
[block, block] tile per block pair. The lists are loaded in-kernel and the
loops run only over visible blocks, so skipped blocks cost nothing:

- forward and dq, grid (q_blocks, batch, heads): a loop over the
  before[i] earlier attention-typed blocks order[0 .. before[i]) without a
  mask, then the own block with the causal mask;
- dk/dv and the gate's gradient, grid (k_blocks, batch, heads): the own
  (diagonal) block, then, when the block is attention-typed, every later
  query block.

Packed documents (`segment_ids`, on block boundaries; `_sparse.document_lists`):
the forward and dq loops start at first[i] of `order` instead of 0, and the
dk/dv loop ends at end[j], the key block's document's last block, instead of
the last block; one more list input each.

Layout: [batch, time, heads, head_dim] as the op takes it; head_dim padded
to a power of two (>= 16), T to the block size, which must be a power of
two >= 16 (Triton's dot). Softmax logits are in log2 units (exp2), as in
`attnlab.ops.flash.pallas_gpu`, whose choice of the Triton lowering over
Mosaic GPU applies here too. Off GPU the kernels run in interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from attnlab.ops import _dispatch
from attnlab.ops.chunk_state import pallas_gpu as chunk_state
from attnlab.ops.flash import _common
from attnlab.ops.nats_l import _sparse

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b
_F32 = jnp.float32
LOG2_E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  block: int
  num_blocks: int
  interpret: bool
  num_warps: int = 4
  num_stages: int = 2
  packed: bool = False  # packed documents: one more list per kernel (first, end)

  def params(self):
    return pl_triton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _own_mask(block: int) -> jax.Array:
  rows = jnp.arange(block, dtype=jnp.int32)
  return rows[None, :] <= rows[:, None]


def _row_lists(refs, cfg):
  """(order, before, gate, first or None, the other refs) of a forward or dq kernel."""
  if cfg.packed:
    return (*refs[:4], refs[4:])
  return (*refs[:3], None, refs[3:])


def _fwd_kernel(*refs, cfg):
  order_ref, before_ref, gate_ref, first_ref, refs = _row_lists(refs, cfg)
  q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  bs = cfg.block
  i = pl.program_id(0)
  q = q_ref[...]
  scale = cfg.scale * LOG2_E

  def tile(key, carry, own: bool):
    acc, m, total = carry
    k_start = pl.multiple_of(key * bs, bs)
    u = lax.dot_general(q, k_ref[pl.ds(k_start, bs), :], _NT, preferred_element_type=_F32)
    s = jnp.where(_own_mask(bs), u * scale, _sparse.MASK_VALUE) if own else u * scale
    weight = 1.0 if own else gate_ref[key]
    e, m, total, corr = _sparse.online_softmax_step(s, weight, m, total, exp=jnp.exp2)
    v = v_ref[pl.ds(k_start, bs), :]
    pv = lax.dot_general(e.astype(v.dtype), v, _NN, preferred_element_type=_F32)
    return acc * corr + pv, m, total

  carry = (
    jnp.zeros(o_ref.shape, _F32),
    jnp.full((bs, 1), -jnp.inf, _F32),
    jnp.zeros((bs, 1), _F32),
  )
  first = 0 if first_ref is None else first_ref[i]
  carry = lax.fori_loop(first, before_ref[i], lambda j, c: tile(order_ref[j], c, False), carry)
  acc, m, total = tile(i, carry, True)
  o_ref[...] = (acc / total).astype(o_ref.dtype)
  lse_ref[...] = (m + jnp.log2(total))[:, 0]  # log2 units


def _dq_kernel(*refs, cfg):
  order_ref, before_ref, gate_ref, first_ref, refs = _row_lists(refs, cfg)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
  bs = cfg.block
  i = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  scale = cfg.scale * LOG2_E

  def tile(key, dq, own: bool):
    k_start = pl.multiple_of(key * bs, bs)
    k = k_ref[pl.ds(k_start, bs), :]
    u = lax.dot_general(q, k, _NT, preferred_element_type=_F32) * scale
    dp = lax.dot_general(do, v_ref[pl.ds(k_start, bs), :], _NT, preferred_element_type=_F32)
    mask = _own_mask(bs) if own else True
    weight = 1.0 if own else gate_ref[key]
    _, ds, _ = _sparse.backward_step(u, mask, dp, delta, lse, weight, base2=True)
    return dq + lax.dot_general(
      (ds * cfg.scale).astype(k.dtype), k, _NN, preferred_element_type=_F32
    )

  dq = jnp.zeros(q.shape, _F32)
  first = 0 if first_ref is None else first_ref[i]
  dq = lax.fori_loop(first, before_ref[i], lambda j, c: tile(order_ref[j], c, False), dq)
  dq_ref[...] = tile(i, dq, True).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg):
  gate_ref, end_ref = (refs[0], refs[1]) if cfg.packed else (refs[0], None)
  refs = refs[2:] if cfg.packed else refs[1:]
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dgate_ref = refs
  bs = cfg.block
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  weight = gate_ref[j]

  def tile(query, carry, own: bool):
    dk, dv, dgate = carry
    q_start = pl.multiple_of(query * bs, bs)
    rows = pl.ds(q_start, bs)
    q, do = q_ref[rows, :], do_ref[rows, :]
    u = lax.dot_general(q, k, _NT, preferred_element_type=_F32) * (cfg.scale * LOG2_E)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=_F32)
    lse, delta = lse_ref[rows][:, None], delta_ref[rows][:, None]
    mask = _own_mask(bs) if own else True
    p, ds, de = _sparse.backward_step(u, mask, dp, delta, lse, 1.0 if own else weight, base2=True)
    dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=_F32)
    dk = dk + lax.dot_general((ds * cfg.scale).astype(q.dtype), q, _TN, preferred_element_type=_F32)
    return dk, dv, dgate if own else dgate + jnp.sum(de)

  carry = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32), jnp.zeros((), _F32))
  carry = tile(j, carry, True)
  if end_ref is None:
    last = jnp.where(weight > 0, np.int32(cfg.num_blocks), j + 1)
  else:
    last = end_ref[j]
  dk, dv, dgate = lax.fori_loop(j + 1, last, lambda i, c: tile(i, c, False), carry)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dgate_ref[...] = jnp.broadcast_to(dgate, dgate_ref.shape)


def _call(kernel, cfg: _Config, grid, inputs, outputs, name: str):
  """inputs / outputs: lists of (array or ShapeDtypeStruct, BlockSpec)."""
  return pl.pallas_call(
    functools.partial(kernel, cfg=cfg),
    grid=grid,
    in_specs=[spec for _, spec in inputs],
    out_specs=[spec for _, spec in outputs],
    out_shape=[shape for shape, _ in outputs],
    compiler_params=cfg.params(),
    interpret=cfg.interpret,
    name=name,
  )(*[array for array, _ in inputs])


def _lists(gates: jax.Array, docs: jax.Array | None, width: int):
  """[B, H, N] gates -> order, before (int32), gates and, with documents, first, padded to
  `width` blocks: the forward and dq kernels' lists."""
  order, before, _ = _sparse.block_lists(gates)
  lists = (order, before, gates)
  if docs is not None:
    lists += (_sparse.document_lists(gates, docs)[0],)
  return tuple(_common.pad_axis(x, 2, width) for x in lists)


def _row_specs(cfg: _Config, tp: int, width: int):
  bs = cfg.block
  tile = lambda w: pl.BlockSpec((None, bs, None, w), lambda i, b, h: (b, i, h, 0))
  seq = lambda w: pl.BlockSpec((None, tp, None, w), lambda i, b, h: (b, 0, h, 0))
  rows = pl.BlockSpec((None, None, bs), lambda i, b, h: (b, h, i))
  lists = pl.BlockSpec((None, None, width), lambda i, b, h: (b, h, 0))
  return tile, seq, rows, lists


def _forward(q, k, v, gates, docs, cfg: _Config):
  b, tp, h, d = q.shape
  dv = v.shape[-1]
  width = pl.next_power_of_2(cfg.num_blocks)
  tile, seq, rows, lists = _row_specs(cfg, tp, width)
  inputs = [(x, lists) for x in _lists(gates, docs, width)]
  inputs += [(q, tile(d)), (k, seq(d)), (v, seq(dv))]
  outputs = [
    (jax.ShapeDtypeStruct((b, tp, h, dv), q.dtype), tile(dv)),
    (jax.ShapeDtypeStruct((b, h, tp), _F32), rows),
  ]
  o, lse = _call(
    _fwd_kernel, cfg, (cfg.num_blocks, b, h), inputs, outputs, "attnlab_nats_l_block_sparse_fwd"
  )
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _sparse_softmax(q, k, v, gates, docs, cfg: _Config):
  return _forward(q, k, v, gates, docs, cfg)[0]


def _sparse_fwd(q, k, v, gates, docs, cfg: _Config):
  o, lse = _forward(q, k, v, gates, docs, cfg)
  return o, (q, k, v, gates, docs, o, lse)


def _sparse_bwd(cfg: _Config, saved, do):
  q, k, v, gates, docs, o, lse = saved
  b, tp, h, d = q.shape
  dv = v.shape[-1]
  n = cfg.num_blocks
  do = do.astype(q.dtype)
  delta = jnp.swapaxes(jnp.sum(o.astype(_F32) * do.astype(_F32), axis=-1), 1, 2)  # [B, H, T]
  width = pl.next_power_of_2(n)
  tile, seq, rows, lists = _row_specs(cfg, tp, width)
  inputs = [(x, lists) for x in _lists(gates, docs, width)]
  inputs += [(q, tile(d)), (k, seq(d)), (v, seq(dv)), (do, tile(dv)), (lse, rows), (delta, rows)]
  (dq,) = _call(
    _dq_kernel, cfg, (n, b, h), inputs, [(jax.ShapeDtypeStruct(q.shape, q.dtype), tile(d))],
    "attnlab_nats_l_block_sparse_dq",
  )  # fmt: skip
  whole = pl.BlockSpec((None, None, tp), lambda j, b, h: (b, h, 0))
  gate_in = pl.BlockSpec((None, None, width), lambda j, b, h: (b, h, 0))
  # One 16-wide row per key block keeps every Triton block a power of two.
  gate_out = pl.BlockSpec((None, None, None, 16), lambda j, b, h: (b, h, j, 0))
  inputs = [(_common.pad_axis(gates, 2, width), gate_in)]
  if docs is not None:  # where each key block's visiting query blocks end
    inputs.append((_common.pad_axis(_sparse.document_lists(gates, docs)[1], 2, width), gate_in))
  inputs += [
    (q, seq(d)), (k, tile(d)), (v, tile(dv)), (do, seq(dv)), (lse, whole), (delta, whole),
  ]  # fmt: skip
  outputs = [
    (jax.ShapeDtypeStruct(k.shape, k.dtype), tile(d)),
    (jax.ShapeDtypeStruct(v.shape, v.dtype), tile(dv)),
    (jax.ShapeDtypeStruct((b, h, n, 16), _F32), gate_out),
  ]
  dk, dv_, dgate = _call(
    _dkv_kernel, cfg, (n, b, h), inputs, outputs, "attnlab_nats_l_block_sparse_dkv"
  )
  return dq, dk, dv_, dgate[..., 0].astype(gates.dtype), None


_sparse_softmax.defvjp(_sparse_fwd, _sparse_bwd)


def block_sparse_softmax(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  block_visible: jax.Array,
  *,
  block_size: int,
  scale: float,
  segment_ids: jax.Array | None = None,
  interpret: bool | None = None,
  num_warps: int = 8,
  num_stages: int = 2,
) -> jax.Array:
  """See `attnlab.ops.block_sparse_softmax`; one [block, block] tile per block pair.

  Args:
    q, k: [batch, time, heads, head_dim]; v: [batch, time, heads, head_dim_v].
    block_visible: [batch, num_blocks, heads] gates (> 0: attention-typed).
    block_size: tokens per block, a power of two >= 16.
    segment_ids: optional [batch, time] int document ids of packed rows,
      documents starting on block boundaries.
    interpret: None (interpret unless compiling for GPU) or a bool.
    num_warps, num_stages: Triton launch parameters. 8 warps: with 4 the dk/dv
      kernel spilled 104 bytes a thread at D = 128 (H100 compile, 2026-12-07);
      with 8 no kernel spills (`benchmarks/gpu_kernel_budgets.json`).

  Returns:
    [batch, time, heads, head_dim_v] in q's dtype.
  """
  if block_size < 16 or block_size & (block_size - 1):
    raise ValueError(
      f"pallas_gpu block_sparse_softmax: block_size must be a power of two >= 16, got {block_size}"
    )
  dtype = _dispatch.kernel_dtype("pallas_gpu block_sparse_softmax", q, k, v)
  if interpret is None:
    interpret = _dispatch.interpret_default("gpu", q, k, v)
  t = q.shape[1]
  n = -(-t // block_size)
  tp = n * block_size
  width = lambda m: max(16, pl.next_power_of_2(m))
  prep = lambda x: _common.pad_axis(_common.pad_axis(x.astype(dtype), 1, tp), 3, width(x.shape[3]))
  docs = None if segment_ids is None else _sparse.block_documents(segment_ids, block_size)
  cfg = _Config(
    float(scale), block_size, n, bool(interpret), num_warps, num_stages, docs is not None
  )
  gates = jnp.swapaxes(block_visible.astype(_F32), 1, 2)  # [B, H, N]
  o = _sparse_softmax(prep(q), prep(k), prep(v), gates, docs, cfg)
  return o[:, :t, :, : v.shape[-1]].astype(q.dtype)


def block_gated_delta_rule(
  q, k, v, g, beta, block_write, initial_state, *, block_size, scale, segment_ids=None,
  **kernel_options,
):  # fmt: skip
  """NAtS-L's delta-rule path on the chunked state-pass kernel: chunk = block,
  each block's state write scaled by its gate (gradient included), packed
  documents as the kernel handles them. Same contract as the xla path:
  (o [B,T,H,V], the state after the last block)."""
  o, final = chunk_state.gated_delta_rule(
    q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk_size=block_size,
    write_gate=block_write, segment_ids=segment_ids, **kernel_options,
  )  # fmt: skip
  return o, final.astype(initial_state.dtype)
