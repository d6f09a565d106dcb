"""Flash-style causal attention kernels for NVIDIA GPUs (Pallas, Triton lowering).

Backend choice. jax (0.10.2 as pinned here; the H200 runs in
`benchmarks/results/` used 0.11.2) offers two Pallas GPU lowerings: Mosaic
GPU (`jax.experimental.pallas.mosaic_gpu`, `plgpu.kernel`, wgmma/TMA, warp
specialisation), the default, and the older Triton lowering
(`pl.pallas_call` with `jax.experimental.pallas.triton.CompilerParams`),
still shipped and working in both versions. These kernels use the Triton
lowering, because:

- correctness first: the kernel bodies are plain Pallas tile code, which
  runs in Pallas's generic interpret mode (`interpret=True`) on a CPU, so
  the CPU test-suite checks the GPU kernels' forward and every gradient
  (softmax, LSSA, two-pass LSSAR) against the xla path. Mosaic GPU kernels
  can be interpreted on a CPU too, by a separate interpreter that simulates
  shared memory, barriers, TMA copies and wgmma (in jax 0.10.2 reached as
  `interpret=jax._src.pallas.mosaic_gpu.interpret.params.InterpretGPUParams()`,
  not yet exported publicly), so this is no reason to avoid a Mosaic GPU
  port; it would need its own interpret-mode tests;
- the whole family (row and column logit factors, LSSAR's second pass,
  the ε pass of its backward) is plain tile code here, where a Mosaic GPU
  version needs hand-managed shared-memory pipelines per variant;
- Triton emits wgmma on Hopper (sm_90) for bf16 dots, so the forward runs
  on the tensor cores. Mosaic GPU's FA3-style kernel (jax's
  `ops/gpu/attention_mgpu.py`) should be faster still; the benchmark
  (`benchmarks/attention.py`) measures the gap against cuDNN, which decides
  whether porting the softmax path to Mosaic GPU is worth it.

The explicit `triton.CompilerParams` selects the Triton lowering even where
`jax_pallas_use_mosaic_gpu` defaults to Mosaic GPU.

Layout: [batch, time, heads, head_dim] as the ops take it (no transposes);
head_dim is zero-padded to a power of two and T to the block size.
Kernels (K/V of a head stay in global memory, tiles stream through a loop):

- forward, grid (q_blocks, batch, heads): a loop over the fully visible kv
  blocks without masking, then the diagonal blocks with the causal mask.
  LSSAR runs this twice, the first loop for Z and the row max;
- dq, grid (q_blocks, batch, heads); for LSSAR a first loop computes
  ε = Σ_j A_ij ∂L/∂A_ij, which the dk/dv kernel then reads;
- dk/dv, grid (kv_blocks, batch, kv_heads), looping over the query heads
  of the GQA group and the query blocks at or below the diagonal, so no
  atomics are needed and results are deterministic.

Packed documents (`segment_ids`): every row carries the index of its
document's first token ("start", int32 [B, T]; `_common.document_starts`).
Query i sees key j iff start_i ≤ j ≤ i, and its LSSAR position n is
i − start_i + 1. Documents are contiguous and starts never decrease along a
row, so the tiles a block can see form one contiguous range, which becomes
the loop bounds: hidden tiles are never visited (no loads, no compute).

- forward and dq: the kv blocks from the one holding the document start of
  the q block's first row up to the diagonal;
- dk/dv: the q blocks from the diagonal up to the last one whose first row's
  document starts at or before the kv block's last key (per-q-block starts,
  `q_first`, come as a small vector).

Every visited tile is masked then (cols ≤ rows and cols ≥ start). Running
the tiles that lie wholly inside every row's document unmasked, as without
documents, means a second loop body, and in the deviceless H100 compile
(bf16, B2 T8K H16) that raised registers or spills in all 12 kernels tried
(softmax at D = 64 and 128, LSSA and LSSAR at D = 128): softmax dq at D = 64
spilled 148 bytes instead of 24, LSSAR dk/dv at D = 128 2240 instead of 1248
(1068 without documents); the mask costs a few integer ops per score.

Without segment_ids none of this is traced.
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
from attnlab.ops.flash import _common, _tile

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b
_F32 = jnp.float32
LOG2_E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two). Defaults follow common Hopper FA2 settings, but
  dk/dv on 64×64 tiles (tokamax's tuned H100 backward tile): with a 128-row
  kv tile the dk/dv kernel spilled 556 / 760 bytes a thread at D = 128 / 64
  (softmax, H100 compile, `benchmarks/results/kernel_report_baseline_*`);
  64×64 removes the spill (`benchmarks/gpu_kernel_budgets.json`)."""

  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 128
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps: int | None = None  # None: 4 for head_dim <= 64, else 8
  num_stages: int = 2

  def largest(self) -> int:
    return max(
      self.block_q, self.block_k, self.block_q_dq, self.block_k_dq, self.block_q_dkv,
      self.block_k_dkv,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Config:
  kind: str
  power: float | None
  scale: float
  blocks: BlockSizes
  interpret: bool

  def params(self, head_dim: int, stages: int | None = None):
    warps = self.blocks.num_warps or (4 if head_dim <= 64 else 8)
    return pl_triton.CompilerParams(num_warps=warps, num_stages=stages or self.blocks.num_stages)


_BACKWARD_STATS = {
  "softmax": ("lse", "delta"),
  "lssa": ("z", "delta"),
  "lssar": ("z", "xmax", "bsum", "eps", "delta"),
}


def _logits(cfg: _Config, q, k, alpha, beta):
  """p = q·kᵀ and u = scale·α·β·p ([bq, bk] fp32); alpha [bq, 1], beta [1, bk] or None.

  Softmax logits come in log2 units (times log2 e) so that exp2, a single
  MUFU instruction, replaces exp; the lse residual is in log2 units too.
  """
  p = lax.dot_general(q, k, _NT, preferred_element_type=_F32)
  scale = cfg.scale * LOG2_E if cfg.kind == "softmax" else cfg.scale
  u = p * scale if scale != 1.0 else p
  if alpha is not None:
    u = u * alpha
  if beta is not None:
    u = u * beta
  return p, u


def _causal(q_start, k_start, bq: int, bk: int, masked: bool, start=None):
  """The visibility mask, or True for tiles known to be wholly visible.

  start: None, or the rows' document starts [bq] int32 (packed documents).
  """
  if not masked:
    return True
  rows = q_start + jnp.arange(bq, dtype=jnp.int32)
  cols = k_start + jnp.arange(bk, dtype=jnp.int32)
  mask = cols[None, :] <= rows[:, None]
  if start is not None:
    mask = mask & (cols[None, :] >= start[:, None])
  return mask


def _positions(q_start, bq: int, start=None):
  """1-based row positions [bq] (float): within the document where start is given."""
  rows = q_start + jnp.arange(bq, dtype=jnp.int32) + 1
  return (rows if start is None else rows - start).astype(_F32)


def _kv_ranges(q_start, bq: int, bk: int, start=None):
  """(lo, hi, masked) kv block ranges that a q block visits, in order.

  Without documents: [0, full) unmasked, then [full, last) up to the diagonal
  masked. With documents (start: the rows' starts, nondecreasing): [first,
  last) masked, first the block holding the first row's document start.
  """
  last = lax.div(q_start + bq + bk - 1, np.int32(bk))
  if start is not None:
    return ((lax.div(jnp.min(start), np.int32(bk)), last, True),)
  full = lax.div(q_start + 1, np.int32(bk))  # blocks ending at or before q_start
  return ((0, full, False), (full, last, True))


def _q_ranges(k_start, bq: int, bk: int, num_q: int, q_first=None):
  """(lo, hi, masked) q block ranges that a kv block visits, in order.

  Without documents: [first, full) straddle the diagonal (masked), [full,
  num_q) see the whole kv block. With documents (q_first: the start of each
  q block's first row, padded with int32 max): [first, end) masked, where q
  blocks [0, end) have a first row whose document starts at or before the kv
  block's last key.
  """
  first = lax.div(k_start, np.int32(bq))
  if q_first is not None:
    return ((first, jnp.sum(q_first <= k_start + bk - 1, dtype=jnp.int32), True),)
  full = jnp.minimum(lax.div(k_start + bk - 1 + bq - 1, np.int32(bq)), num_q)
  return ((first, full, True), (full, num_q, False))


def _loop(ranges, body, carry):
  """body(j, carry, masked) over each (lo, hi, masked) range of blocks in turn."""
  for lo, hi, masked in ranges:
    carry = lax.fori_loop(lo, hi, functools.partial(body, masked=masked), carry)
  return carry


def _fwd_kernel(*refs, cfg: _Config, names: tuple[str, ...]):
  r = dict(zip(names, refs))
  bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
  i = pl.program_id(0)
  q_start = i * bq
  q = r["q"][...]
  alpha = r["alpha"][...][:, None] if "alpha" in r else None
  start = r["start"][...] if "start" in r else None
  positions = _positions(q_start, bq, start)  # 1-based, i in the formulas
  n = positions[:, None]
  ranges = _kv_ranges(q_start, bq, bk, start)

  def tile(j, masked):
    k_start = pl.multiple_of(j * bk, bk)
    beta = r["beta"][pl.ds(k_start, bk)][None, :] if "beta" in r else None
    _, u = _logits(cfg, q, r["k"][pl.ds(k_start, bk), :], alpha, beta)
    return k_start, u, _causal(q_start, k_start, bq, bk, masked, start)

  def values(k_start):
    return r["v"][pl.ds(k_start, bk), :]

  def pv(weights, k_start):
    v = values(k_start)
    return lax.dot_general(weights.astype(v.dtype), v, _NN, preferred_element_type=_F32)

  dv = r["o"].shape[-1]
  acc = jnp.zeros((bq, dv), _F32)
  zeros = jnp.zeros((bq,), _F32)

  if cfg.kind == "softmax":

    def body(j, carry, masked):
      acc, m, total = carry
      k_start, u, mask = tile(j, masked)
      s = u if mask is True else jnp.where(mask, u, _tile.MASK_VALUE)
      m_next = jnp.maximum(m, jnp.max(s, axis=1))
      e = jnp.exp2(s - m_next[:, None])
      if mask is not True:
        e = jnp.where(mask, e, 0.0)
      corr = jnp.exp2(m - m_next)
      return acc * corr[:, None] + pv(e, k_start), m_next, total * corr + jnp.sum(e, axis=1)

    acc, m, total = _loop(ranges, body, (acc, zeros - jnp.inf, zeros))
    r["o"][...] = (acc / total[:, None]).astype(r["o"].dtype)
    r["lse"][...] = m + jnp.log2(total)  # log2 units
    return

  if cfg.kind == "lssa":

    def body(j, carry, masked):
      acc, z = carry
      k_start, u, mask = tile(j, masked)
      a = _tile.softplus(u)
      if mask is not True:
        a = jnp.where(mask, a, 0.0)
      return acc + pv(a, k_start), z + jnp.sum(a, axis=1)

    acc, z = _loop(ranges, body, (acc, zeros))
    r["o"][...] = (acc / z[:, None]).astype(r["o"].dtype)
    r["z"][...] = z
    return

  # LSSAR pass 1: Z and the row max of the softplus weights.
  def stats(j, carry, masked):
    z, amax = carry
    _, u, mask = tile(j, masked)
    a = _tile.softplus(u)
    if mask is not True:
      a = jnp.where(mask, a, 0.0)
    return z + jnp.sum(a, axis=1), jnp.maximum(amax, jnp.max(a, axis=1))

  z, amax = _loop(ranges, stats, (zeros, zeros))
  xmax = _tile.lssar_x(amax, z, positions)  # the row max of x, from the row max of a

  # Pass 2: the sharpened weights (x / max x)^p and their normalised sum.
  def body(j, carry, masked):
    acc, bsum = carry
    k_start, u, mask = tile(j, masked)
    y = _tile.lssar_y(_tile.softplus(u), z[:, None], xmax[:, None], n, mask)
    b = _tile.power(y, cfg.power)
    return acc + pv(b, k_start), bsum + jnp.sum(b, axis=1)

  acc, bsum = _loop(ranges, body, (acc, zeros))
  r["o"][...] = (acc * _tile.safe_reciprocal(bsum)[:, None]).astype(r["o"].dtype)
  r["z"][...] = z
  r["xmax"][...] = xmax
  r["bsum"][...] = bsum


def _row_stats(r, kind: str, index) -> dict:
  return {name: r[name][index][:, None] for name in _BACKWARD_STATS[kind] if name != "eps"}


def _dq_kernel(*refs, cfg: _Config, names: tuple[str, ...]):
  r = dict(zip(names, refs))
  bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
  i = pl.program_id(0)
  q_start = i * bq
  q, do = r["q"][...], r["do"][...]
  alpha = r["alpha"][...][:, None] if "alpha" in r else None
  start = r["start"][...] if "start" in r else None
  n = _positions(q_start, bq, start)[:, None]
  row = _row_stats(r, cfg.kind, Ellipsis)
  ranges = _kv_ranges(q_start, bq, bk, start)

  def tile(j, masked):
    k_start = pl.multiple_of(j * bk, bk)
    beta = r["beta"][pl.ds(k_start, bk)][None, :] if "beta" in r else None
    k = r["k"][pl.ds(k_start, bk), :]
    p, u = _logits(cfg, q, k, alpha, beta)
    v = r["v"][pl.ds(k_start, bk), :]
    dp = lax.dot_general(do, v, _NT, preferred_element_type=_F32)
    return k, beta, p, u, dp, _causal(q_start, k_start, bq, bk, masked, start)

  if cfg.kind == "lssar":

    def eps_body(j, eps, masked):
      _, _, _, u, dp, mask = tile(j, masked)
      part = _tile.lssar_eps_tile(
        u, mask, dp, row["delta"], z=row["z"], xmax=row["xmax"], bsum=row["bsum"], n=n,
        p=cfg.power,
      )  # fmt: skip
      return eps + jnp.sum(part, axis=1)

    eps = _loop(ranges, eps_body, jnp.zeros((bq,), _F32))
    r["eps"][...] = eps
    row["eps"] = eps[:, None]

  def body(j, carry, masked):
    dq, dalpha = carry
    k, beta, p, u, dp, mask = tile(j, masked)
    _, du = _tile.backward_tile(
      cfg.kind, u, mask, dp, row["delta"], lse=row.get("lse"), z=row.get("z"),
      xmax=row.get("xmax"), bsum=row.get("bsum"), eps=row.get("eps"), n=n, p=cfg.power,
      base2=True,
    )  # fmt: skip
    # u = scale·α·β·p: dL/dp = du·scale·α·β, dL/dα = Σ_j du·scale·β·p.
    dp_raw = du * cfg.scale if cfg.scale != 1.0 else du
    if beta is not None:
      dp_raw = dp_raw * beta
    if alpha is not None:
      dalpha = dalpha + jnp.sum(dp_raw * p, axis=1)
      dp_raw = dp_raw * alpha
    dq = dq + lax.dot_general(dp_raw.astype(k.dtype), k, _NN, preferred_element_type=_F32)
    return dq, dalpha

  init = (jnp.zeros(q.shape, _F32), jnp.zeros((bq,), _F32))
  dq, dalpha = _loop(ranges, body, init)
  r["dq"][...] = dq.astype(r["dq"].dtype)
  if "dalpha" in r:
    r["dalpha"][...] = dalpha


def _dkv_kernel(*refs, cfg: _Config, names: tuple[str, ...], group: int, num_q: int):
  r = dict(zip(names, refs))
  bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
  j, kv_head = pl.program_id(0), pl.program_id(2)
  k_start = j * bk
  k, v = r["k"][...], r["v"][...]
  beta = r["beta"][...][None, :] if "beta" in r else None
  ranges = _q_ranges(k_start, bq, bk, num_q, r["q_first"][...] if "q_first" in r else None)

  def q_body(i, carry, masked, head):
    dk, dv, dbeta = carry
    q_start = pl.multiple_of(i * bq, bq)
    rows = pl.ds(q_start, bq)
    q, do = r["q"][rows, head, :], r["do"][rows, head, :]
    alpha = r["alpha"][head, rows][:, None] if "alpha" in r else None
    row = {name: r[name][head, rows][:, None] for name in _BACKWARD_STATS[cfg.kind]}
    start = r["start"][rows] if "start" in r else None
    n = _positions(q_start, bq, start)[:, None]
    mask = _causal(q_start, k_start, bq, bk, masked, start)
    p, u = _logits(cfg, q, k, alpha, beta)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=_F32)
    w, du = _tile.backward_tile(
      cfg.kind, u, mask, dp, row["delta"], lse=row.get("lse"), z=row.get("z"),
      xmax=row.get("xmax"), bsum=row.get("bsum"), eps=row.get("eps"), n=n, p=cfg.power,
      base2=True,
    )  # fmt: skip
    dv = dv + lax.dot_general(w.astype(do.dtype), do, _TN, preferred_element_type=_F32)
    dp_raw = du * cfg.scale if cfg.scale != 1.0 else du
    if alpha is not None:
      dp_raw = dp_raw * alpha
    if beta is not None:
      dbeta = dbeta + jnp.sum(dp_raw * p, axis=0)
      dp_raw = dp_raw * beta
    dk = dk + lax.dot_general(dp_raw.astype(q.dtype), q, _TN, preferred_element_type=_F32)
    return dk, dv, dbeta

  def head_body(g, carry):
    head = kv_head * group + g
    return _loop(ranges, lambda i, c, masked: q_body(i, c, masked, head), carry)

  init = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32), jnp.zeros((bk,), _F32))
  dk, dv, dbeta = lax.fori_loop(0, group, head_body, init)
  r["dk"][...] = dk.astype(r["dk"].dtype)
  r["dv"][...] = dv.astype(r["dv"].dtype)
  if "dbeta" in r:
    r["dbeta"][...] = dbeta


def _call(kernel, cfg: _Config, grid, inputs, outputs, head_dim: int, name: str, **kw):
  """inputs / outputs: lists of (name, array or ShapeDtypeStruct, BlockSpec)."""
  inputs = [item for item in inputs if item[1] is not None]
  names = tuple(n for n, _, _ in inputs) + tuple(n for n, _, _ in outputs)
  results = pl.pallas_call(
    functools.partial(kernel, cfg=cfg, names=names, **kw),
    grid=grid,
    in_specs=[spec for _, _, spec in inputs],
    out_specs=[spec for _, _, spec in outputs],
    out_shape=[shape for _, shape, _ in outputs],
    compiler_params=cfg.params(head_dim),
    interpret=cfg.interpret,
    name=name,
  )(*[array for _, array, _ in inputs])
  return dict(zip([n for n, _, _ in outputs], results))


def _forward(q, k, v, alpha, beta, starts, cfg: _Config):
  b, tp, h, d = q.shape
  group = h // k.shape[2]
  dv = v.shape[-1]
  bq = cfg.blocks.block_q
  tile = lambda width: pl.BlockSpec((None, bq, None, width), lambda i, b, h: (b, i, h, 0))
  seq = lambda width: pl.BlockSpec(
    (None, tp, None, width), lambda i, b, h: (b, 0, lax.div(h, np.int32(group)), 0)
  )
  row = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  col = pl.BlockSpec((None, None, tp), lambda i, b, h: (b, lax.div(h, np.int32(group)), 0))
  stats = {"softmax": ("lse",), "lssa": ("z",), "lssar": ("z", "xmax", "bsum")}[cfg.kind]
  outputs = [("o", jax.ShapeDtypeStruct((b, tp, h, dv), q.dtype), tile(dv))]
  outputs += [(s, jax.ShapeDtypeStruct((b, h, tp), _F32), row) for s in stats]
  inputs = [
    ("q", q, tile(d)), ("k", k, seq(d)), ("v", v, seq(dv)), ("alpha", alpha, row),
    ("beta", beta, col), ("start", starts, pl.BlockSpec((None, bq), lambda i, b, h: (b, i))),
  ]  # fmt: skip
  out = _call(
    _fwd_kernel, cfg, (tp // bq, b, h), inputs, outputs, d, f"attnlab_flash_{cfg.kind}_fwd"
  )
  return out.pop("o"), out


def _block_starts(starts, bq: int):
  """The start of each q block's first row, [B, n] with n a power of two (at
  least 16) for Triton; the padding blocks hold int32 max, so they count as
  seeing nothing."""
  if starts is None:
    return None
  first = starts[:, ::bq]
  n = max(16, pl.next_power_of_2(first.shape[1]))
  return jnp.pad(first, ((0, 0), (0, n - first.shape[1])), constant_values=np.iinfo(np.int32).max)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, alpha, beta, starts, cfg: _Config):
  return _forward(q, k, v, alpha, beta, starts, cfg)[0]


def _flash_fwd(q, k, v, alpha, beta, starts, cfg: _Config):
  o, stats = _forward(q, k, v, alpha, beta, starts, cfg)
  return o, (q, k, v, alpha, beta, starts, o, stats)


def _flash_bwd(cfg: _Config, saved, do):
  q, k, v, alpha, beta, starts, o, stats = saved
  b, tp, h, d = q.shape
  hk, dv = k.shape[2], v.shape[-1]
  group = h // hk
  do = do.astype(q.dtype)
  # Σ_d do·o per row, [B, H, T]: a cheap XLA reduction, fused with the transpose.
  delta = jnp.swapaxes(jnp.sum(o.astype(_F32) * do.astype(_F32), axis=-1), 1, 2)
  stats = {**stats, "delta": delta}

  bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
  tile = lambda width: pl.BlockSpec((None, bq, None, width), lambda i, b, h: (b, i, h, 0))
  seq = lambda width: pl.BlockSpec(
    (None, tp, None, width), lambda i, b, h: (b, 0, lax.div(h, np.int32(group)), 0)
  )
  row = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  col = pl.BlockSpec((None, None, tp), lambda i, b, h: (b, lax.div(h, np.int32(group)), 0))
  inputs = [
    ("q", q, tile(d)), ("k", k, seq(d)), ("v", v, seq(dv)), ("do", do, tile(dv)),
    ("alpha", alpha, row), ("beta", beta, col),
    ("start", starts, pl.BlockSpec((None, bq), lambda i, b, h: (b, i))),
  ]  # fmt: skip
  inputs += [(s, stats[s], row) for s in _BACKWARD_STATS[cfg.kind] if s != "eps"]
  outputs = [("dq", jax.ShapeDtypeStruct(q.shape, q.dtype), tile(d))]
  if alpha is not None:
    outputs.append(("dalpha", jax.ShapeDtypeStruct((b, h, tp), _F32), row))
  if cfg.kind == "lssar":
    outputs.append(("eps", jax.ShapeDtypeStruct((b, h, tp), _F32), row))
  out_q = _call(
    _dq_kernel, cfg, (tp // bq, b, h), inputs, outputs, d, f"attnlab_flash_{cfg.kind}_dq"
  )
  if cfg.kind == "lssar":
    stats["eps"] = out_q["eps"]

  bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
  whole = lambda width: pl.BlockSpec((None, tp, h, width), lambda j, b, g: (b, 0, 0, 0))
  kv_tile = lambda width: pl.BlockSpec((None, bk, None, width), lambda j, b, g: (b, j, g, 0))
  rows = pl.BlockSpec((None, h, tp), lambda j, b, g: (b, 0, 0))
  cols = pl.BlockSpec((None, None, bk), lambda j, b, g: (b, g, j))
  q_first = _block_starts(starts, bq)
  per_row = lambda n: pl.BlockSpec((None, n), lambda j, b, g: (b, 0))
  inputs = [
    ("q", q, whole(d)), ("k", k, kv_tile(d)), ("v", v, kv_tile(dv)), ("do", do, whole(dv)),
    ("alpha", alpha, rows), ("beta", beta, cols), ("start", starts, per_row(tp)),
    ("q_first", q_first, per_row(None if q_first is None else q_first.shape[1])),
  ]  # fmt: skip
  inputs += [(s, stats[s], rows) for s in _BACKWARD_STATS[cfg.kind]]
  outputs = [
    ("dk", jax.ShapeDtypeStruct(k.shape, k.dtype), kv_tile(d)),
    ("dv", jax.ShapeDtypeStruct(v.shape, v.dtype), kv_tile(dv)),
  ]
  if beta is not None:
    outputs.append(("dbeta", jax.ShapeDtypeStruct((b, hk, tp), _F32), cols))
  out_kv = _call(
    _dkv_kernel, cfg, (tp // bk, b, hk), inputs, outputs, d, f"attnlab_flash_{cfg.kind}_dkv",
    group=group, num_q=tp // bq,
  )  # fmt: skip
  dalpha, dbeta = out_q.get("dalpha"), out_kv.get("dbeta")
  return out_q["dq"], out_kv["dk"], out_kv["dv"], dalpha, dbeta, None


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
  blocks: BlockSizes | None = None,
  interpret: bool | None = None,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """Causal flash attention of the given kind on a GPU (or interpreted).

  Args:
    q: [batch, time, heads, head_dim]
    k: [batch, time, kv_heads, head_dim]; kv_heads divides heads.
    v: [batch, time, kv_heads, head_dim_v]
    alpha: optional [batch, time, heads] row factor of the logits.
    beta: optional [batch, time, kv_heads] column factor of the logits.
    kind: 'softmax', 'lssa' or 'lssar' (needs `power`).
    scale: constant factor of the logits.
    blocks: tile sizes and launch parameters.
    interpret: None (interpret unless compiled for a GPU) or a bool.
    segment_ids: optional [batch, time] integer document ids of packed rows:
      a query sees only earlier keys of its own document (see the module
      docstring). The row factor α must already use positions within the
      document where it depends on them (`_common.softplus_factors`).

  Returns:
    [batch, time, heads, head_dim_v] in q's dtype.
  """
  if kind not in _tile.KINDS or (kind == "lssar") != (power is not None):
    raise ValueError(f"bad kind/power: {kind!r}, {power!r}")
  _common.check_shapes(q, k, v, "pallas_gpu")
  _common.check_segments(segment_ids, q, "pallas_gpu")
  dtype = _dispatch.kernel_dtype("pallas_gpu", q, k, v)
  blocks = blocks or BlockSizes()
  if interpret is None:
    interpret = _dispatch.interpret_default("gpu", q)
  cfg = _Config(kind, None if power is None else float(power), float(scale), blocks, interpret)
  t, d, dv = q.shape[1], q.shape[-1], v.shape[-1]
  tp = _common.round_up(t, blocks.largest())
  # Triton tiles need power-of-two widths; zero columns change no dot product.
  width = lambda n: max(16, pl.next_power_of_2(n))
  prep = lambda x, n: _common.pad_axis(_common.pad_axis(x.astype(dtype), 1, tp), 3, width(n))
  rows = lambda x: (
    None if x is None else _common.pad_axis(jnp.swapaxes(x.astype(_F32), 1, 2), 2, tp)
  )
  starts = _common.padded_starts(segment_ids, tp)
  o = _flash(prep(q, d), prep(k, d), prep(v, dv), rows(alpha), rows(beta), starts, cfg)
  return o[:, :t, :, :dv].astype(q.dtype)
