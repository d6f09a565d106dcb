"""NAtS-L's block-sparse causal softmax on TPU (Mosaic, `pl.pallas_call`).

Tiles are NAtS-L blocks ([block, block]), so each key tile has one type.
The block lists of `_sparse.block_lists` go to SMEM by scalar prefetch
(`pltpu.PrefetchScalarGridSpec`) together with the gates, and the index maps
read them:

- forward and dq, grid (batch, heads, q_blocks, steps): step j < before[i]
  loads key block order[j] (an earlier attention-typed block), step
  j = before[i] the own block (causal mask); later steps keep the own block's
  index, so no DMA is issued for them, and `pl.when` skips their compute;
- dk/dv (and the gate's gradient), grid (batch, heads, k_blocks, steps): key
  block j meets query block j, then, if attention-typed, every later one.

So the work and the K/V traffic of every pass follow the attention-block
fraction: at fraction 0 only the diagonal tiles are touched. Packed
documents (`segment_ids`, on block boundaries) narrow both lists to the
block's document (`_sparse.document_lists`): forward and dq visit
order[first[i] .. before[i]), dk/dv the query blocks j .. end[j] − 1; the
lists replace `visible` in SMEM by `end` and add `first`. Grid steps
themselves stay at blocks² per (batch, head), each skipped one costing a
few cycles of bookkeeping.

Layout inside: [batch, heads, time, head_dim]; row statistics lane-broadcast
to [.., time, 128] as in `attnlab.ops.flash.pallas_tpu`. Off TPU the kernels
run in TPU interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnlab.ops import _dispatch
from attnlab.ops.chunk_state import pallas_tpu as chunk_state
from attnlab.ops.flash import _common
from attnlab.ops.nats_l import _sparse

LANES = 128
SUBLANES = 8
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  block: int
  num_blocks: int
  heads: int
  interpret: Any
  packed: bool = False  # packed documents: scalars (order, before, end, gate, first)


class _Lists(NamedTuple):
  """The scalar-prefetched block lists (flattened [batch · heads · blocks] SMEM refs)."""

  order: Any
  before: Any
  visible: Any  # None with packed documents, where `end` counts the query blocks
  gate: Any
  first: Any = None
  end: Any = None


def _lists(refs, cfg: _Config) -> tuple[_Lists, tuple]:
  """(the lists, the other refs) of a kernel's or an index map's arguments."""
  if cfg.packed:
    order, before, end, gate, first = refs[:5]
    return _Lists(order, before, None, gate, first, end), refs[5:]
  return _Lists(*refs[:4]), refs[4:]


def _row_list(lists: _Lists, cfg: _Config, b, h, i, j):
  """(count, key, base) of forward/dq step j of query block i: steps j < count visit
  earlier key block `key`, step count the own block (key = i)."""
  base = (b * cfg.heads + h) * cfg.num_blocks
  if lists.first is None:
    count, pos = lists.before[base + i], j
  else:  # the run of `order` in block i's document; clamped where the step is idle
    start = lists.first[base + i]
    count, pos = lists.before[base + i] - start, jnp.minimum(start + j, cfg.num_blocks - 1)
  return count, jnp.where(j < count, lists.order[base + pos], i), base


def _column_count(lists: _Lists, cfg: _Config, b, h, j):
  """(number of query blocks that see key block j, from j on; base)."""
  base = (b * cfg.heads + h) * cfg.num_blocks
  if lists.end is None:
    return jnp.where(lists.visible[base + j] > 0, cfg.num_blocks - j, 1), base
  return lists.end[base + j] - j, base


def _lanes(x: jax.Array, width: int) -> jax.Array:
  if width == LANES:
    return x
  if width < LANES:
    return x[:, :width]
  return jnp.tile(x, (1, width // LANES))


def _own_mask(block: int) -> jax.Array:
  rows = lax.broadcasted_iota(jnp.int32, (block, block), 0)
  cols = lax.broadcasted_iota(jnp.int32, (block, block), 1)
  return cols <= rows


def _row_step(lists: _Lists, cfg: _Config):
  """(active, own, key block, gate weight) of forward/dq step j of query block i."""
  b, h, i, j = (pl.program_id(a) for a in range(4))
  count, key, base = _row_list(lists, cfg, b, h, i, j)
  own = j == count
  weight = jnp.where(own, 1.0, lists.gate[base + key])
  return j <= count, own, key, weight, count


def _fwd_kernel(*refs, cfg: _Config):
  lists, (q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc) = _lists(refs, cfg)
  bs = cfg.block
  active, own, _, weight, count = _row_step(lists, cfg)
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
    l_sc[...] = jnp.zeros(l_sc.shape, _F32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

  @pl.when(active)
  def _step():
    v = v_ref[...]
    u = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=_F32) * cfg.scale
    mask = jnp.logical_or(jnp.logical_not(own), _own_mask(bs))
    s = jnp.where(mask, u, _sparse.MASK_VALUE)
    m_prev = m_sc[...][:, :1]
    e, m_next, l_next, corr = _sparse.online_softmax_step(s, weight, m_prev, l_sc[...][:, :1])
    m_sc[...] = jnp.broadcast_to(m_next, m_sc.shape)
    l_sc[...] = jnp.broadcast_to(l_next, l_sc.shape)
    pv = lax.dot_general(e.astype(v.dtype), v, _NN, preferred_element_type=_F32)
    acc_sc[...] = acc_sc[...] * corr + pv

  @pl.when(j == count)
  def _finish():
    total = l_sc[...]
    lse_ref[...] = m_sc[...] + jnp.log(total)
    o_ref[...] = (acc_sc[...] / total[:, :1]).astype(o_ref.dtype)


def _dq_kernel(*refs, cfg: _Config):
  lists, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, acc_sc) = _lists(refs, cfg)
  bs = cfg.block
  active, own, _, weight, count = _row_step(lists, cfg)
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

  @pl.when(active)
  def _step():
    k = k_ref[...]
    u = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=_F32) * cfg.scale
    mask = jnp.logical_or(jnp.logical_not(own), _own_mask(bs))
    dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=_F32)
    _, ds, _ = _sparse.backward_step(
      u, mask, dp, _lanes(delta_ref[...], bs), _lanes(lse_ref[...], bs), weight
    )
    acc_sc[...] += lax.dot_general(
      (ds * cfg.scale).astype(k.dtype), k, _NN, preferred_element_type=_F32
    )

  @pl.when(j == count)
  def _finish():
    dq_ref[...] = acc_sc[...].astype(dq_ref.dtype)


def _column_step(lists: _Lists, cfg: _Config):
  """(active, own, number of query blocks) of dk/dv step s of key block j."""
  b, h, j, s = (pl.program_id(a) for a in range(4))
  count, base = _column_count(lists, cfg, b, h, j)
  return s < count, s == 0, count, base


def _dkv_kernel(*refs, cfg: _Config):
  lists, refs = _lists(refs, cfg)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  dk_ref, dv_ref, dgate_ref, dk_sc, dv_sc, dgate_sc = refs[6:]
  bs = cfg.block
  active, own, count, base = _column_step(lists, cfg)
  j, s = pl.program_id(2), pl.program_id(3)
  weight = jnp.where(own, 1.0, lists.gate[base + j])

  @pl.when(s == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)
    dgate_sc[...] = jnp.zeros(dgate_sc.shape, _F32)

  @pl.when(active)
  def _step():
    q, do = q_ref[...], do_ref[...]
    u = lax.dot_general(q, k_ref[...], _NT, preferred_element_type=_F32) * cfg.scale
    mask = jnp.logical_or(jnp.logical_not(own), _own_mask(bs))
    dp = lax.dot_general(do, v_ref[...], _NT, preferred_element_type=_F32)
    p, ds, dgate = _sparse.backward_step(
      u, mask, dp, _lanes(delta_ref[...], bs), _lanes(lse_ref[...], bs), weight
    )
    # Explicit transposes then plain matmuls, as the flash dk/dv kernel does.
    dv_sc[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=_F32)
    dk_sc[...] += lax.dot((ds * cfg.scale).T.astype(q.dtype), q, preferred_element_type=_F32)
    total = jnp.sum(jnp.sum(dgate, axis=1, keepdims=True), axis=0, keepdims=True)
    dgate_sc[...] += jnp.where(own, 0.0, jnp.broadcast_to(total, dgate_sc.shape))

  @pl.when(s == count - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)
    dgate_ref[...] = dgate_sc[...]


def _call(kernel, cfg: _Config, scalars, inputs, in_specs, outs, scratch, name: str):
  """outs: [(ShapeDtypeStruct, BlockSpec)]; scratch: [shape] of f32 VMEM."""
  b, h, tp = inputs[0].shape[:3]
  n = cfg.num_blocks
  return pl.pallas_call(
    functools.partial(kernel, cfg=cfg),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(scalars),
      grid=(b, h, n, n),
      in_specs=in_specs,
      out_specs=[spec for _, spec in outs],
      scratch_shapes=[pltpu.VMEM(shape, _F32) for shape in scratch],
    ),
    out_shape=[shape for shape, _ in outs],
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    ),
    interpret=cfg.interpret,
    name=name,
  )(*scalars, *inputs)


def _specs(cfg: _Config):
  """BlockSpecs for the row passes (forward, dq) and the column pass (dk/dv)."""
  bs = cfg.block

  def key_block(b, h, i, j, *scalars):
    return _row_list(_lists(scalars, cfg)[0], cfg, b, h, i, j)[1]

  def query_block(b, h, j, s, *scalars):
    count, _ = _column_count(_lists(scalars, cfg)[0], cfg, b, h, j)
    return j + jnp.minimum(s, count - 1)

  row_q = lambda w: pl.BlockSpec((None, None, bs, w), lambda b, h, i, j, *p: (b, h, i, 0))
  row_kv = lambda w: pl.BlockSpec(
    (None, None, bs, w), lambda b, h, i, j, *p: (b, h, key_block(b, h, i, j, *p), 0)
  )
  col_q = lambda w: pl.BlockSpec(
    (None, None, bs, w), lambda b, h, j, s, *p: (b, h, query_block(b, h, j, s, *p), 0)
  )
  col_kv = lambda w: pl.BlockSpec((None, None, bs, w), lambda b, h, j, s, *p: (b, h, j, 0))
  return row_q, row_kv, col_q, col_kv


def _scalars(gates: jax.Array, docs: jax.Array | None):
  """The block lists in `_lists`' order, flattened for SMEM."""
  order, before, visible = _sparse.block_lists(gates)
  if docs is None:
    return (order.reshape(-1), before.reshape(-1), visible.reshape(-1), gates.reshape(-1))
  first, end = _sparse.document_lists(gates, docs)
  return tuple(x.reshape(-1) for x in (order, before, end, gates, first))


def _forward(q, k, v, gates, docs, cfg: _Config):
  b, h, tp, d = q.shape
  dv = v.shape[-1]
  row_q, row_kv, _, _ = _specs(cfg)
  outs = [
    (jax.ShapeDtypeStruct((b, h, tp, dv), q.dtype), row_q(dv)),
    (jax.ShapeDtypeStruct((b, h, tp, LANES), _F32), row_q(LANES)),
  ]
  scratch = [(cfg.block, LANES), (cfg.block, LANES), (cfg.block, dv)]
  o, lse = _call(
    _fwd_kernel, cfg, _scalars(gates, docs), (q, k, v), [row_q(d), row_kv(d), row_kv(dv)], outs,
    scratch, "attnlab_nats_l_block_sparse_fwd",
  )  # fmt: skip
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _sparse_softmax(q, k, v, gates, docs, cfg: _Config):
  return _forward(q, k, v, gates, docs, cfg)[0]


def _sparse_fwd(q, k, v, gates, docs, cfg: _Config):
  o, lse = _forward(q, k, v, gates, docs, cfg)
  return o, (q, k, v, gates, docs, o, lse)


def _sparse_bwd(cfg: _Config, saved, do):
  q, k, v, gates, docs, o, lse = saved
  b, h, tp, d = q.shape
  dv = v.shape[-1]
  do = do.astype(q.dtype)
  delta = jnp.sum(o.astype(_F32) * do.astype(_F32), axis=-1)
  delta = jnp.broadcast_to(delta[..., None], (b, h, tp, LANES))
  scalars = _scalars(gates, docs)
  row_q, row_kv, col_q, col_kv = _specs(cfg)
  (dq,) = _call(
    _dq_kernel, cfg, scalars, (q, k, v, do, lse, delta),
    [row_q(d), row_kv(d), row_kv(dv), row_q(dv), row_q(LANES), row_q(LANES)],
    [(jax.ShapeDtypeStruct(q.shape, q.dtype), row_q(d))], [(cfg.block, d)],
    "attnlab_nats_l_block_sparse_dq",
  )  # fmt: skip
  n = cfg.num_blocks
  gate_spec = pl.BlockSpec(
    (None, None, None, SUBLANES, LANES), lambda b, h, j, s, *p: (b, h, j, 0, 0)
  )
  dk, dv_, dgate = _call(
    _dkv_kernel, cfg, scalars, (q, k, v, do, lse, delta),
    [col_q(d), col_kv(d), col_kv(dv), col_q(dv), col_q(LANES), col_q(LANES)],
    [
      (jax.ShapeDtypeStruct(k.shape, k.dtype), col_kv(d)),
      (jax.ShapeDtypeStruct(v.shape, v.dtype), col_kv(dv)),
      (jax.ShapeDtypeStruct((b, h, n, SUBLANES, LANES), _F32), gate_spec),
    ],
    [(cfg.block, d), (cfg.block, dv), (SUBLANES, LANES)],
    "attnlab_nats_l_block_sparse_dkv",
  )  # fmt: skip
  return dq, dk, dv_, dgate[:, :, :, 0, 0].astype(gates.dtype), None


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
  interpret: Any = None,
) -> jax.Array:
  """See `attnlab.ops.block_sparse_softmax`; one [block, block] tile per block pair.

  Args:
    q, k: [batch, time, heads, head_dim]; v: [batch, time, heads, head_dim_v].
    block_visible: [batch, num_blocks, heads] gates (> 0: attention-typed).
    block_size: tokens per block, a multiple of 8.
    segment_ids: optional [batch, time] int document ids of packed rows,
      documents starting on block boundaries.
    interpret: None (interpret unless compiling for TPU), False, True or a
      `pltpu.InterpretParams`.

  Returns:
    [batch, time, heads, head_dim_v] in q's dtype.
  """
  if block_size % SUBLANES:
    raise ValueError("pallas_tpu block_sparse_softmax: block_size must be a multiple of 8")
  dtype = _dispatch.kernel_dtype("pallas_tpu block_sparse_softmax", q, k, v)
  if interpret is None:
    interpret = _dispatch.interpret_default("tpu", q, k, v) and pltpu.InterpretParams()
  t = q.shape[1]
  n = -(-t // block_size)
  tp = n * block_size
  width = lambda m: m if m <= LANES else _common.round_up(m, LANES)

  def to_kernel(x):
    x = _common.pad_axis(jnp.swapaxes(x.astype(dtype), 1, 2), 2, tp)
    return _common.pad_axis(x, 3, width(x.shape[3]))

  docs = None if segment_ids is None else _sparse.block_documents(segment_ids, block_size)
  cfg = _Config(float(scale), block_size, n, q.shape[2], interpret, docs is not None)
  gates = jnp.swapaxes(block_visible.astype(_F32), 1, 2)  # [B, H, N]
  o = _sparse_softmax(to_kernel(q), to_kernel(k), to_kernel(v), gates, docs, cfg)
  return jnp.swapaxes(o[:, :, :t, : v.shape[-1]], 1, 2).astype(q.dtype)


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
