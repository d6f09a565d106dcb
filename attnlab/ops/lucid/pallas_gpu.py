"""LUCID's preconditioned values V′ = L⁻¹V on NVIDIA GPUs (Pallas, Triton lowering).

Grid (batch, kv_heads): one program solves one head's whole sequence,
sweeping row blocks in order (forward) or in reverse (the transposed solve of
the VJP) with the bodies of `_solve`: key RMS-norm and exponential kernel
fused into the tiles, each diagonal block inverted in the kernel. Products
are float32-accurate, never TF32: by default (`precision='bf16x6'`) each is
six bf16 tensor-core products (`_solve.bf16x6_dot`); `precision='ieee'` is
Triton's IEEE float32 dot, which compiles to FMA loops (on the 2026-11-30
H200 its forward took 39 s to compile). K, V and V′ stay in global memory
and stream through the tiles; a block written by one row sweep is read back
by later rows of the same program, so a CTA barrier follows each row's stores.

The parallelism is batch × kv_heads programs, each serial over T/block
rows: enough to fill an H200 only at batch · kv_heads ≳ 100; below that the
xla path's batched matmuls may win (the benchmark measures both). Layout
[batch, time, heads, head_dim] as the op takes it, head_dim padded to a
power of two (>= 16). Off GPU the kernels run in interpret mode.

Packed documents (`segment_ids`, `_solve.Documents`): three more int32
inputs per batch row, each token's document end ([time]) and per block the
first and the stop block of the document-sharing range ([blocks], padded
to a power of two); the loops over earlier and later blocks run only over
that range.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from attnlab.ops import _dispatch
from attnlab.ops.flash import _common
from attnlab.ops.lucid import _solve

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Config:
  block: int
  num_blocks: int
  eps: float
  interpret: bool
  num_warps: int = 4
  precision: str = "bf16x6"
  packed: bool = False  # packed documents: three more inputs after the operands

  @property
  def dot(self) -> _solve.Dot:
    return _DOTS[self.precision]


_DOTS = {"bf16x6": _solve.bf16x6_dot, "ieee": _solve.dot}


def _access(refs: dict, block: int, interpret: bool):
  def load(name, start):
    return refs[name][pl.ds(pl.multiple_of(start, block), block), :]

  def store(name, start, value):
    refs[name][pl.ds(pl.multiple_of(start, block), block), :] = value.astype(refs[name].dtype)

  # Interpret mode runs the body sequentially and has no barrier to lower.
  barrier = (lambda: None) if interpret else pl_triton.debug_barrier
  return load, store, barrier


def _split(refs, num_inputs: int, cfg: _Config):
  """(operand refs, `_solve.Documents` or None, output refs) of a kernel's refs."""
  if not cfg.packed:
    return refs[:num_inputs], None, refs[num_inputs:]
  ends, first, stop = refs[num_inputs : num_inputs + 3]
  bs = cfg.block
  docs = _solve.Documents(
    ends=lambda j: ends[pl.ds(pl.multiple_of(j * bs, bs), bs)][None, :],
    first=lambda i: first[i],
    stop=lambda i: stop[i],
  )
  return refs[:num_inputs], docs, refs[num_inputs + 3 :]


def _fwd_kernel(*refs, cfg: _Config):
  (k_ref, v_ref), docs, (vp_ref,) = _split(refs, 2, cfg)
  load, store, barrier = _access({"k": k_ref, "v": v_ref, "vp": vp_ref}, cfg.block, cfg.interpret)
  _solve.forward_body(
    load, store, barrier, block=cfg.block, num_blocks=cfg.num_blocks, eps=cfg.eps, dot=cfg.dot,
    docs=docs,
  )  # fmt: skip


def _bwd_kernel(*refs, cfg: _Config):
  (k_ref, vp_ref, g_ref), docs, (dk_ref, dv_ref) = _split(refs, 3, cfg)
  refs = {"k": k_ref, "vp": vp_ref, "g": g_ref, "dk": dk_ref, "dv": dv_ref}
  load, store, barrier = _access(refs, cfg.block, cfg.interpret)
  _solve.backward_body(
    load, store, barrier, block=cfg.block, num_blocks=cfg.num_blocks, eps=cfg.eps, dot=cfg.dot,
    docs=docs,
  )  # fmt: skip


def _call(kernel, cfg: _Config, inputs, out_widths, name: str, docs=None):
  b, tp, h = inputs[0].shape[:3]
  spec = lambda w: pl.BlockSpec((None, tp, None, w), lambda b, h: (b, 0, h, 0))
  in_specs = [spec(x.shape[-1]) for x in inputs]
  arrays = list(inputs)
  if docs is not None:  # document ends per token, block ranges per block
    ends, first, stop = docs
    width = pl.next_power_of_2(cfg.num_blocks)
    arrays += [ends, _common.pad_axis(first, 1, width), _common.pad_axis(stop, 1, width)]
    in_specs += [
      pl.BlockSpec((None, tp), lambda b, h: (b, 0)),
      *[pl.BlockSpec((None, width), lambda b, h: (b, 0))] * 2,
    ]
  return pl.pallas_call(
    functools.partial(kernel, cfg=cfg),
    grid=(b, h),
    in_specs=in_specs,
    out_specs=[spec(w) for w in out_widths],
    out_shape=[jax.ShapeDtypeStruct((b, tp, h, w), _F32) for w in out_widths],
    compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
    interpret=cfg.interpret,
    name=name,
  )(*arrays)


_lucid_solve = _solve.kernel_solve(_call, _fwd_kernel, _bwd_kernel)


def preconditioned_values(
  k: jax.Array,
  v: jax.Array,
  *,
  eps: float,
  block_size: int,
  context_keys: jax.Array | None = None,
  context_values: jax.Array | None = None,
  context_length: jax.Array | int = 0,
  segment_ids: jax.Array | None = None,
  interpret: bool | None = None,
  num_warps: int = 4,
  precision: str = "bf16x6",
) -> jax.Array:
  """See `attnlab.ops.lucid_values`: [B,T,H,D] raw keys, [B,T,H,Dv] values -> V′ (float32).

  Args:
    block_size: rows per block; the kernel uses the largest power of two
      not above it (at least 16, Triton's smallest dot).
    segment_ids: optional [B, T] int document ids of packed rows (no context).
    interpret: None (interpret unless compiling for GPU) or a bool.
    precision: 'bf16x6' (six bf16 tensor-core products per matmul) or
      'ieee' (Triton's IEEE float32 dot); both float32-accurate.
  """
  if precision not in _DOTS:
    raise ValueError(
      f"pallas_gpu lucid_values: precision must be one of {tuple(_DOTS)}, got {precision!r}"
    )
  if interpret is None:
    interpret = _dispatch.interpret_default("gpu", k, v)
  t, d, dv = k.shape[1], k.shape[-1], v.shape[-1]
  rhs = v.astype(_F32)
  if context_keys is not None:
    rhs = rhs - _solve.context_term(k, context_keys, context_values, context_length, eps)
  block = max(16, _solve.kernel_block(t, block_size))
  tp = _common.round_up(t, block)
  width = lambda n: max(16, pl.next_power_of_2(n))
  # Key columns cannot be padded: the norm's mean and the kernel's √D use D.
  prep = lambda x, n: _common.pad_axis(_common.pad_axis(x.astype(_F32), 1, tp), 3, width(n))
  if width(d) != d:
    raise ValueError(f"pallas_gpu lucid_values: head_dim must be a power of two >= 16, got {d}")
  docs = None if segment_ids is None else _solve.document_blocks(segment_ids, tp, block)
  cfg = _Config(
    block, tp // block, float(eps), bool(interpret), num_warps, precision, docs is not None
  )
  vp = _lucid_solve(prep(k, d), prep(rhs, dv), docs, cfg)
  return vp[:, :t, :, :dv]
