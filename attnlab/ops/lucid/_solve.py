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
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from attnlab.ops import _linalg
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


def forward_body(load: Load, store: Store, barrier: Callable[[], None], *, block: int,
                 num_blocks: int, eps: float, dot: Dot = dot) -> None:  # fmt: skip
  """V′ of one (batch, head): reads 'k', 'v' and earlier 'vp' blocks, writes 'vp'."""

  def row(i, carry):
    start = i * block
    k_i = normalize(load("k", start), eps)

    def earlier(j, rhs):
      k_j = normalize(load("k", j * block), eps)
      return rhs - dot(kernel_tile(k_i, k_j, dot), load("vp", j * block))

    rhs = lax.fori_loop(0, i, earlier, load("v", start).astype(_F32))
    inverse = unit_lower_inverse(strict_lower(kernel_tile(k_i, k_i, dot)), dot)
    store("vp", start, dot(inverse, rhs))
    barrier()  # later rows read this block back
    return carry

  lax.fori_loop(0, num_blocks, row, 0)


def backward_body(load: Load, store: Store, barrier: Callable[[], None], *, block: int,
                  num_blocks: int, eps: float, dot: Dot = dot) -> None:  # fmt: skip
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
      return rhs - dot(kernel_tile(k_j, k_i, dot).T, load("dv", j * block))

    rhs = lax.fori_loop(i + 1, num_blocks, later, load("g", start).astype(_F32))
    own = strict_lower(kernel_tile(k_i, k_i, dot))
    dv_i = dot(unit_lower_inverse(own, dot).T, rhs)
    store("dv", start, dv_i)

    def earlier(j, dk_i):
      k_j = normalize(load("k", j * block), eps)
      d_g = -dot(dv_i, load("vp", j * block), _NT) * kernel_tile(k_i, k_j, dot)
      store("dk", j * block, load("dk", j * block) + scale * dot(d_g.T, k_i))
      return dk_i + scale * dot(d_g, k_j)

    dk_i = lax.fori_loop(0, i, earlier, jnp.zeros(k_i.shape, _F32))
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
    call: the backend's `call(kernel, cfg, inputs, out_widths, name)`, which
      runs a kernel over (batch, kv head) programs and returns its float32
      outputs.
    fwd_kernel: (k, v) -> V′, built on `forward_body`.
    bwd_kernel: (k, V′, dV′) -> (dk, dv), built on `backward_body`.

  Returns:
    solve(k, v, cfg) with a static cfg; the backward pass saves k and V′.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
  def solve(k, v, cfg):
    (vp,) = call(fwd_kernel, cfg, (k, v), (v.shape[-1],), "attnlab_lucid_solve_fwd")
    return vp

  def solve_fwd(k, v, cfg):
    vp = solve(k, v, cfg)
    return vp, (k, vp)

  def solve_bwd(cfg, saved, g):
    k, vp = saved
    dk, dv = call(
      bwd_kernel, cfg, (k, vp, g.astype(_F32)), (k.shape[-1], vp.shape[-1]),
      "attnlab_lucid_solve_bwd",
    )  # fmt: skip
    return dk, dv

  solve.defvjp(solve_fwd, solve_bwd)
  return solve


LANES = 128  # TPU vector lanes: a [T, w] float32 buffer in VMEM takes ceil(w / 128) lane tiles


def tpu_resident_vmem_bytes(t: int, widths) -> int:
  """VMEM of float32 [t, w] buffers, one per width, double-buffered, each padded to whole
  lane tiles (a head_dim of 64 or 68 still takes 128 lanes)."""
  return 2 * 4 * t * sum(-(-w // LANES) * LANES for w in widths)
