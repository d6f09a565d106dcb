"""Chunked state-passing kernels: the gated delta rule and linear attention.

Math shared by the Pallas backends (jax and numpy only). Linear attention is
the same sequential pass with no correction term (W = 0, U = V) and no decay
(γ = 0); `w=None` drops W's matmuls from both kernels rather than multiplying
by zeros, so it costs 3 matmuls per chunk, not 4.

Design: the work splits the way fla's Triton kernels split it.

1. Per-chunk pieces that do not depend on the state run as batched XLA ops
   (`prepare`), for all chunks at once, and autodiff differentiates them:
   γ = the in-chunk cumulative log decay, A = strict_lower(diag(β) K Kᵀ ⊙ Γ),
   the inverse (I + A)⁻¹ (in `inverse_dtype`, float32 by default) and the WY
   factors U = (I + A)⁻¹ diag(β) V, W = (I + A)⁻¹ diag(β e^γ) K. These are
   dense, independent C×C problems, which XLA already batches onto the MXU /
   tensor cores; a kernel would gain little and would need its own backward.
2. The sequential pass over chunks is the Pallas kernel (`core`, a
   `jax.custom_vjp`), one program per (batch, value head, value block):

       V' = U − W S                                   (corrected values)
       O  = diag(e^γ) (scale·Q) S + (scale·Q Kᵀ ⊙ Γ) V'
       S  ← e^{γ_C} S + (K ⊙ e^{γ_C − γ})ᵀ V'

   with the state S [K, block_v] in float32 on chip, so no per-chunk state
   is written in the forward pass and the output is fused with the state
   update. Its backward recomputes the chunk-start states with the same
   kernel (as fla does: they cost 4·C·K·V flops per chunk, less than storing
   them between the passes costs memory), then runs a reverse kernel that
   carries dS and emits dQ, dK, dW, dU, dγ and dS₀ per chunk. The value
   columns of S evolve independently, so both kernels split V into blocks;
   dQ, dK, dW and dγ come out per value block and per value head and are
   summed in XLA, which is how GVA needs no atomics and no repeated q/k: the
   q/k BlockSpecs index head hv // group.

Packed sequences: `segment_ids` become a per-token count of document starts
since the chunk start. In the kernels it masks Γ to pairs in one document,
drops e^γ (the chunk-start state) for tokens after a boundary, keeps only
the chunk's last document in the state write, and zeroes e^{γ_C} when the
chunk holds a boundary, exactly as the xla path's masks.

Only the math on one chunk's tile values lives here (`chunk_forward`,
`chunk_backward`); each backend supplies its matmul forms and iota, loads
and stores the tiles, and drives the loop (a TPU grid axis or a GPU
fori_loop). The functions take and return 2-D values only, row vectors as
[1, C] and columns as [C, 1], the layouts both lowerings handle.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from attnlab.ops import _dispatch, _linalg

F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ bᵀ
_TN = (((0,), (0,)), ((), ()))  # aᵀ @ b


@dataclasses.dataclass(frozen=True)
class TileOps:
  """What a backend provides to the chunk math: iota and the three matmul forms."""

  iota: Callable[[tuple[int, int], int], jax.Array]
  transpose_lhs: Callable[[jax.Array], jax.Array] | None = None  # None: dot_general aᵀb

  def dot(self, a: jax.Array, b: jax.Array, dims) -> jax.Array:
    # f32 operands at HIGHEST: TPUs otherwise round them to one bf16 pass.
    precision = lax.Precision.HIGHEST if a.dtype == F32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)

  def nn(self, a, b):
    return self.dot(a, b, _NN)

  def nt(self, a, b):
    return self.dot(a, b, _NT)

  def tn(self, a, b):
    if self.transpose_lhs is not None:
      return self.dot(self.transpose_lhs(a), b, _NN)
    return self.dot(a, b, _TN)


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
  """Static settings of one kernel call (hashable: a custom_vjp argument)."""

  chunk: int
  scale: float
  block_v: int
  dtype: Any  # matmul operand dtype (the inputs' dtype)
  segments: bool
  backend: Any  # the backend's own static options (hashable)


@dataclasses.dataclass(frozen=True)
class _Masks:
  gamma_col: jax.Array  # [C, 1] γ_i
  gamma_row: jax.Array  # [1, C] γ_j
  decay: jax.Array  # [C, C] Γ_ij, zero above the diagonal and across documents
  decay_t: jax.Array  # [C, C] Γᵀ
  e_col: jax.Array  # [C, 1] e^{γ_i} (0 where token i must not read the chunk-start state)
  write_col: jax.Array  # [C, 1] e^{γ_C − γ_i} · gate_i (0 outside the chunk's last document)
  write_raw: jax.Array  # [C, 1] the same without the write gate
  e_last: jax.Array  # [1, 1] e^{γ_C} (0 when the chunk holds a document start)
  eye: jax.Array  # [C, C] bool
  is_last: jax.Array  # [1, C] bool, lane C − 1


def _col(row: jax.Array, eye: jax.Array) -> jax.Array:
  """[1, C] -> [C, 1] without a transpose: the diagonal's row sums."""
  return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _row(col: jax.Array, eye: jax.Array) -> jax.Array:
  """[C, 1] -> [1, C]: the diagonal's column sums."""
  return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def _lane(row: jax.Array, pick: jax.Array) -> jax.Array:
  """[1, C] -> [1, 1]: the entry where `pick` [1, C] is set."""
  return jnp.sum(jnp.where(pick, row, 0.0), axis=1, keepdims=True)


def _sum_all(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _masks(
  ops: TileOps,
  gamma_row: jax.Array,
  count_row: jax.Array | None,
  gate_row: jax.Array | None,
  c: int,
) -> _Masks:
  rows, cols = ops.iota((c, c), 0), ops.iota((c, c), 1)
  eye = rows == cols
  lower, upper = rows >= cols, rows <= cols
  is_last = ops.iota((1, c), 1) == c - 1
  gamma_col = _col(gamma_row, eye)
  gamma_last = _lane(gamma_row, is_last)
  e_col = jnp.exp(gamma_col)
  write_col = jnp.exp(gamma_last - gamma_col)
  e_last = jnp.exp(gamma_last)
  if count_row is not None:
    count_col = _col(count_row, eye)
    count_last = _lane(count_row, is_last)
    same = count_col == count_row
    lower, upper = lower & same, upper & same
    e_col = jnp.where(count_col == 0, e_col, 0.0)
    write_col = jnp.where(count_col == count_last, write_col, 0.0)
    e_last = jnp.where(count_last == 0, e_last, 0.0)
  write_raw = write_col
  if gate_row is not None:
    write_col = write_col * _col(gate_row, eye)
  diff = gamma_col - gamma_row  # ≤ 0 on and below the diagonal
  decay = jnp.where(lower, jnp.exp(jnp.where(lower, diff, 0.0)), 0.0)
  decay_t = jnp.where(upper, jnp.exp(jnp.where(upper, -diff, 0.0)), 0.0)
  return _Masks(
    gamma_col, gamma_row, decay, decay_t, e_col, write_col, write_raw, e_last, eye, is_last
  )


def chunk_forward(
  ops: TileOps,
  cfg: ChunkConfig,
  q: jax.Array,
  k: jax.Array,
  w: jax.Array,
  u: jax.Array,
  gamma_row: jax.Array,
  count_row: jax.Array | None,
  state: jax.Array,
  *,
  output: bool = True,
  gate_row: jax.Array | None = None,
) -> tuple[jax.Array | None, jax.Array]:
  """One chunk of the forward pass on one value block.

  Args:
    q, k, w: [C, K] tiles (w None: no correction, V' = U); u: [C, BV];
      gamma_row, count_row: [1, C] f32;
    state: [K, BV] f32, the state at the chunk start.
    output: also form the chunk's output (the backward's state pass does not).
    gate_row: [1, C] f32 or None; scales token i's write into the state
      (NAtS-L's per-block write gate: constant over a chunk = block).

  Returns:
    (o [C, BV] f32 or None, the state after the chunk [K, BV] f32).
  """
  dt = cfg.dtype
  m = _masks(ops, gamma_row, count_row, gate_row, cfg.chunk)
  s = state.astype(dt)
  v_new = u.astype(F32) if w is None else u.astype(F32) - ops.nn(w, s)  # V' = U − W S
  vd = v_new.astype(dt)
  o = None
  if output:
    qs = q.astype(F32) * cfg.scale
    p = ops.nt(qs.astype(dt), k) * m.decay
    o = ops.nn((qs * m.e_col).astype(dt), s) + ops.nn(p.astype(dt), vd)
  k_write = (k.astype(F32) * m.write_col).astype(dt)
  return o, m.e_last * state + ops.tn(k_write, vd)


def chunk_backward(
  ops: TileOps,
  cfg: ChunkConfig,
  q: jax.Array,
  k: jax.Array,
  w: jax.Array,
  u: jax.Array,
  gamma_row: jax.Array,
  count_row: jax.Array | None,
  state: jax.Array,
  do: jax.Array,
  dstate: jax.Array,
  gate_row: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """One chunk of the reverse pass on one value block.

  Args:
    q, k, w, u, gamma_row, count_row, gate_row: as in `chunk_forward`.
    state: [K, BV], the chunk-start state (from the recomputing pass).
    do: [C, BV] output cotangent; dstate: [K, BV] f32, the cotangent of the
      state after the chunk.

  Returns:
    dict of f32 values: dq, dk, dw [C, K] (None without w); du [C, BV]; dstate [K, BV] (of the
    chunk-start state); dgamma, dgate [1, C] (this value block's share; dgate
    None without a gate).
  """
  dt = cfg.dtype
  m = _masks(ops, gamma_row, count_row, gate_row, cfg.chunk)
  s32 = state.astype(F32)
  s, dod, dsd = state.astype(dt), do.astype(dt), dstate.astype(dt)
  qs = q.astype(F32) * cfg.scale
  qsd = qs.astype(dt)
  v_new = u.astype(F32) if w is None else u.astype(F32) - ops.nn(w, s)
  vd = v_new.astype(dt)
  k_write = k.astype(F32) * m.write_col

  qk = ops.nt(qsd, k)
  p = qk * m.decay  # scale·Q Kᵀ ⊙ Γ
  p_t = ops.nt(k, qsd) * m.decay_t  # its transpose, formed directly
  dp = ops.nt(dod, vd)  # ∂L/∂P
  dp_t = ops.nt(vd, dod)
  # V' feeds the output through P and the state through K ⊙ e^{γ_C − γ}.
  dv_new = ops.nn(p_t.astype(dt), dod) + ops.nn(k_write.astype(dt), dsd)
  dvd = dv_new.astype(dt)
  dq_state = ops.nt(dod, s) * m.e_col  # through diag(e^γ) Q S
  dqs = dq_state + ops.nn((dp * m.decay).astype(dt), k)
  dk_write = ops.nt(vd, dsd)  # ∂L/∂(K ⊙ e^{γ_C − γ})
  dk = ops.nn((dp_t * m.decay_t).astype(dt), qsd) + dk_write * m.write_col
  qe = (qs * m.e_col).astype(dt)
  dstate_prev = m.e_last * dstate + ops.tn(qe, dod)
  dw = None
  if w is not None:
    dw = -ops.nt(dvd, s)
    dstate_prev = dstate_prev - ops.tn(w, dvd)

  # dγ: e^{γ_i} on q_i, Γ_ij = e^{γ_i − γ_j}, e^{γ_C − γ_i} on k_i, e^{γ_C} on S.
  mixed = dp * p
  k_term = jnp.sum(dk_write * k_write, axis=1, keepdims=True)
  col = jnp.sum(dq_state * qs, axis=1, keepdims=True) + jnp.sum(mixed, axis=1, keepdims=True)
  col = col - k_term
  last = _sum_all(k_term) + m.e_last * _sum_all(s32 * dstate)
  dgamma = (
    _row(col, m.eye) - jnp.sum(mixed, axis=0, keepdims=True) + jnp.where(m.is_last, last, 0.0)
  )
  dgate = None
  if gate_row is not None:
    dgate = _row(jnp.sum(dk_write * k.astype(F32) * m.write_raw, axis=1, keepdims=True), m.eye)
  return dict(
    dq=dqs * cfg.scale, dk=dk, dw=dw, du=dv_new, dstate=dstate_prev, dgamma=dgamma, dgate=dgate
  )


# --- the XLA side: preparation, padding and the custom VJP -------------------------------


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def document_counts(segment_ids: jax.Array, t_padded: int, chunk: int) -> jax.Array:
  """[B, T] ids -> [B, Tp] f32: document starts since the chunk start, per token.

  A document starts where the id changes; the row's first token never starts
  one (the initial state belongs to the row's first document). Padding
  repeats the last id, so it starts nothing.
  """
  b, t = segment_ids.shape
  seg = jnp.pad(segment_ids, ((0, 0), (0, t_padded - t)), mode="edge")
  starts = jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  count = jnp.cumsum(starts.reshape(b, -1, chunk).astype(jnp.int32), axis=-1)
  return count.reshape(b, t_padded).astype(F32)


def _einsum(spec: str, a: jax.Array, b: jax.Array, operand) -> jax.Array:
  precision = _linalg.matmul_precision(operand)
  return jnp.einsum(
    spec, a.astype(operand), b.astype(operand), precision=precision, preferred_element_type=F32
  )


def prepare(
  k: jax.Array,
  v: jax.Array,
  g: jax.Array,
  beta: jax.Array,
  count: jax.Array | None,
  *,
  chunk: int,
  inverse_dtype,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """γ and the WY factors, batched over all chunks (plain XLA, differentiable).

  Args:
    k: [B, H, Tp, K] operand dtype; v: [B, HV, Tp, V]; g, beta:
      [B, HV, Tp] f32; count: [B, Tp] document counts or None. Tp = N·C.
    inverse_dtype: dtype of (I + A)⁻¹ and its products with β V, β e^γ K.

  Returns:
    γ [B, HV, Tp] f32, W [B, HV, Tp, K] and U [B, HV, Tp, V] in k's dtype.
  """
  b, h, tp, dk = k.shape
  hv, dv = v.shape[1], v.shape[3]
  grp, n = hv // h, tp // chunk
  operand = k.dtype
  inv_dtype = jnp.dtype(inverse_dtype)
  kc = k.reshape(b, h, n, chunk, dk)
  vc = v.reshape(b, h, grp, n, chunk, dv)
  gc, bc = (a.reshape(b, h, grp, n, chunk) for a in (g, beta))
  gamma = jnp.cumsum(gc, axis=-1)
  strict = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
  inclusive = jnp.tril(jnp.ones((chunk, chunk), bool))
  e_gamma = jnp.exp(gamma)
  if count is not None:
    cc = count.reshape(b, 1, 1, n, chunk)
    same = cc[..., :, None] == cc[..., None, :]
    strict, inclusive = strict & same, inclusive & same
    e_gamma = jnp.where(cc == 0, e_gamma, 0.0)  # after a boundary, nothing reads S
  diff = gamma[..., :, None] - gamma[..., None, :]
  decay = jnp.where(inclusive, jnp.exp(jnp.where(inclusive, diff, 0.0)), 0.0)
  kk = _einsum("bhnik,bhnjk->bhnij", kc, kc, operand)[:, :, None]  # once per q/k head
  a = jnp.where(strict, bc[..., :, None] * kk * decay, 0.0).astype(inv_dtype)
  with jax.default_matmul_precision("highest" if inv_dtype.itemsize >= 4 else "default"):
    inv = _linalg.unit_lower_inverse(a)  # [B,H,G,N,C,C]
  u = _einsum("bhgnij,bhgnjv->bhgniv", inv * bc[..., None, :].astype(inv_dtype), vc, inv_dtype)
  w = _einsum(
    "bhgnij,bhnjk->bhgnik", inv * (bc * e_gamma)[..., None, :].astype(inv_dtype), kc, inv_dtype
  )
  return (
    gamma.reshape(b, hv, tp),
    w.reshape(b, hv, tp, dk).astype(operand),
    u.reshape(b, hv, tp, dv).astype(operand),
  )


@dataclasses.dataclass(frozen=True)
class Backend:
  """A backend's two kernel calls (hashable, static under jit).

  forward(cfg, q, k, gamma, count, gate, w, u, s0, states: bool)
      -> (o [B,HV,Tp,V] or None, final [B,HV,K,V] f32, states [B,HV,N,K,V] or None)
  backward(cfg, q, k, gamma, count, gate, w, u, states, do, dfinal)
      -> (dq, dk, dw [NV,B,HV,Tp,K] (None without w), dgamma, dgate [NV,B,HV,Tp]
          (dgate None without a gate), du [B,HV,Tp,V], ds0 [B,HV,K,V])

  gate [B,HV,Tp] f32 or None: per-token write gate (see `chunk_forward`).
  """

  forward: Callable
  backward: Callable


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def core(backend: Backend, cfg: ChunkConfig, q, k, gamma, count, gate, w, u, s0):
  """The sequential pass: (o [B,HV,Tp,V], final state [B,HV,K,V] f32); gate, w may be None."""
  o, final, _ = backend.forward(cfg, q, k, gamma, count, gate, w, u, s0, False)
  return o, final


def _core_fwd(backend, cfg, q, k, gamma, count, gate, w, u, s0):
  o, final, _ = backend.forward(cfg, q, k, gamma, count, gate, w, u, s0, False)
  return (o, final), (q, k, gamma, count, gate, w, u, s0)


def _core_bwd(backend, cfg, saved, cotangents):
  q, k, gamma, count, gate, w, u, s0 = saved
  do, dfinal = cotangents
  _, _, states = backend.forward(cfg, q, k, gamma, count, gate, w, u, s0, True)
  dq, dk, dw, dgamma, dgate, du, ds0 = backend.backward(
    cfg, q, k, gamma, count, gate, w, u, states, do.astype(q.dtype), dfinal.astype(F32)
  )
  b, h, tp, dkk = q.shape
  hv = u.shape[1]
  # Sum the value blocks, then the value heads of each q/k group.
  per_qk = lambda x: jnp.sum(x, axis=0).reshape(b, h, hv // h, tp, dkk).sum(axis=2)
  dcount = None if count is None else jnp.zeros_like(count)
  return (
    per_qk(dq).astype(q.dtype),
    per_qk(dk).astype(k.dtype),
    jnp.sum(dgamma, axis=0),
    dcount,
    None if gate is None else jnp.sum(dgate, axis=0),
    None if w is None else jnp.sum(dw, axis=0).astype(w.dtype),
    du.astype(u.dtype),
    ds0.astype(s0.dtype),
  )


core.defvjp(_core_fwd, _core_bwd)


@dataclasses.dataclass(frozen=True)
class Launch:
  """How one backend lays out a call (static): its kernels and tile rules.

  chunk: the chunk length its tiles allow; width(n): the padded head dim
  they need; block_v: value columns per program (divides width(V));
  options: its static kernel options; name: for error messages.
  """

  backend: Backend
  chunk: int
  width: Callable[[int], int]
  block_v: Callable[[int], int]  # padded V width -> block_v
  options: Any
  name: str


def _padded(launch: Launch, q, k, v, initial_state, segment_ids):
  """Head-major, zero-padded tiles: (qh, kh, vh [B,H(V),Tp,width], s0 f32, count, cfg pieces).

  Zero padding of T (k = v = β = g = 0) leaves the state alone; zero columns
  of K and V change no dot product.
  """
  b, t, h, dk = q.shape
  hv, dv = v.shape[2], v.shape[3]
  dtype = _dispatch.kernel_dtype(launch.name, q, k, v)
  tp = round_up(t, launch.chunk)
  kw, vw = launch.width(dk), launch.width(dv)
  block_v = launch.block_v(vw)
  if block_v > vw or vw % block_v:
    raise ValueError(f"{launch.name}: block_v {block_v} must divide the padded head_dim_v {vw}")
  s0 = jnp.zeros((b, hv, dk, dv), F32) if initial_state is None else initial_state.astype(F32)
  s0 = _pad(_pad(s0, 2, kw), 3, vw)
  heads = lambda x, n: _pad(_pad(jnp.swapaxes(x.astype(dtype), 1, 2), 2, tp), 3, n)
  count = None if segment_ids is None else document_counts(segment_ids, tp, launch.chunk)
  return heads(q, kw), heads(k, kw), heads(v, vw), s0, count, dtype, tp, block_v


def _config(launch: Launch, scale: float, block_v: int, dtype, count) -> ChunkConfig:
  return ChunkConfig(
    launch.chunk, float(scale), block_v, jnp.dtype(dtype), count is not None, launch.options
  )


def gated_delta_rule(
  launch: Launch,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  g: jax.Array,
  beta: jax.Array,
  *,
  scale: float,
  initial_state: jax.Array | None,
  segment_ids: jax.Array | None,
  inverse_dtype,
  write_gate: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The gated delta rule on one backend: pad, prepare (XLA), the kernel pass, unpad.

  Args: as the backends' `gated_delta_rule`, with q, k [B,T,H,K], v
  [B,T,HV,V], g, beta [B,T,HV]; write_gate [B, ceil(T / chunk), HV] or None
  scales each chunk's write into the state (NAtS-L's block gate, chunk =
  block; the chunk's own outputs still see its writes ungated).

  Returns:
    (o [B,T,HV,V] in the inputs' dtype, final state [B,HV,K,V] f32).
  """
  t, dk, dv = q.shape[1], q.shape[3], v.shape[3]
  qh, kh, vh, s0, count, dtype, tp, block_v = _padded(launch, q, k, v, initial_state, segment_ids)
  rows = lambda x: _pad(jnp.swapaxes(x.astype(F32), 1, 2), 2, tp)
  inverse_dtype = F32 if inverse_dtype is None else inverse_dtype
  gamma, w, u = prepare(
    kh, vh, rows(g), rows(beta), count, chunk=launch.chunk, inverse_dtype=inverse_dtype
  )
  cfg = _config(launch, scale, block_v, dtype, count)
  gate = None
  if write_gate is not None:  # per chunk -> per token, the rows the kernels read
    gate = rows(jnp.repeat(write_gate, launch.chunk, axis=1)[:, : q.shape[1]])
  o, final = core(launch.backend, cfg, qh, kh, gamma, count, gate, w, u, s0)
  return jnp.swapaxes(o[:, :, :t, :dv], 1, 2), final[:, :, :dk, :dv]


def linear_attention(
  launch: Launch,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  normalize: bool,
  scale: float,
  initial_state,
  output_final_state: bool,
  segment_ids: jax.Array | None,
):
  """Causal linear attention on one backend: the state pass with W = 0, U = V, γ = 0.

  With `normalize`, v gets a column of ones, so the same pass carries the
  key sum z next to the state and returns the normaliser Σ_{s≤t} q_t·k_s next
  to the numerator (the ratio does not depend on the scale, so it runs at 1).

  Args: as `attnlab.ops.linear_attention` (q, k, v [B,T,H,D(v)]).

  Returns:
    (o [B,T,H,Dv] in the inputs' dtype, final state (f32, a pair with
    normalize) or None).
  """
  b, t, h, dk = q.shape
  dv = v.shape[3]
  if normalize:
    kv0, z0 = (None, None) if initial_state is None else initial_state
    v = jnp.concatenate([v, jnp.ones((b, t, h, 1), v.dtype)], axis=-1)
    if kv0 is not None:
      initial_state = jnp.concatenate([kv0.astype(F32), z0.astype(F32)[..., None]], axis=-1)
    scale = 1.0
  qh, kh, vh, s0, count, dtype, tp, block_v = _padded(launch, q, k, v, initial_state, segment_ids)
  gamma = jnp.zeros((b, h, tp), F32)
  cfg = _config(launch, scale, block_v, dtype, count)
  o, final = core(launch.backend, cfg, qh, kh, gamma, count, None, None, vh, s0)
  o = jnp.swapaxes(o[:, :, :t, : v.shape[3]], 1, 2).astype(F32)
  final = final[:, :, :dk, : v.shape[3]]
  if normalize:
    o = o[..., :dv] / o[..., dv:]
    final = (final[..., :dv], final[..., dv])
  return o.astype(q.dtype), final if output_final_state else None
