"""Chunked state-passing kernels on NVIDIA GPUs (Pallas, Triton lowering): the
gated delta rule and linear attention.

The split between XLA and the kernels, and why, is in `_common` (as fla: the WY/UT factors are batched XLA ops; the
sequential state pass, forward and backward, is the kernel). Here one
program per (value block, batch, value head) walks all chunks in a
`fori_loop` (fla's `chunk_gated_delta_rule_fwd_h` does the same), carrying
the state [K, block_v] in registers in float32:

- forward: per chunk, V' = U − W S, the chunk's output and the state
  update; in the backward's recomputing pass it writes the chunk-start
  states instead of the output;
- backward: the chunks in reverse, carrying dS; dq, dk, dW, dγ per value
  block (summed in XLA, so GVA needs no atomics), dU and dS₀.

q and k are read at head hv // group by the BlockSpec index maps, so GVA
never repeats them. Splitting V over programs (block_v, default 64) gives
B·HV·V/64 programs, the parallelism a long sequence of few heads needs.

Why the Triton lowering, not Mosaic GPU (see `attnlab.ops.flash.pallas_gpu`
for the longer argument): the kernel body is plain Pallas tile code, which
Pallas's generic interpret mode runs on a CPU, so the CPU test-suite checks
forward and every gradient (Mosaic GPU has an interpret mode of its own too,
but a port would need hand-managed pipelines); the kernel is a loop of small
(C × K) · (K × block_v) matmuls, which Triton maps to the tensor cores (wgmma
on sm_90). Widths are padded to powers of two
(Triton tiles), and T to the chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from attnlab.ops import _dispatch, _dtypes
from attnlab.ops.chunk_state import _common as common

_F32 = jnp.float32


def _iota(shape: tuple[int, int], dim: int) -> jax.Array:
  # 1-D aranges broadcast up: the form the Triton lowering takes.
  x = jnp.arange(shape[dim], dtype=jnp.int32)
  x = x[:, None] if dim == 0 else x[None, :]
  return jnp.broadcast_to(x, shape)


_OPS = common.TileOps(iota=_iota)


@dataclasses.dataclass(frozen=True)
class _Options:
  interpret: bool
  num_warps: int
  num_stages: int


def _row(ref, start, c):  # a [C] slice of a [Tp] ref as a [1, C] row
  return ref[pl.ds(start, c)][None, :]


def _fwd_kernel(*refs, cfg: common.ChunkConfig, names: tuple[str, ...], num_chunks: int):
  r = dict(zip(names, refs))
  c = cfg.chunk

  def body(n, state):
    start = pl.multiple_of(n * c, c)
    rows = pl.ds(start, c)
    if "states" in r:
      r["states"][n] = state.astype(r["states"].dtype)
    count = _row(r["count"], start, c) if "count" in r else None
    w = r["w"][rows, :] if "w" in r else None  # None: linear attention
    gate = _row(r["gate"], start, c) if "gate" in r else None  # NAtS-L's write gate
    o, state = common.chunk_forward(
      _OPS, cfg, r["q"][rows, :], r["k"][rows, :], w, r["u"][rows, :],
      _row(r["gamma"], start, c), count, state, output="o" in r, gate_row=gate,
    )  # fmt: skip
    if "o" in r:
      r["o"][rows, :] = o.astype(r["o"].dtype)
    return state

  r["final"][...] = lax.fori_loop(0, num_chunks, body, r["s0"][...].astype(_F32))


def _bwd_kernel(*refs, cfg: common.ChunkConfig, names: tuple[str, ...], num_chunks: int):
  r = dict(zip(names, refs))
  c = cfg.chunk

  def body(i, dstate):
    n = num_chunks - 1 - i
    start = pl.multiple_of(n * c, c)
    rows = pl.ds(start, c)
    count = _row(r["count"], start, c) if "count" in r else None
    w = r["w"][rows, :] if "w" in r else None
    gate = _row(r["gate"], start, c) if "gate" in r else None
    grads = common.chunk_backward(
      _OPS, cfg, r["q"][rows, :], r["k"][rows, :], w, r["u"][rows, :],
      _row(r["gamma"], start, c), count, r["states"][n], r["do"][rows, :], dstate,
      gate_row=gate,
    )  # fmt: skip
    for name in ("dq", "dk", "dw", "du"):
      if name in r:
        r[name][rows, :] = grads[name].astype(r[name].dtype)
    r["dgamma"][rows] = jnp.sum(grads["dgamma"], axis=0)
    if "dgate" in r:
      r["dgate"][rows] = jnp.sum(grads["dgate"], axis=0)
    return grads["dstate"]

  r["ds0"][...] = lax.fori_loop(0, num_chunks, body, r["dfinal"][...])


def _specs(cfg: common.ChunkConfig, q, w, u):
  """BlockSpec makers for grid (value block j, batch b, value head h)."""
  tp, kw = q.shape[2], q.shape[3]
  group, bv, nc = u.shape[1] // q.shape[1], cfg.block_v, tp // cfg.chunk
  return dict(
    qk=pl.BlockSpec((None, None, tp, kw), lambda j, b, h: (b, lax.div(h, group), 0, 0)),
    w=pl.BlockSpec((None, None, tp, kw), lambda j, b, h: (b, h, 0, 0)),
    v=pl.BlockSpec((None, None, tp, bv), lambda j, b, h: (b, h, 0, j)),
    gamma=pl.BlockSpec((None, None, tp), lambda j, b, h: (b, h, 0)),
    count=pl.BlockSpec((None, tp), lambda j, b, h: (b, 0)),
    state=pl.BlockSpec((None, None, kw, bv), lambda j, b, h: (b, h, 0, j)),
    states=pl.BlockSpec((None, None, nc, kw, bv), lambda j, b, h: (b, h, 0, 0, j)),
    per_block=pl.BlockSpec((None, None, None, tp, kw), lambda j, b, h: (j, b, h, 0, 0)),
    dgamma=pl.BlockSpec((None, None, None, tp), lambda j, b, h: (j, b, h, 0)),
  )


def _call(kernel, cfg, grid, inputs, outputs, name):
  inputs = [item for item in inputs if item[1] is not None]
  names = tuple(n for n, _, _ in inputs) + tuple(n for n, _, _ in outputs)
  options = cfg.backend
  results = pl.pallas_call(
    functools.partial(kernel, cfg=cfg, names=names, num_chunks=inputs[0][1].shape[2] // cfg.chunk),
    grid=grid,
    in_specs=[spec for _, _, spec in inputs],
    out_specs=[spec for _, _, spec in outputs],
    out_shape=[shape for _, shape, _ in outputs],
    compiler_params=pl_triton.CompilerParams(
      num_warps=options.num_warps, num_stages=options.num_stages
    ),
    interpret=options.interpret,
    name=name,
  )(*[array for _, array, _ in inputs])
  return dict(zip([n for n, _, _ in outputs], results))


def _forward(cfg, q, k, gamma, count, gate, w, u, s0, states: bool):
  b, hv, tp, kw = *u.shape[:3], q.shape[3]
  vw, bv = u.shape[-1], cfg.block_v
  spec = _specs(cfg, q, w, u)
  inputs = [
    ("q", q, spec["qk"]), ("k", k, spec["qk"]), ("w", w, spec["w"]), ("u", u, spec["v"]),
    ("gamma", gamma, spec["gamma"]), ("count", count, spec["count"]), ("gate", gate, spec["gamma"]),
    ("s0", s0, spec["state"]),
  ]  # fmt: skip
  outputs = [("final", jax.ShapeDtypeStruct((b, hv, kw, vw), _F32), spec["state"])]
  if states:
    shape = jax.ShapeDtypeStruct((b, hv, tp // cfg.chunk, kw, vw), q.dtype)
    outputs.append(("states", shape, spec["states"]))
  else:
    outputs.append(("o", jax.ShapeDtypeStruct((b, hv, tp, vw), q.dtype), spec["v"]))
  out = _call(
    _fwd_kernel, cfg, (vw // bv, b, hv), inputs, outputs,
    "attnlab_gdn_states" if states else "attnlab_gdn_fwd",
  )  # fmt: skip
  return out.get("o"), out["final"], out.get("states")


def _backward(cfg, q, k, gamma, count, gate, w, u, states, do, dfinal):
  b, hv, tp, kw = *u.shape[:3], q.shape[3]
  vw, bv = u.shape[-1], cfg.block_v
  nv = vw // bv
  spec = _specs(cfg, q, w, u)
  inputs = [
    ("q", q, spec["qk"]), ("k", k, spec["qk"]), ("w", w, spec["w"]), ("u", u, spec["v"]),
    ("gamma", gamma, spec["gamma"]), ("count", count, spec["count"]), ("gate", gate, spec["gamma"]),
    ("states", states, spec["states"]), ("do", do, spec["v"]), ("dfinal", dfinal, spec["state"]),
  ]  # fmt: skip
  per_block = jax.ShapeDtypeStruct((nv, b, hv, tp, kw), _F32)
  outputs = [
    ("dq", per_block, spec["per_block"]), ("dk", per_block, spec["per_block"]),
    *([("dw", per_block, spec["per_block"])] if w is not None else []),
    ("du", jax.ShapeDtypeStruct((b, hv, tp, vw), _F32), spec["v"]),
    ("dgamma", jax.ShapeDtypeStruct((nv, b, hv, tp), _F32), spec["dgamma"]),
    *([("dgate", jax.ShapeDtypeStruct((nv, b, hv, tp), _F32), spec["dgamma"])]
      if gate is not None else []),
    ("ds0", jax.ShapeDtypeStruct((b, hv, kw, vw), _F32), spec["state"]),
  ]  # fmt: skip
  out = _call(_bwd_kernel, cfg, (nv, b, hv), inputs, outputs, "attnlab_gdn_bwd")
  dgate = out.get("dgate")
  return out["dq"], out["dk"], out.get("dw"), out["dgamma"], dgate, out["du"], out["ds0"]


_BACKEND = common.Backend(forward=_forward, backward=_backward)


def _width(n: int) -> int:
  return max(16, pl.next_power_of_2(n))  # Triton tiles: powers of two, dots ≥ 16


def _launch(chunk_size: int, t: int, block_v, num_warps, num_stages, interpret, arrays):
  if chunk_size < 16 or chunk_size & (chunk_size - 1):
    raise ValueError(f"pallas_gpu: chunk_size must be a power of two ≥ 16, got {chunk_size}")
  if interpret is None:
    interpret = _dispatch.interpret_default("gpu", *arrays)
  return common.Launch(
    backend=_BACKEND,
    chunk=min(chunk_size, max(16, pl.next_power_of_2(t))),
    width=_width,
    block_v=lambda vw: block_v or min(64, vw),
    options=_Options(bool(interpret), num_warps, num_stages),
    name="pallas_gpu",
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
  num_warps: int = 4,
  num_stages: int = 2,
  interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The chunked gated delta rule on a GPU; same contract as the xla path.

  Args:
    q, k: [batch, time, heads, head_dim]; v: [batch, time, v_heads,
      head_dim_v], v_heads a multiple of heads (GVA; q/k are not repeated).
    g: [batch, time, v_heads] log decay; beta: [batch, time, v_heads].
    scale: factor on q (the api's default is head_dim**-0.5).
    initial_state: [batch, v_heads, head_dim, head_dim_v] or None (zeros).
    chunk_size: chunk length, a power of two ≥ 16.
    segment_ids: [batch, time] int document ids or None (see the api).
    inverse_dtype: dtype of the in-chunk inverse (I + A)⁻¹ and its products
      (XLA side). None: float32, also for bf16 inputs: bf16 destabilises the
      inverse for long chunks and strong keys; 'bfloat16' is faster.
    write_gate: [batch, ceil(time / chunk_size), v_heads] or None: scales
      each chunk's write into the state (NAtS-L's block gate, chunk = block);
      the chunk's own outputs see its writes ungated.
    block_v: value columns per program, a power of two (default min(64, V)).
    num_warps, num_stages: Triton launch parameters of both kernels.
    interpret: None (interpret unless compiling for a GPU) or a bool.

  Returns:
    (o [batch, time, v_heads, head_dim_v] in the inputs' dtype, final state
    [batch, v_heads, head_dim, head_dim_v] float32). Matmuls take bf16
    operands for bf16 inputs and accumulate in float32; the state is float32.
  """
  launch = _launch(chunk_size, q.shape[1], block_v, num_warps, num_stages, interpret, (q, k, v))
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
  num_warps: int = 4,
  num_stages: int = 2,
  interpret: bool | None = None,
) -> tuple[jax.Array, Any]:
  """Causal linear attention on a GPU; same contract as `attnlab.ops.linear_attention`.

  The gated delta rule's state pass with no correction and no decay, the
  state [head_dim, block_v] in registers across the chunks. block_v,
  num_warps, num_stages, interpret: as `gated_delta_rule`; with normalize
  the value width is head_dim_v + 1 (the normaliser's column), padded to a
  power of two.
  """
  launch = _launch(chunk_size, q.shape[1], block_v, num_warps, num_stages, interpret, (q, k, v))
  return common.linear_attention(
    launch, q, k, v, normalize=normalize, scale=_dtypes.default_scale(q.shape[-1], scale),
    initial_state=initial_state, output_final_state=output_final_state, segment_ids=segment_ids,
  )  # fmt: skip
