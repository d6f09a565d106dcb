"""The blocked solve V′ = L⁻¹V and its VJP as kernel bodies, shared by both
LUCID kernel backends (jnp and lax only; the backends supply memory access
and the pallas_call), and the custom_vjp that joins them (`kernel_solve`).

One program owns one (batch, kv head) and the whole sequence; rows are cut
into blocks of `block` (a power of two). With k̂ the gain-free RMS-normalised
keys, computed from the raw keys as each block is loaded (the norm is fused),
and K_ij = exp(k̂_i k̂_jᵀ/√D − √D):

  forward, i = 0 .. n−1:  V′_i = X_i (V_i − Σ_{j<i} K_ij V′_j),
  backward, i = n−1 .. 0: dV_i = X_iᵀ (dV′_i − Σ_{j>i} K_jiᵀ dV_j),
                          dG_ij = −(dV_i V′_jᵀ) ∘ K_ij  (j < i; strict on j = i),
                          dk̂_i += s dG_ij k̂_j,  dk̂_j += s dG_ijᵀ k̂_i,

where X_i = (I + strict(K_ii))⁻¹ is formed in the kernel by
`unit_lower_inverse`, and finally dk = r dk̂ − (r³/D) k (k·dk̂) through the
norm (r = 1/rms). Every product is float32-accurate: the solve amplifies
rounding (on GPUs a single TF32 product would cost ~3 digits). `dot` (HIGHEST
precision) is the default matmul; a backend may pass its own of the same
accuracy, such as `bf16x6_dot`, which runs on tensor cores.

Packed documents (`Documents`): L has no entries between documents, so every
tile K_ij is multiplied by [doc(p) = doc(q)] for its rows p and columns q.
Documents are contiguous, and every tile the bodies form has q ≤ p, so the
test needs only the columns' side: p < end(q), the end (exclusive) of q's
document, read as a [1, block] row per column block. Tiles whose documents do
not meet are skipped: row block i's earlier loops start at first(i), the
block holding its first row's document start, and the transposed solve's
`later` loop stops at stop(i), one past the last block that a document of
block i reaches. Without documents nothing of this is traced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from attnlab.ops import _linalg, _segments
from attnlab.ops.lucid import _math

_F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))


Dot = Callable[..., jax.Array]  # (a, b, dims=_NN) -> float32 product


def dot(a: jax.Array, b: jax.Array, dims=_NN) -> jax.Array:
  return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=_F32)


def _bf16_parts(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x ≈ x₀ + x₁ + x₂ in bfloat16 (8 + 8 + 8 significand bits: float32's 24)."""
  x0 = x.astype(jnp.bfloat16)
  r = x - x0.astype(_F32)
  x1 = r.astype(jnp.bfloat16)
  return x0, x1, (r - x1.astype(_F32)).astype(jnp.bfloat16)


def bf16x6_dot(a: jax.Array, b: jax.Array, dims=_NN) -> jax.Array:
  """A float32 product from six bfloat16 ones (the terms xᵢyⱼ with i + j ≤ 2).

  Each bf16 × bf16 product is exact in float32, so this differs from an IEEE
  float32 matmul only by the dropped terms (~2⁻²⁴ relative) and summation
  order, on every backend alike: interpret mode on a CPU does the same
  arithmetic as the GPU, where the six products are tensor-core MMAs instead
  of the FMA loops an IEEE float32 dot compiles to in Triton. The smallest
  terms are added first.
  """
  a_parts, b_parts = _bf16_parts(a.astype(_F32)), _bf16_parts(b.astype(_F32))
  acc = None
  for i, j in ((1, 1), (0, 2), (2, 0), (0, 1), (1, 0), (0, 0)):
    term = lax.dot_general(a_parts[i], b_parts[j], dims, preferred_element_type=_F32)
    acc = term if acc is None else acc + term
  return acc


def normalize(k: jax.Array, eps: float) -> jax.Array:
  """[n, D] raw keys -> k̂ = k / sqrt(mean(k²) + eps) (float32)."""
  k = k.astype(_F32)
  return k * lax.rsqrt(jnp.mean(k * k, axis=-1, keepdims=True) + eps)


def kernel_tile(a: jax.Array, b: jax.Array, dot: Dot = dot) -> jax.Array:
  """exp(a bᵀ/√D − √D) for normalised [n, D] and [m, D]."""
  d = a.shape[-1] if a.shape[-1] else 1
  return jnp.exp(dot(a, b, _NT) * d**-0.5 - d**0.5)


def _iota(n: int, axis: int) -> jax.Array:
  return lax.broadcasted_iota(jnp.int32, (n, n), axis)


def strict_lower(x: jax.Array) -> jax.Array:
  n = x.shape[0]
  return jnp.where(_iota(n, 0) > _iota(n, 1), x, 0.0)


def unit_lower_inverse(a: jax.Array, dot: Dot = dot) -> jax.Array:
  """(I + a)⁻¹ for a strictly lower-triangular [n, n], every product by `dot`."""
  return _linalg.unit_lower_inverse(a, dot=dot)


Load = Callable[[str, jax.Array], jax.Array]  # (name, block start) -> [block, width]
Store = Callable[[str, jax.Array, jax.Array], None]  # (name, block start, value)


class Documents(NamedTuple):
  """Packed documents as a body reads them, by row block index (see `document_blocks`).

  ends(j): [1, block] int32, the end (exclusive) of each token's document in block j;
  first(i): the first block whose tile with row block i can be nonzero;
  stop(i): one past the last row block whose tile with column block i can be nonzero.
  """

  ends: Callable[[jax.Array], jax.Array]
  first: Callable[[jax.Array], jax.Array]
  stop: Callable[[jax.Array], jax.Array]


def document_blocks(segment_ids: jax.Array, tp: int, block: int):
  """[B, T] ids -> (ends [B, tp], first [B, tp / block], stop [B, tp / block]), int32.

  Padded rows (up to tp) continue the row's last document, as in the xla path:
  they come after it, so no real row sees them.
  """
  t = segment_ids.shape[1]
  if tp > t:
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, tp - t)), mode="edge")
  new = _segments.starts(segment_ids)
  index = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), new.shape)
  start = lax.cummax(jnp.where(new, index, 0), axis=1)
  last = jnp.concatenate([new[:, 1:], jnp.ones_like(new[:, :1])], axis=1)
  end = lax.cummin(jnp.where(last, index + 1, tp), axis=1, reverse=True)
  first = start[:, ::block] // block
  stop = -(-end[:, block - 1 :: block] // block)
  return end, first.astype(jnp.int32), stop.astype(jnp.int32)


def _masked(tile: jax.Array, docs: Documents | None, rows: jax.Array, cols: jax.Array, block: int):
  """A K tile of row block `rows` and column block `cols` <= rows, zero between documents."""
  if docs is None:
    return tile
  row = rows * block + lax.broadcasted_iota(jnp.int32, tile.shape, 0)
  return jnp.where(row < docs.ends(cols), tile, 0.0)


def forward_body(load: Load, store: Store, barrier: Callable[[], None], *, block: int,
                 num_blocks: int, eps: float, dot: Dot = dot,
                 docs: Documents | None = None) -> None:  # fmt: skip
  """V′ of one (batch, head): reads 'k', 'v' and earlier 'vp' blocks, writes 'vp'."""

  def row(i, carry):
    start = i * block
    k_i = normalize(load("k", start), eps)

    def earlier(j, rhs):
      k_j = normalize(load("k", j * block), eps)
      tile = _masked(kernel_tile(k_i, k_j, dot), docs, i, j, block)
      return rhs - dot(tile, load("vp", j * block))

    first = 0 if docs is None else docs.first(i)
    rhs = lax.fori_loop(first, i, earlier, load("v", start).astype(_F32))
    own = _masked(kernel_tile(k_i, k_i, dot), docs, i, i, block)
    inverse = unit_lower_inverse(strict_lower(own), dot)
    store("vp", start, dot(inverse, rhs))
    barrier()  # later rows read this block back
    return carry

  lax.fori_loop(0, num_blocks, row, 0)


def backward_body(load: Load, store: Store, barrier: Callable[[], None], *, block: int,
                  num_blocks: int, eps: float, dot: Dot = dot,
                  docs: Documents | None = None) -> None:  # fmt: skip
  """dV and dk of one (batch, head) from 'k', 'vp' and the cotangent 'g'.

  Writes 'dv' (read back by earlier rows) and accumulates dk̂ in 'dk', then
  maps it through the norm.
  """

  def zero(i, carry):
    k = load("k", i * block)
    store("dk", i * block, jnp.zeros(k.shape, _F32))
    return carry

  lax.fori_loop(0, num_blocks, zero, 0)
  barrier()

  def row(t, carry):
    i = num_blocks - 1 - t
    start = i * block
    k_i = normalize(load("k", start), eps)
    scale = k_i.shape[-1] ** -0.5

    def later(j, rhs):
      k_j = normalize(load("k", j * block), eps)
      tile = _masked(kernel_tile(k_j, k_i, dot), docs, j, i, block)
      return rhs - dot(tile.T, load("dv", j * block))

    stop = num_blocks if docs is None else docs.stop(i)
    rhs = lax.fori_loop(i + 1, stop, later, load("g", start).astype(_F32))
    own = strict_lower(_masked(kernel_tile(k_i, k_i, dot), docs, i, i, block))
    dv_i = dot(unit_lower_inverse(own, dot).T, rhs)
    store("dv", start, dv_i)

    def earlier(j, dk_i):
      k_j = normalize(load("k", j * block), eps)
      tile = _masked(kernel_tile(k_i, k_j, dot), docs, i, j, block)
      d_g = -dot(dv_i, load("vp", j * block), _NT) * tile
      store("dk", j * block, load("dk", j * block) + scale * dot(d_g.T, k_i))
      return dk_i + scale * dot(d_g, k_j)

    first = 0 if docs is None else docs.first(i)
    dk_i = lax.fori_loop(first, i, earlier, jnp.zeros(k_i.shape, _F32))
    d_g = -dot(dv_i, load("vp", start), _NT) * own
    dk_i = dk_i + scale * (dot(d_g, k_i) + dot(d_g.T, k_i))
    store("dk", start, load("dk", start) + dk_i)
    barrier()
    return carry

  lax.fori_loop(0, num_blocks, row, 0)

  def through_norm(i, carry):
    k = load("k", i * block).astype(_F32)
    r = lax.rsqrt(jnp.mean(k * k, axis=-1, keepdims=True) + eps)
    dk_hat = load("dk", i * block)
    dot_kd = jnp.sum(k * dk_hat, axis=-1, keepdims=True)
    store("dk", i * block, r * dk_hat - (r * r * r / k.shape[-1]) * k * dot_kd)
    return carry

  lax.fori_loop(0, num_blocks, through_norm, 0)


def context_term(k, context_keys, context_values, context_length, eps) -> jax.Array:
  """Σ_c K(k̂_t, ĉ_c) V′_c over the valid cached rows, [B,T,H,Dv] float32 (plain XLA).

  The new rows' right-hand side is v minus this, as in the xla path.
  """
  k_hat = _math.normalize_keys(jnp.moveaxis(k.astype(_F32), 2, 1), eps)  # [B,H,T,D]
  c_hat = _math.normalize_keys(jnp.moveaxis(context_keys.astype(_F32), 2, 1), eps)
  valid = jnp.arange(c_hat.shape[2]) < context_length
  weights = jnp.where(valid, _math.kernel(k_hat, c_hat), 0.0)
  term = weights @ jnp.moveaxis(context_values.astype(_F32), 2, 1)
  return jnp.moveaxis(term, 1, 2)


def kernel_block(t: int, block_size: int) -> int:
  """The kernels' row block: the largest power of two <= block_size, within [8, T rounded up]."""
  largest = 1 << (max(block_size, 1).bit_length() - 1)
  return max(8, min(largest, 1 << max(0, (t - 1).bit_length())))


def kernel_solve(call: Callable, fwd_kernel: Callable, bwd_kernel: Callable) -> Callable:
  """V′ = L⁻¹V as a `jax.custom_vjp` over one backend's kernels.

  Args:
    call: the backend's `call(kernel, cfg, inputs, out_widths, name, docs)`,
      which runs a kernel over (batch, kv head) programs and returns its
      float32 outputs; docs: None or `document_blocks`' arrays, passed to the
      kernel after the inputs.
    fwd_kernel: (k, v) -> V′, built on `forward_body`.
    bwd_kernel: (k, V′, dV′) -> (dk, dv), built on `backward_body`.

  Returns:
    solve(k, v, docs, cfg) with a static cfg and docs None or integer arrays
    (no cotangent); the backward pass saves k, V′ and docs.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def solve(k, v, docs, cfg):
    (vp,) = call(fwd_kernel, cfg, (k, v), (v.shape[-1],), "attnlab_lucid_solve_fwd", docs)
    return vp

  def solve_fwd(k, v, docs, cfg):
    vp = solve(k, v, docs, cfg)
    return vp, (k, vp, docs)

  def solve_bwd(cfg, saved, g):
    k, vp, docs = saved
    dk, dv = call(
      bwd_kernel, cfg, (k, vp, g.astype(_F32)), (k.shape[-1], vp.shape[-1]),
      "attnlab_lucid_solve_bwd", docs,
    )  # fmt: skip
    return dk, dv, None

  solve.defvjp(solve_fwd, solve_bwd)
  return solve


LANES = 128  # TPU vector lanes: a [T, w] float32 buffer in VMEM takes ceil(w / 128) lane tiles


def tpu_resident_vmem_bytes(t: int, widths) -> int:
  """VMEM of float32 [t, w] buffers, one per width, double-buffered, each padded to whole
  lane tiles (a head_dim of 64 or 68 still takes 128 lanes)."""
  return 2 * 4 * t * sum(-(-w // LANES) * LANES for w in widths)


def tpu_document_vmem_bytes(num_blocks: int, block: int) -> int:
  """VMEM of the packed documents' int32 [num_blocks, block] ends, double-buffered and padded
  to whole (8, 128) tiles."""
  return 2 * 4 * (-(-num_blocks // 8) * 8) * (-(-block // LANES) * LANES)
