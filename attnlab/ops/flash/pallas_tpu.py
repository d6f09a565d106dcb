"""Flash-style causal attention kernels for TPU (Mosaic TPU, `pl.pallas_call`).

Layout inside: [batch, heads, time, head_dim], so every block's two minor
dims are (time tile, head_dim) as Mosaic's (8, 128) tiling wants. Row
statistics (lse, Z, max, ...) travel lane-broadcast as [.., time, 128] and
column factors sublane-broadcast as [.., 8, time], the layouts jax's splash
attention uses for the same purpose.

Grids put the reduction axis last ("arbitrary") and accumulate in fp32 VMEM
scratch:

- forward and dq: (batch, heads, q_blocks, kv_blocks);
- dk/dv: (batch, kv_heads, kv_blocks, group · q_blocks), so one program sums
  the contributions of all query heads that share a kv head (GQA) without
  atomics.

Causal structure: tiles above the diagonal are skipped with `pl.when`, and
their index maps are clamped to the last useful block so no DMA is issued
for them. T is padded to the block size with zeros; padded rows are finite
and dropped, padded keys are never visible to real rows.

Packed documents (`segment_ids`): every row carries the index of its
document's first token ("start", int32, lane-broadcast [B, T, 128] like the
row statistics; `_common.document_starts`). Query i sees key j iff
start_i ≤ j ≤ i, and its LSSAR position n is i − start_i + 1. Documents are
contiguous and starts never decrease along a row, so a tile holds a visible
entry iff it is not above the diagonal and its kv block ends at or after the
start of its q block's first row: the only tiles that can be visible are
those between the q block's first document start and the diagonal. Skipped
tiles cost neither compute (`pl.when` on a scalar-prefetched per-block
start) nor DMA (index maps clamped into the visible range read the same
prefetched scalars): in forward and dq the kv blocks before the q block's
first document, in dk/dv the q blocks whose first row's document starts
after the kv block. Every visible tile applies the document mask (with
documents, tiles below the diagonal can be partly hidden). Without
segment_ids none of this is traced.

Passes: softmax and LSSA need one forward pass; LSSAR needs a statistics
pass (Z, row max) and an output pass. The backward runs separate dq and
dk/dv kernels; LSSAR first runs an extra row pass for ε = Σ_j A_ij ∂L/∂A_ij,
the term the first L1 normalisation sends back to every entry.

On a non-TPU backend the kernels run in TPU interpret mode
(`pltpu.InterpretParams`), which is how the CPU test-suite checks them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnlab.ops import _dispatch
from attnlab.ops.flash import _common, _tile

LANES = 128
SUBLANES = 8
DEFAULT_BLOCK = 512

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Config:
  kind: str  # 'softmax' | 'lssa' | 'lssar'
  power: float | None
  scale: float
  block_q: int
  block_k: int
  interpret: Any  # False (compile for TPU), True (HLO interpret) or pltpu.InterpretParams


def _lanes(x: jax.Array, width: int) -> jax.Array:
  """A lane-broadcast [rows, 128] value as [rows, width]."""
  if width == LANES:
    return x
  if width < LANES:
    return x[:, :width]
  return jnp.tile(x, (1, width // LANES))


def _rows_stat(x: jax.Array) -> jax.Array:
  """[rows, 1] reduction result -> lane-broadcast [rows, 128]."""
  return jnp.broadcast_to(x, (x.shape[0], LANES))


# Names of the lane-broadcast row inputs each phase reads, and what it writes.
_ROW_INPUTS = {
  "softmax": (),
  "lssa": (),
  "lssar_stats": (),
  "lssar_out": ("z", "xmax"),
  "lssar_eps": ("z", "xmax", "bsum", "delta"),
}
_ROW_OUTPUTS = {
  "softmax": ("lse",),
  "lssa": ("z",),
  "lssar_stats": ("z", "xmax"),
  "lssar_out": ("bsum",),
  "lssar_eps": ("eps",),
}
_BACKWARD_STATS = {
  "softmax": ("lse", "delta"),
  "lssa": ("z", "delta"),
  "lssar": ("z", "xmax", "bsum", "eps", "delta"),
}


def _tile_logits(cfg: _Config, q, k, alpha_ref, beta_ref, width: int):
  """Raw products p = q·kᵀ and logits u = scale·α·β·p, both [bq, bk] fp32."""
  p = lax.dot_general(q, k, _NT, preferred_element_type=_F32)
  u = p * cfg.scale if cfg.scale != 1.0 else p
  if alpha_ref is not None:
    u = u * _lanes(alpha_ref[...], width)
  if beta_ref is not None:
    u = u * beta_ref[0:1, :]
  return p, u


def _causal(q_start, k_start, bq: int, bk: int, start=None):
  """A tile's visibility and 1-based row positions n (float), both [bq, bk].

  start: None, or the rows' document starts as [bq, bk] int32 (packed documents).
  """
  rows = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  cols = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  if start is None:
    return cols <= rows, (rows + 1).astype(_F32)
  return (cols <= rows) & (cols >= start), (rows - start + 1).astype(_F32)


class _Tile(NamedTuple):
  """One visible (q block, kv block) tile, as every row phase's step sees it."""

  k: jax.Array  # [bk, d] keys
  p: jax.Array  # [bq, bk] raw products q·kᵀ
  u: jax.Array  # [bq, bk] logits scale·α·β·p
  mask: jax.Array  # [bq, bk] causal (and document) visibility
  n: jax.Array  # [bq, bk] 1-based row positions (within the document), float
  row: dict  # the row statistics the phase reads, as [bq, bk]


def _store_o(r, o_scaled) -> None:
  r["o"][...] = o_scaled.astype(r["o"].dtype)


def _softmax_step(r, cfg: _Config, t: _Tile) -> None:
  """Online softmax: running max m, normaliser l and output, rescaled as m grows."""
  v = r["v"][...]
  s = jnp.where(t.mask, t.u, _tile.MASK_VALUE)
  m_prev = r["acc_m"][...]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  e = jnp.where(t.mask, jnp.exp(s - _lanes(m_next, cfg.block_k)), 0.0)
  corr = jnp.exp(m_prev - m_next)
  r["acc_l"][...] = corr * r["acc_l"][...] + jnp.sum(e, axis=1, keepdims=True)
  r["acc_m"][...] = m_next
  pv = lax.dot_general(e.astype(v.dtype), v, _NN, preferred_element_type=_F32)
  r["acc_o"][...] = r["acc_o"][...] * _lanes(corr, v.shape[-1]) + pv


def _softmax_finish(r, cfg: _Config, q_start) -> None:
  total = r["acc_l"][...]
  r["lse"][...] = r["acc_m"][...] + jnp.log(total)
  _store_o(r, r["acc_o"][...] / _lanes(total, r["o"].shape[-1]))


def _softplus_z(r, t: _Tile) -> jax.Array:
  """Softplus weights a of the tile (0 where hidden), summed into the row sum Z."""
  a = jnp.where(t.mask, _tile.softplus(t.u), 0.0)
  r["acc_z"][...] += _rows_stat(jnp.sum(a, axis=1, keepdims=True))
  return a


def _lssa_step(r, cfg: _Config, t: _Tile) -> None:
  a = _softplus_z(r, t)
  v = r["v"][...]
  r["acc_o"][...] += lax.dot_general(a.astype(v.dtype), v, _NN, preferred_element_type=_F32)


def _lssa_finish(r, cfg: _Config, q_start) -> None:
  z = r["acc_z"][...]
  r["z"][...] = z
  _store_o(r, r["acc_o"][...] / _lanes(z, r["o"].shape[-1]))


def _lssar_stats_step(r, cfg: _Config, t: _Tile) -> None:
  """LSSAR's first pass: Z and the row max of a (x is monotone in a)."""
  a = _softplus_z(r, t)
  r["acc_amax"][...] = jnp.maximum(r["acc_amax"][...], jnp.max(a, axis=1, keepdims=True))


def _lssar_stats_finish(r, cfg: _Config, q_start) -> None:
  rows = q_start + lax.broadcasted_iota(jnp.int32, (cfg.block_q, LANES), 0) + 1
  if "start" in r:  # positions within the document
    rows = rows - r["start"][...]
  rows = rows.astype(_F32)
  z = r["acc_z"][...]
  r["z"][...] = z
  r["xmax"][...] = _tile.lssar_x(r["acc_amax"][...], z, rows)


def _lssar_out_step(r, cfg: _Config, t: _Tile) -> None:
  """LSSAR's second pass: b = (x / max x)^p, its row sum and b·v."""
  v = r["v"][...]
  y = _tile.lssar_y(_tile.softplus(t.u), t.row["z"], t.row["xmax"], t.n, t.mask)
  b = _tile.power(y, cfg.power)
  r["acc_bsum"][...] += _rows_stat(jnp.sum(b, axis=1, keepdims=True))
  r["acc_o"][...] += lax.dot_general(b.astype(v.dtype), v, _NN, preferred_element_type=_F32)


def _lssar_out_finish(r, cfg: _Config, q_start) -> None:
  bsum = r["acc_bsum"][...]
  r["bsum"][...] = bsum
  inv = _lanes(_tile.safe_reciprocal(bsum), r["o"].shape[-1])
  _store_o(r, r["acc_o"][...] * inv)


def _lssar_eps_step(r, cfg: _Config, t: _Tile) -> None:
  """The backward's ε = Σ_j A_ij ∂L/∂A_ij, row by row."""
  dp = lax.dot_general(r["do"][...], r["v"][...], _NT, preferred_element_type=_F32)
  row = t.row
  part = _tile.lssar_eps_tile(
    t.u, t.mask, dp, row["delta"], z=row["z"], xmax=row["xmax"], bsum=row["bsum"], n=t.n,
    p=cfg.power,
  )  # fmt: skip
  r["acc_eps"][...] += _rows_stat(jnp.sum(part, axis=1, keepdims=True))


def _lssar_eps_finish(r, cfg: _Config, q_start) -> None:
  r["eps"][...] = r["acc_eps"][...]


def _dq_step(r, cfg: _Config, t: _Tile) -> None:
  """dq (and dα) from the logit cotangents of any kind."""
  dp = lax.dot_general(r["do"][...], r["v"][...], _NT, preferred_element_type=_F32)
  row = t.row
  _, du = _tile.backward_tile(
    cfg.kind, t.u, t.mask, dp, row["delta"], lse=row.get("lse"), z=row.get("z"),
    xmax=row.get("xmax"), bsum=row.get("bsum"), eps=row.get("eps"), n=t.n, p=cfg.power,
  )  # fmt: skip
  # u = scale·α·β·p, so dL/dp = du·scale·α·β and dL/dα = Σ_j du·scale·β·p.
  dp_raw = du * cfg.scale if cfg.scale != 1.0 else du
  if "beta" in r:
    dp_raw = dp_raw * r["beta"][0:1, :]
  if "alpha" in r:
    r["acc_dalpha"][...] += _rows_stat(jnp.sum(dp_raw * t.p, axis=1, keepdims=True))
    dp_raw = dp_raw * _lanes(r["alpha"][...], cfg.block_k)
  r["acc_dq"][...] += lax.dot_general(
    dp_raw.astype(t.k.dtype), t.k, _NN, preferred_element_type=_F32
  )


def _dq_finish(r, cfg: _Config, q_start) -> None:
  r["dq"][...] = r["acc_dq"][...].astype(r["dq"].dtype)
  if "dalpha" in r:
    r["dalpha"][...] = r["acc_dalpha"][...]


# Each row phase: (its step on one visible tile, its finish after the last kv block).
_ROW_PHASES = {
  "softmax": (_softmax_step, _softmax_finish),
  "lssa": (_lssa_step, _lssa_finish),
  "lssar_stats": (_lssar_stats_step, _lssar_stats_finish),
  "lssar_out": (_lssar_out_step, _lssar_out_finish),
  "lssar_eps": (_lssar_eps_step, _lssar_eps_finish),
  "dq": (_dq_step, _dq_finish),
}


def _row_kernel(*refs, cfg: _Config, phase: str, names: tuple[str, ...], num_q: int, num_k: int):
  """Forward phases, LSSAR's ε pass and the dq pass: grid (b, h, q_block, kv_block).

  The grid, the accumulator reset and the tile's logits are shared; the
  phase's own step and finish come from `_ROW_PHASES`.
  """
  step, finish = _ROW_PHASES[phase]
  r = dict(zip(names, refs))
  bq, bk = cfg.block_q, cfg.block_k
  qi, kj = pl.program_id(2), pl.program_id(3)
  q_start, k_start = qi * bq, kj * bk
  scratch = [name for name in names if name.startswith("acc_")]

  @pl.when(kj == 0)
  def _init():
    for name in scratch:
      fill = -jnp.inf if name == "acc_m" else 0.0
      r[name][...] = jnp.full(r[name].shape, fill, _F32)

  visible = k_start <= q_start + bq - 1  # skip tiles above the diagonal
  if "doc_first" in r:  # and those before the document of the q block's first row
    visible &= k_start + bk - 1 >= r["doc_first"][pl.program_id(0) * num_q + qi]

  @pl.when(visible)
  def _step():
    q, k = r["q"][...], r["k"][...]
    p, u = _tile_logits(cfg, q, k, r.get("alpha"), r.get("beta"), bk)
    start = _lanes(r["start"][...], bk) if "start" in r else None
    mask, n = _causal(q_start, k_start, bq, bk, start)
    # Row residuals this phase reads (in other phases the same names are outputs).
    reads = _BACKWARD_STATS[cfg.kind] if phase == "dq" else _ROW_INPUTS[phase]
    row = {name: _lanes(r[name][...], bk) for name in reads}
    step(r, cfg, _Tile(k, p, u, mask, n, row))

  @pl.when(kj == num_k - 1)
  def _finish():
    finish(r, cfg, q_start)


def _row_call(cfg: _Config, phase: str, arrays: dict, out_dtype):
  """Runs one row-major phase; `arrays` holds q, k, v, do, alpha, beta and row stats."""
  q, k = arrays["q"], arrays["k"]
  b, h, tp, d = q.shape
  group = h // k.shape[1]
  bq, bk = cfg.block_q, cfg.block_k
  num_q, num_k = tp // bq, tp // bk

  def kv_block(b, qi, kj, prefetch):  # skipped tiles repeat a useful block: no new DMA
    last = lax.div(qi * bq + bq - 1, np.int32(bk))
    if not prefetch:
      return jnp.minimum(kj, last)
    first = lax.div(prefetch[0][b * num_q + qi], np.int32(bk))  # the first document's block
    return jnp.minimum(jnp.maximum(kj, first), last)

  q_spec = lambda width: pl.BlockSpec((None, None, bq, width), lambda b, h, i, j, *_: (b, h, i, 0))
  kv_spec = lambda width: pl.BlockSpec(
    (None, None, bk, width),
    lambda b, h, i, j, *pf: (b, lax.div(h, np.int32(group)), kv_block(b, i, j, pf), 0),
  )
  row_spec = q_spec(LANES)
  beta_spec = pl.BlockSpec(
    (None, None, SUBLANES, bk),
    lambda b, h, i, j, *pf: (b, lax.div(h, np.int32(group)), 0, kv_block(b, i, j, pf)),
  )
  start_spec = pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, *_: (b, i, 0))

  # Scalar-prefetched (SMEM) per-q-block document starts, packed documents only.
  prefetch = {} if arrays.get("doc_first") is None else {"doc_first": arrays["doc_first"]}
  names, inputs, specs = list(prefetch), [], []

  def add(name, spec):
    if arrays.get(name) is not None:
      names.append(name)
      inputs.append(arrays[name])
      specs.append(spec)

  add("q", q_spec(d))
  add("k", kv_spec(d))
  add("start", start_spec)
  if phase != "lssar_stats":
    add("v", kv_spec(arrays["v"].shape[-1]))
  if phase in ("lssar_eps", "dq"):
    add("do", q_spec(arrays["do"].shape[-1]))
  add("alpha", row_spec)
  add("beta", beta_spec)
  row_inputs = _BACKWARD_STATS[cfg.kind] if phase == "dq" else _ROW_INPUTS[phase]
  for name in row_inputs:
    add(name, row_spec)

  dv = arrays["v"].shape[-1]
  outs, scratch = [], []
  if phase in ("softmax", "lssa", "lssar_out"):
    outs.append(("o", jax.ShapeDtypeStruct((b, h, tp, dv), out_dtype), q_spec(dv)))
    scratch.append(("acc_o", (bq, dv)))
  if phase == "dq":
    outs.append(("dq", jax.ShapeDtypeStruct(q.shape, q.dtype), q_spec(d)))
    scratch.append(("acc_dq", (bq, d)))
    if "alpha" in arrays and arrays["alpha"] is not None:
      outs.append(("dalpha", jax.ShapeDtypeStruct((b, h, tp, LANES), _F32), row_spec))
      scratch.append(("acc_dalpha", (bq, LANES)))
  else:
    for name in _ROW_OUTPUTS[phase]:
      outs.append((name, jax.ShapeDtypeStruct((b, h, tp, LANES), _F32), row_spec))
    scratch += {
      "softmax": [("acc_m", (bq, LANES)), ("acc_l", (bq, LANES))],
      "lssa": [("acc_z", (bq, LANES))],
      "lssar_stats": [("acc_z", (bq, LANES)), ("acc_amax", (bq, LANES))],
      "lssar_out": [("acc_bsum", (bq, LANES))],
      "lssar_eps": [("acc_eps", (bq, LANES))],
    }[phase]

  names += [name for name, _, _ in outs] + [name for name, _ in scratch]
  kernel = functools.partial(
    _row_kernel, cfg=cfg, phase=phase, names=tuple(names), num_q=num_q, num_k=num_k
  )
  return _call(kernel, (b, h, num_q, num_k), specs, outs, scratch, inputs, cfg, phase, prefetch)


def _dkv_kernel(*refs, cfg: _Config, names: tuple[str, ...], num_q: int, num_k: int, group: int):
  """dk, dv (and dβ): grid (b, kv_head, kv_block, group · q_blocks)."""
  r = dict(zip(names, refs))
  bq, bk = cfg.block_q, cfg.block_k
  kj, step = pl.program_id(2), pl.program_id(3)
  qi = lax.rem(step, np.int32(num_q))
  q_start, k_start = qi * bq, kj * bk

  @pl.when(step == 0)
  def _init():
    for name in names:
      if name.startswith("acc_"):
        r[name][...] = jnp.zeros(r[name].shape, _F32)

  visible = k_start <= q_start + bq - 1
  if "q_end" in r:  # q blocks from q_end on start their rows' documents after this kv block
    visible &= qi < r["q_end"][pl.program_id(0) * num_k + kj]

  @pl.when(visible)
  def _step():
    q, k, v, do = r["q"][...], r["k"][...], r["v"][...], r["do"][...]
    p, u = _tile_logits(cfg, q, k, r.get("alpha"), r.get("beta"), bk)
    start = _lanes(r["start"][...], bk) if "start" in r else None
    mask, n = _causal(q_start, k_start, bq, bk, start)
    row = {
      name: _lanes(r[name][...], bk)
      for name in ("lse", "z", "xmax", "bsum", "eps", "delta")
      if name in r
    }
    dp = lax.dot_general(do, v, _NT, preferred_element_type=_F32)
    w, du = _tile.backward_tile(
      cfg.kind, u, mask, dp, row["delta"], lse=row.get("lse"), z=row.get("z"),
      xmax=row.get("xmax"), bsum=row.get("bsum"), eps=row.get("eps"), n=n, p=cfg.power,
    )  # fmt: skip
    # Explicit transposes then plain matmuls: the form jax's TPU flash kernel lowers.
    r["acc_dv"][...] += lax.dot(w.T.astype(do.dtype), do, preferred_element_type=_F32)
    dp_raw = du * cfg.scale if cfg.scale != 1.0 else du
    if "alpha" in r:
      dp_raw = dp_raw * _lanes(r["alpha"][...], bk)
    if "beta" in r:
      r["acc_dbeta"][...] += jnp.broadcast_to(
        jnp.sum(dp_raw * p, axis=0, keepdims=True), (SUBLANES, bk)
      )
      dp_raw = dp_raw * r["beta"][0:1, :]
    r["acc_dk"][...] += lax.dot(dp_raw.T.astype(q.dtype), q, preferred_element_type=_F32)

  @pl.when(step == group * num_q - 1)
  def _finish():
    r["dk"][...] = r["acc_dk"][...].astype(r["dk"].dtype)
    r["dv"][...] = r["acc_dv"][...].astype(r["dv"].dtype)
    if "dbeta" in r:
      r["dbeta"][...] = r["acc_dbeta"][...]


def _dkv_call(cfg: _Config, arrays: dict):
  q, k, v = arrays["q"], arrays["k"], arrays["v"]
  b, h, tp, d = q.shape
  hk, dv = k.shape[1], v.shape[-1]
  group = h // hk
  bq, bk = cfg.block_q, cfg.block_k
  num_q, num_k = tp // bq, tp // bk

  def q_block(b, kj, step, prefetch):  # skipped tiles repeat a useful block: no new DMA
    qi = jnp.maximum(lax.rem(step, np.int32(num_q)), lax.div(kj * bk, np.int32(bq)))
    if prefetch:  # packed documents: the last q block that sees this kv block
      qi = jnp.minimum(qi, prefetch[0][b * num_k + kj] - 1)
    return qi

  def q_map(b, hk_, kj, step, *pf):
    return b, hk_ * group + lax.div(step, np.int32(num_q)), q_block(b, kj, step, pf), 0

  q_spec = lambda width: pl.BlockSpec((None, None, bq, width), q_map)
  kv_spec = lambda width: pl.BlockSpec(
    (None, None, bk, width), lambda b, hk_, kj, step, *_: (b, hk_, kj, 0)
  )
  beta_spec = pl.BlockSpec((None, None, SUBLANES, bk), lambda b, hk_, kj, step, *_: (b, hk_, 0, kj))
  start_spec = pl.BlockSpec(
    (None, bq, LANES), lambda b, hk_, kj, step, *pf: (b, q_block(b, kj, step, pf), 0)
  )

  # Scalar-prefetched (SMEM): per kv block, how many q blocks can see it (packed documents).
  prefetch = {} if arrays.get("q_end") is None else {"q_end": arrays["q_end"]}
  names, inputs, specs = list(prefetch), [], []

  def add(name, spec):
    if arrays.get(name) is not None:
      names.append(name)
      inputs.append(arrays[name])
      specs.append(spec)

  add("q", q_spec(d))
  add("k", kv_spec(d))
  add("v", kv_spec(dv))
  add("do", q_spec(dv))
  add("alpha", q_spec(LANES))
  add("beta", beta_spec)
  add("start", start_spec)
  for name in _BACKWARD_STATS[cfg.kind]:
    add(name, q_spec(LANES))

  outs = [
    ("dk", jax.ShapeDtypeStruct(k.shape, k.dtype), kv_spec(d)),
    ("dv", jax.ShapeDtypeStruct(v.shape, v.dtype), kv_spec(dv)),
  ]
  scratch = [("acc_dk", (bk, d)), ("acc_dv", (bk, dv))]
  if arrays.get("beta") is not None:
    outs.append(("dbeta", jax.ShapeDtypeStruct((b, hk, SUBLANES, tp), _F32), beta_spec))
    scratch.append(("acc_dbeta", (SUBLANES, bk)))
  names += [name for name, _, _ in outs] + [name for name, _ in scratch]
  kernel = functools.partial(
    _dkv_kernel, cfg=cfg, names=tuple(names), num_q=num_q, num_k=num_k, group=group
  )
  grid = (b, hk, num_k, group * num_q)
  return _call(kernel, grid, specs, outs, scratch, inputs, cfg, "dkv", prefetch)


def _call(
  kernel, grid, specs, outs, scratch, inputs, cfg: _Config, phase: str, prefetch: dict
) -> dict:
  """One pallas_call over a grid whose last axis is the sequential reduction.

  outs: [(name, ShapeDtypeStruct, BlockSpec)]; scratch: [(name, shape)] in VMEM;
  prefetch: {name: int32 vector} scalar-prefetched into SMEM (index maps and
  kernel get them first), or empty. Returns {output name: array}.
  """
  layout = dict(
    grid=grid,
    in_specs=specs,
    out_specs=[spec for _, _, spec in outs],
    scratch_shapes=[pltpu.VMEM(shape, _F32) for _, shape in scratch],
  )
  if prefetch:
    layout = dict(
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(prefetch), **layout)
    )
  results = pl.pallas_call(
    kernel,
    out_shape=[shape for _, shape, _ in outs],
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    ),
    interpret=cfg.interpret,
    name=f"attnlab_flash_{cfg.kind}_{phase}",
    **layout,
  )(*prefetch.values(), *inputs)
  return dict(zip([name for name, _, _ in outs], results))


def _lane_rows(x):  # [B, H, T] -> [B, H, T, 128]
  return None if x is None else jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def _sublane_cols(x):  # [B, H, T] -> [B, H, 8, T]
  return (
    None
    if x is None
    else jnp.broadcast_to(x[:, :, None, :], (x.shape[0], x.shape[1], SUBLANES, x.shape[2]))
  )


def _documents(starts, cfg: _Config, num_k: int | None = None) -> dict:
  """The kernels' document inputs from starts [B, Tp] (None: no packed documents).

  start: lane-broadcast rows; doc_first [B·num_q]: the start of each q block's
  first row; q_end [B·num_k] (with num_k): per kv block, the number of q blocks
  whose first row's document starts at or before the kv block's last key.
  """
  if starts is None:
    return {}
  bq, bk = cfg.block_q, cfg.block_k
  first = starts[:, ::bq]  # [B, num_q]
  out = dict(start=_lane_rows(starts), doc_first=first.reshape(-1))
  if num_k is not None:
    k_last = jnp.arange(num_k, dtype=jnp.int32) * bk + bk - 1
    sees = first[:, None, :] <= k_last[None, :, None]  # [B, num_k, num_q]
    out["q_end"] = jnp.sum(sees, axis=-1, dtype=jnp.int32).reshape(-1)
  return out


def _forward(q, k, v, alpha, beta, starts, cfg: _Config):
  arrays = dict(q=q, k=k, v=v, alpha=_lane_rows(alpha), beta=_sublane_cols(beta))
  arrays.update(_documents(starts, cfg))
  if cfg.kind == "softmax":
    out = _row_call(cfg, "softmax", arrays, q.dtype)
    return out["o"], {"lse": out["lse"][..., 0]}
  if cfg.kind == "lssa":
    out = _row_call(cfg, "lssa", arrays, q.dtype)
    return out["o"], {"z": out["z"][..., 0]}
  stats = _row_call(cfg, "lssar_stats", arrays, q.dtype)
  out = _row_call(cfg, "lssar_out", {**arrays, **stats}, q.dtype)
  return out["o"], {
    "z": stats["z"][..., 0],
    "xmax": stats["xmax"][..., 0],
    "bsum": out["bsum"][..., 0],
  }


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, alpha, beta, starts, cfg: _Config):
  return _forward(q, k, v, alpha, beta, starts, cfg)[0]


def _flash_fwd(q, k, v, alpha, beta, starts, cfg: _Config):
  o, stats = _forward(q, k, v, alpha, beta, starts, cfg)
  return o, (q, k, v, alpha, beta, starts, o, stats)


def _flash_bwd(cfg: _Config, saved, do):
  q, k, v, alpha, beta, starts, o, stats = saved
  delta = jnp.sum(o.astype(_F32) * do.astype(_F32), axis=-1)  # Σ_d do·o, [B, H, T]
  arrays = dict(q=q, k=k, v=v, do=do.astype(q.dtype), alpha=_lane_rows(alpha))
  arrays.update(beta=_sublane_cols(beta), delta=_lane_rows(delta))
  arrays.update({name: _lane_rows(value) for name, value in stats.items()})
  arrays.update(_documents(starts, cfg, q.shape[2] // cfg.block_k))
  if cfg.kind == "lssar":
    arrays.update(_row_call(cfg, "lssar_eps", arrays, q.dtype))
  dq = _row_call(cfg, "dq", arrays, q.dtype)
  dkv = _dkv_call(cfg, arrays)
  dalpha = None if alpha is None else dq["dalpha"][..., 0]
  dbeta = None if beta is None else dkv["dbeta"][:, :, 0, :]
  return dq["dq"], dkv["dk"], dkv["dv"], dalpha, dbeta, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  alpha: jax.Array | None,
  beta: jax.Array | None,
  *,
  kind: str,
  power: float | None = None,
  scale: float = 1.0,
  block_q: int | None = None,
  block_k: int | None = None,
  interpret: Any = None,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """Causal flash attention of the given kind on TPU (or interpreted).

  Args:
    q: [batch, time, heads, head_dim]
    k: [batch, time, kv_heads, head_dim]; kv_heads divides heads.
    v: [batch, time, kv_heads, head_dim_v]
    alpha: optional [batch, time, heads] row factor of the logits.
    beta: optional [batch, time, kv_heads] column factor of the logits.
    kind: 'softmax', 'lssa' or 'lssar' (needs `power`).
    scale: constant factor of the logits.
    block_q, block_k: tile sizes, multiples of 128 (default up to 512).
    interpret: None (TPU interpret mode unless compiled for a TPU), False,
      True (plain HLO interpret mode) or a `pltpu.InterpretParams`.
    segment_ids: optional [batch, time] integer document ids of packed rows:
      a query sees only earlier keys of its own document (see the module
      docstring). The row factor α must already use positions within the
      document where it depends on them (`_common.softplus_factors`).

  Returns:
    [batch, time, heads, head_dim_v] in q's dtype.
  """
  if kind not in _tile.KINDS or (kind == "lssar") != (power is not None):
    raise ValueError(f"bad kind/power: {kind!r}, {power!r}")
  _common.check_shapes(q, k, v, "pallas_tpu")
  _common.check_segments(segment_ids, q, "pallas_tpu")
  dtype = _dispatch.kernel_dtype("pallas_tpu", q, k, v)
  t = q.shape[1]
  fit = _common.round_up(t, LANES)
  bq = block_q or min(DEFAULT_BLOCK, fit)
  bk = block_k or min(DEFAULT_BLOCK, fit)
  if bq % LANES or bk % LANES:
    raise ValueError(f"TPU blocks must be multiples of {LANES}; got {bq}, {bk}")
  if interpret is None:
    interpret = pltpu.InterpretParams() if _dispatch.interpret_default("tpu", q) else False
  power = None if power is None else float(power)
  cfg = _Config(kind, power, float(scale), bq, bk, interpret)
  tp = _common.round_up(t, math.lcm(bq, bk))
  # Head dims above 128 go to whole lane tiles; zero columns change no dot product.
  width = lambda n: n if n <= LANES else _common.round_up(n, LANES)

  def to_kernel(x):
    x = _common.pad_axis(jnp.swapaxes(x.astype(dtype), 1, 2), 2, tp)
    return _common.pad_axis(x, 3, width(x.shape[3]))

  rows = lambda x: (
    None if x is None else _common.pad_axis(jnp.swapaxes(x.astype(_F32), 1, 2), 2, tp)
  )
  starts = _common.padded_starts(segment_ids, tp)
  o = _flash(to_kernel(q), to_kernel(k), to_kernel(v), rows(alpha), rows(beta), starts, cfg)
  return jnp.swapaxes(o[:, :, :t, : v.shape[-1]], 1, 2).astype(q.dtype)
