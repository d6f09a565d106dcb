"""Chunked state-passing kernels on TPU (Mosaic TPU, `pl.pallas_call`): the
gated delta rule and linear attention.

The split between XLA and the kernels, and why, is in `_common` (as fla: the WY/UT factors are batched XLA ops; the
sequential state pass, forward and backward, is the kernel). Here:

- forward, grid (batch, value head, value block, chunk), the chunk axis last
  and "arbitrary": the state [K, block_v] stays in an f32 VMEM scratch across
  the chunks of one (batch, head, value block), each step reads one chunk's
  q, k (head hv // group: GVA without repeats), W, U and γ, and writes that
  chunk's output. In the backward's recomputing pass it writes the
  chunk-start states instead of the output;
- backward, the same grid walked in reverse chunk order (the index maps read
  chunk N − 1 − n), with dS in VMEM scratch; it writes dq, dk, dW, dγ per
  value block (summed in XLA) and dU, dS₀.

Layouts: head-major [B, H, T, D] so each block's two minor dims are
(chunk, head_dim), the (8, 128) tiling Mosaic wants (the chunk a multiple of
8, head dims whole or multiples of 128). γ and the document counts travel as
[.., N, 1, C] rows, one [1, C] block per chunk; columns are formed in the
kernel from the diagonal, so no transposes are needed.

On a non-TPU target the kernels run in TPU interpret mode
(`pltpu.InterpretParams`), which is how the CPU test-suite checks them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnlab.ops import _dispatch, _dtypes
from attnlab.ops.chunk_state import _common as common

LANES = 128
SUBLANES = 8
_F32 = jnp.float32

_OPS = common.TileOps(iota=lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim))


@dataclasses.dataclass(frozen=True)
class _Options:
  interpret: Any  # False, True or a pltpu.InterpretParams
  vmem_limit_bytes: int | None


def _params(options: _Options):
  return pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
    vmem_limit_bytes=options.vmem_limit_bytes,
  )


def _fwd_kernel(*refs, cfg: common.ChunkConfig, names: tuple[str, ...], num_chunks: int):
  r = dict(zip(names, refs))
  n = pl.program_id(3)

  @pl.when(n == 0)
  def _init():
    r["acc_s"][...] = r["s0"][...].astype(_F32)

  state = r["acc_s"][...]
  if "states" in r:
    r["states"][...] = state.astype(r["states"].dtype)
  count = r["count"][...] if "count" in r else None
  w = r["w"][...] if "w" in r else None  # None: linear attention
  gate = r["gate"][...] if "gate" in r else None  # NAtS-L's write gate
  o, state = common.chunk_forward(
    _OPS, cfg, r["q"][...], r["k"][...], w, r["u"][...], r["gamma"][...], count,
    state, output="o" in r, gate_row=gate,
  )  # fmt: skip
  if "o" in r:
    r["o"][...] = o.astype(r["o"].dtype)
  r["acc_s"][...] = state

  @pl.when(n == num_chunks - 1)
  def _finish():
    r["final"][...] = state


def _bwd_kernel(*refs, cfg: common.ChunkConfig, names: tuple[str, ...], num_chunks: int):
  r = dict(zip(names, refs))
  n = pl.program_id(3)

  @pl.when(n == 0)
  def _init():
    r["acc_ds"][...] = r["dfinal"][...]

  count = r["count"][...] if "count" in r else None
  w = r["w"][...] if "w" in r else None
  gate = r["gate"][...] if "gate" in r else None
  grads = common.chunk_backward(
    _OPS, cfg, r["q"][...], r["k"][...], w, r["u"][...], r["gamma"][...], count,
    r["states"][...], r["do"][...], r["acc_ds"][...], gate_row=gate,
  )  # fmt: skip
  for name in ("dq", "dk", "dw", "du", "dgamma", "dgate"):
    if name in r:
      r[name][...] = grads[name].astype(r[name].dtype)
  r["acc_ds"][...] = grads["dstate"]

  @pl.when(n == num_chunks - 1)
  def _finish():
    r["ds0"][...] = grads["dstate"]


def _specs(cfg: common.ChunkConfig, q, w, u, reverse: bool, num_chunks: int):
  """BlockSpec makers for grid (b, hv, vb, n); `reverse` walks the chunks backwards."""
  c, bv = cfg.chunk, cfg.block_v
  kw = q.shape[-1]
  group = u.shape[1] // q.shape[1]
  chunk_of = (lambda n: num_chunks - 1 - n) if reverse else (lambda n: n)
  return dict(
    qk=pl.BlockSpec((None, None, c, kw), lambda b, h, j, n: (b, lax.div(h, group), chunk_of(n), 0)),
    w=pl.BlockSpec((None, None, c, kw), lambda b, h, j, n: (b, h, chunk_of(n), 0)),
    v=pl.BlockSpec((None, None, c, bv), lambda b, h, j, n: (b, h, chunk_of(n), j)),
    gamma=pl.BlockSpec((None, None, None, 1, c), lambda b, h, j, n: (b, h, chunk_of(n), 0, 0)),
    count=pl.BlockSpec((None, None, 1, c), lambda b, h, j, n: (b, chunk_of(n), 0, 0)),
    state=pl.BlockSpec((None, None, kw, bv), lambda b, h, j, n: (b, h, 0, j)),
    states=pl.BlockSpec((None, None, None, kw, bv), lambda b, h, j, n: (b, h, chunk_of(n), 0, j)),
    per_block=pl.BlockSpec((None, None, None, c, kw), lambda b, h, j, n: (j, b, h, chunk_of(n), 0)),
    dgamma=pl.BlockSpec(
      (None, None, None, None, 1, c), lambda b, h, j, n: (j, b, h, chunk_of(n), 0, 0)
    ),
  )


def _rows(x, c):  # [B, .., Tp] -> [B, .., N, 1, C]
  return x.reshape(*x.shape[:-1], x.shape[-1] // c, 1, c)


def _call(kernel, cfg, grid, inputs, outputs, scratch, name):
  """inputs / outputs: [(name, array or ShapeDtypeStruct, BlockSpec)], None arrays dropped."""
  inputs = [item for item in inputs if item[1] is not None]
  names = tuple(n for n, _, _ in inputs) + tuple(n for n, _, _ in outputs)
  names += tuple(n for n, _ in scratch)
  results = pl.pallas_call(
    functools.partial(kernel, cfg=cfg, names=names, num_chunks=grid[-1]),
    grid=grid,
    in_specs=[spec for _, _, spec in inputs],
    out_specs=[spec for _, _, spec in outputs],
    out_shape=[shape for _, shape, _ in outputs],
    scratch_shapes=[pltpu.VMEM(shape, _F32) for _, shape in scratch],
    compiler_params=_params(cfg.backend),
    interpret=cfg.backend.interpret,
    name=name,
  )(*[array for _, array, _ in inputs])
  return dict(zip([n for n, _, _ in outputs], results))


def _forward(cfg, q, k, gamma, count, gate, w, u, s0, states: bool):
  b, hv, tp, kw = *u.shape[:3], q.shape[3]
  vw, c, bv = u.shape[-1], cfg.chunk, cfg.block_v
  nc = tp // c
  spec = _specs(cfg, q, w, u, False, nc)
  inputs = [
    ("q", q, spec["qk"]), ("k", k, spec["qk"]), ("w", w, spec["w"]), ("u", u, spec["v"]),
    ("gamma", _rows(gamma, c), spec["gamma"]),
    ("count", None if count is None else _rows(count, c), spec["count"]),
    ("gate", None if gate is None else _rows(gate, c), spec["gamma"]),
    ("s0", s0, spec["state"]),
  ]  # fmt: skip
  outputs = [("final", jax.ShapeDtypeStruct((b, hv, kw, vw), _F32), spec["state"])]
  if states:
    shape = jax.ShapeDtypeStruct((b, hv, nc, kw, vw), q.dtype)
    outputs.append(("states", shape, spec["states"]))
  else:
    outputs.append(("o", jax.ShapeDtypeStruct((b, hv, tp, vw), q.dtype), spec["v"]))
  out = _call(
    _fwd_kernel, cfg, (b, hv, vw // bv, nc), inputs, outputs, [("acc_s", (kw, bv))],
    "attnlab_gdn_states" if states else "attnlab_gdn_fwd",
  )  # fmt: skip
  return out.get("o"), out["final"], out.get("states")


def _backward(cfg, q, k, gamma, count, gate, w, u, states, do, dfinal):
  b, hv, tp, kw = *u.shape[:3], q.shape[3]
  vw, c, bv = u.shape[-1], cfg.chunk, cfg.block_v
  nc, nv = tp // c, vw // bv
  spec = _specs(cfg, q, w, u, True, nc)
  inputs = [
    ("q", q, spec["qk"]), ("k", k, spec["qk"]), ("w", w, spec["w"]), ("u", u, spec["v"]),
    ("gamma", _rows(gamma, c), spec["gamma"]),
    ("count", None if count is None else _rows(count, c), spec["count"]),
    ("gate", None if gate is None else _rows(gate, c), spec["gamma"]),
    ("states", states, spec["states"]), ("do", do, spec["v"]), ("dfinal", dfinal, spec["state"]),
  ]  # fmt: skip
  per_block = jax.ShapeDtypeStruct((nv, b, hv, tp, kw), _F32)
  outputs = [
    ("dq", per_block, spec["per_block"]), ("dk", per_block, spec["per_block"]),
    *([("dw", per_block, spec["per_block"])] if w is not None else []),
    ("du", jax.ShapeDtypeStruct((b, hv, tp, vw), _F32), spec["v"]),
    ("dgamma", jax.ShapeDtypeStruct((nv, b, hv, nc, 1, c), _F32), spec["dgamma"]),
    *([("dgate", jax.ShapeDtypeStruct((nv, b, hv, nc, 1, c), _F32), spec["dgamma"])]
      if gate is not None else []),
    ("ds0", jax.ShapeDtypeStruct((b, hv, kw, vw), _F32), spec["state"]),
  ]  # fmt: skip
  out = _call(
    _bwd_kernel, cfg, (b, hv, nv, nc), inputs, outputs, [("acc_ds", (kw, bv))], "attnlab_gdn_bwd"
  )
  dgamma = out["dgamma"].reshape(nv, b, hv, tp)
  dgate = None if gate is None else out["dgate"].reshape(nv, b, hv, tp)
  return out["dq"], out["dk"], out.get("dw"), dgamma, dgate, out["du"], out["ds0"]


_BACKEND = common.Backend(forward=_forward, backward=_backward)


def _width(n: int) -> int:
  """Head dims up to 128 stay whole (a full-dim block); larger ones go to lane tiles."""
  return n if n <= LANES else common.round_up(n, LANES)


def _launch(chunk_size: int, t: int, block_v: int | None, vmem_limit_bytes, interpret, arrays):
  if chunk_size < 8 or chunk_size % SUBLANES:
    raise ValueError(f"pallas_tpu: chunk_size must be a multiple of 8, got {chunk_size}")
  if interpret is None:
    interpret = pltpu.InterpretParams() if _dispatch.interpret_default("tpu", *arrays) else False
  return common.Launch(
    backend=_BACKEND,
    chunk=min(chunk_size, common.round_up(t, SUBLANES)),
    width=_width,
    block_v=lambda vw: block_v or (vw if vw <= LANES else LANES),
    options=_Options(interpret, vmem_limit_bytes),
    name="pallas_tpu",
  )


def gated_delta_rule(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  g: jax.Array,
  beta: jax.Array,
  *,
  scale: float,
  initial_state: jax.Array | None = None,
  chunk_size: int = 64,
  segment_ids: jax.Array | None = None,
  inverse_dtype: Any = None,
  write_gate: jax.Array | None = None,
  block_v: int | None = None,
  vmem_limit_bytes: int | None = None,
  interpret: Any = None,
) -> tuple[jax.Array, jax.Array]:
  """The chunked gated delta rule on TPU; same contract as the xla path.

  Args:
    q, k: [batch, time, heads, head_dim]; v: [batch, time, v_heads,
      head_dim_v], v_heads a multiple of heads (GVA; q/k are not repeated).
    g: [batch, time, v_heads] log decay; beta: [batch, time, v_heads].
    scale: factor on q (the api's default is head_dim**-0.5).
    initial_state: [batch, v_heads, head_dim, head_dim_v] or None (zeros).
    chunk_size: chunk length, a multiple of 8 (shortened for short inputs).
    segment_ids: [batch, time] int document ids or None (see the api).
    inverse_dtype: dtype of the in-chunk inverse (I + A)⁻¹ and its products
      (XLA side). None: float32, also for bf16 inputs: bf16 destabilises the
      inverse for long chunks and strong keys; 'bfloat16' is faster.
    write_gate: [batch, ceil(time / chunk_size), v_heads] or None: scales
      each chunk's write into the state (NAtS-L's block gate, chunk = block);
      the chunk's own outputs see its writes ungated.
    block_v: value columns per program (default: all up to 128, else 128);
      must divide head_dim_v (padded to a multiple of 128 above 128).
    vmem_limit_bytes: Mosaic's scoped VMEM limit (None: the compiler default).
    interpret: None (TPU interpret mode unless compiling for a TPU), False,
      True or a `pltpu.InterpretParams`.

  Returns:
    (o [batch, time, v_heads, head_dim_v] in the inputs' dtype, final state
    [batch, v_heads, head_dim, head_dim_v] float32). Matmuls take bf16
    operands for bf16 inputs and accumulate in float32; the state is float32.
  """
  launch = _launch(chunk_size, q.shape[1], block_v, vmem_limit_bytes, interpret, (q, k, v))
  return common.gated_delta_rule(
    launch, q, k, v, g, beta, scale=scale, initial_state=initial_state,
    segment_ids=segment_ids, inverse_dtype=inverse_dtype, write_gate=write_gate,
  )  # fmt: skip


def linear_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  normalize: bool = False,
  scale: float | None = None,
  initial_state: Any = None,
  output_final_state: bool = False,
  chunk_size: int = 64,
  segment_ids: jax.Array | None = None,
  block_v: int | None = None,
  vmem_limit_bytes: int | None = None,
  interpret: Any = None,
) -> tuple[jax.Array, Any]:
  """Causal linear attention on TPU; same contract as `attnlab.ops.linear_attention`.

  The gated delta rule's state pass with no correction and no decay: the
  state [head_dim, block_v] stays in VMEM across the chunks, so no per-chunk
  state reaches HBM (the xla path's prefix sum writes one per chunk).
  block_v, vmem_limit_bytes, interpret: as `gated_delta_rule`; with
  normalize the value width is head_dim_v + 1 (the normaliser's column).
  """
  launch = _launch(chunk_size, q.shape[1], block_v, vmem_limit_bytes, interpret, (q, k, v))
  return common.linear_attention(
    launch, q, k, v, normalize=normalize, scale=_dtypes.default_scale(q.shape[-1], scale),
    initial_state=initial_state, output_final_state=output_final_state, segment_ids=segment_ids,
  )  # fmt: skip
