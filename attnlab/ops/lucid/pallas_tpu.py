"""LUCID's preconditioned values V′ = L⁻¹V on TPU (Mosaic, `pl.pallas_call`).

Grid (batch, kv_heads): one program solves one head's whole sequence, its
keys, values and V′ resident in VMEM ([time, head_dim] each), sweeping row
blocks in order (forward) or in reverse (the transposed solve of the VJP);
the body is `_solve.forward_body` / `backward_body`. The key RMS-norm and
the exponential kernel are fused into the tiles, each diagonal block is
inverted in the kernel, and nothing T×T is ever stored: HBM traffic is
O(T·D) per head against the xla path's per-block [block, T] kernel rows.

VMEM grows with T (float32, double-buffered: 8·T·(2D + 3Dv) bytes in the
backward), so the limit is raised to fit; `implementation=None` takes the
xla path past 90 MiB (about 18K tokens at D = Dv = 128). A context
(cached earlier tokens, decoding) is folded into the right-hand side in XLA
first, as the xla path does. Off TPU the kernels run in TPU interpret mode.

Packed documents (`segment_ids`, `_solve.Documents`): each token's document
end rides along in VMEM as one [1, block] row per block ([blocks, block]
int32, a few KiB), and per block the first and the stop block of the
document-sharing range sit in SMEM ([batch · blocks] int32 each); the loops
over earlier and later blocks run only over that range.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnlab.ops import _dispatch
from attnlab.ops.flash import _common
from attnlab.ops.lucid import _solve

_F32 = jnp.float32
LANES = 128


@dataclasses.dataclass(frozen=True)
class _Config:
  block: int
  num_blocks: int
  eps: float
  interpret: Any
  packed: bool = False  # packed documents: three more inputs after the operands


def _access(refs: dict, block: int):
  def load(name, start):
    return refs[name][pl.ds(pl.multiple_of(start, block), block), :]

  def store(name, start, value):
    refs[name][pl.ds(pl.multiple_of(start, block), block), :] = value.astype(refs[name].dtype)

  return load, store, lambda: None


def _split(refs, num_inputs: int, cfg: _Config):
  """(operand refs, `_solve.Documents` or None, output refs) of a kernel's refs."""
  if not cfg.packed:
    return refs[:num_inputs], None, refs[num_inputs:]
  ends, first, stop = refs[num_inputs : num_inputs + 3]
  base = pl.program_id(0) * cfg.num_blocks
  docs = _solve.Documents(
    ends=lambda j: ends[pl.ds(j, 1), :],
    first=lambda i: first[base + i],
    stop=lambda i: stop[base + i],
  )
  return refs[:num_inputs], docs, refs[num_inputs + 3 :]


def _fwd_kernel(*refs, cfg: _Config):
  (k_ref, v_ref), docs, (vp_ref,) = _split(refs, 2, cfg)
  load, store, barrier = _access({"k": k_ref, "v": v_ref, "vp": vp_ref}, cfg.block)
  _solve.forward_body(
    load, store, barrier, block=cfg.block, num_blocks=cfg.num_blocks, eps=cfg.eps, docs=docs
  )


def _bwd_kernel(*refs, cfg: _Config):
  (k_ref, vp_ref, g_ref), docs, (dk_ref, dv_ref) = _split(refs, 3, cfg)
  refs = {"k": k_ref, "vp": vp_ref, "g": g_ref, "dk": dk_ref, "dv": dv_ref}
  load, store, barrier = _access(refs, cfg.block)
  _solve.backward_body(
    load, store, barrier, block=cfg.block, num_blocks=cfg.num_blocks, eps=cfg.eps, docs=docs
  )


def _call(kernel, cfg: _Config, inputs, out_widths, name: str, docs=None):
  b, h, tp = inputs[0].shape[:3]
  spec = lambda w: pl.BlockSpec((None, None, tp, w), lambda b, h: (b, h, 0, 0))
  widths = [x.shape[-1] for x in inputs] + list(out_widths)
  resident = _solve.tpu_resident_vmem_bytes(tp, widths)  # lane-padded, double-buffered
  in_specs = [spec(x.shape[-1]) for x in inputs]
  arrays = list(inputs)
  if docs is not None:  # document ends per block row (VMEM), block ranges (SMEM)
    ends, first, stop = docs
    n = cfg.num_blocks
    arrays += [ends.reshape(b, n, cfg.block), first.reshape(-1), stop.reshape(-1)]
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    in_specs += [pl.BlockSpec((None, n, cfg.block), lambda b, h: (b, 0, 0)), smem, smem]
    resident += _solve.tpu_document_vmem_bytes(n, cfg.block)
  vmem = min(96 * 2**20, max(32 * 2**20, resident + 8 * 2**20))
  return pl.pallas_call(
    functools.partial(kernel, cfg=cfg),
    grid=(b, h),
    in_specs=in_specs,
    out_specs=[spec(w) for w in out_widths],
    out_shape=[jax.ShapeDtypeStruct((b, h, tp, w), _F32) for w in out_widths],
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=vmem
    ),
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
  interpret: Any = None,
) -> jax.Array:
  """See `attnlab.ops.lucid_values`: [B,T,H,D] raw keys, [B,T,H,Dv] values -> V′ (float32).

  Args:
    block_size: rows per block; the kernel uses the largest power of two
      not above it (at least 8).
    segment_ids: optional [B, T] int document ids of packed rows (no context).
    interpret: None (interpret unless compiling for TPU), False, True or a
      `pltpu.InterpretParams`.
  """
  if interpret is None:
    interpret = _dispatch.interpret_default("tpu", k, v) and pltpu.InterpretParams()
  t = k.shape[1]
  rhs = v.astype(_F32)
  if context_keys is not None:
    rhs = rhs - _solve.context_term(k, context_keys, context_values, context_length, eps)
  block = _solve.kernel_block(t, block_size)
  tp = _common.round_up(t, block)
  docs = None if segment_ids is None else _solve.document_blocks(segment_ids, tp, block)
  cfg = _Config(block, tp // block, float(eps), interpret, docs is not None)
  prep = lambda x: _common.pad_axis(jnp.swapaxes(x.astype(_F32), 1, 2), 2, tp)
  vp = _lucid_solve(prep(k), prep(rhs), docs, cfg)
  return jnp.swapaxes(vp[:, :, :t], 1, 2)
