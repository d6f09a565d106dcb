"""LUCID's value preconditioner V′ = L⁻¹V by blocked forward substitution.

L = I + strict_lower(exp(k̂ k̂ᵀ/√D − √D)) (unit diagonal). Row block i solves

    V′_i = (I + L_ii)⁻¹ (V_i − L_{i,<i} V′_{<i})

so the cost is O(T²D) and only block×block inverses are formed. The custom
VJP is the transposed solve, dV = L⁻ᵀ dV′ (a backward sweep over blocks), and
dk̂ = s·(dG k̂ + dGᵀ k̂) with dG = −(dV V′ᵀ) ∘ L on the strict lower part.

Packed documents: L's entries between tokens of different documents are 0, so
L is block diagonal by document and the solve restarts at every document.
The masks come from per-token document indices `docs` [B, T] (all zeros for
one sequence per row), an integer input of the custom VJP with no cotangent.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnlab.ops import _linalg, _segments
from attnlab.ops.lucid._math import kernel, normalize_keys


def _blocks(t: int, block: int) -> tuple[jax.Array, jax.Array]:
  """Row and column indices of one block against the whole sequence."""
  return jnp.arange(block), jnp.arange(t)


def _same(docs, start, block):
  """[B, 1, block, T]: row `start + r` and column c lie in one document."""
  mine = jax.lax.dynamic_slice_in_dim(docs, start, block, axis=1)
  return _segments.same_document(mine, docs)[:, None]


def _diagonal(same, start, block):
  """The [B, 1, block, block] diagonal part of `_same`'s mask."""
  return jax.lax.dynamic_slice_in_dim(same, start, block, axis=3)


def _forward(k_hat, v, docs, block):
  """k_hat [B,H,T,D], v [B,H,T,Dv], docs [B,T] with T a multiple of block -> V′."""
  t = k_hat.shape[2]
  rows, cols = _blocks(t, block)
  strict = rows[:, None] > rows[None, :]

  def solve_block(v_prime, i):
    start = i * block
    k_i = jax.lax.dynamic_slice_in_dim(k_hat, start, block, axis=2)
    v_i = jax.lax.dynamic_slice_in_dim(v, start, block, axis=2)
    same = _same(docs, start, block)
    earlier = jnp.where((cols < start) & same, kernel(k_i, k_hat), 0.0)
    rhs = v_i - earlier @ v_prime
    own = strict & _diagonal(same, start, block)
    inverse = _linalg.unit_lower_inverse(jnp.where(own, kernel(k_i, k_i), 0.0))
    return jax.lax.dynamic_update_slice_in_dim(v_prime, inverse @ rhs, start, axis=2), None

  v_prime, _ = jax.lax.scan(solve_block, jnp.zeros_like(v), jnp.arange(t // block))
  return v_prime


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def solve(k_hat: jax.Array, v: jax.Array, docs: jax.Array, block: int) -> jax.Array:
  return _forward(k_hat, v, docs, block)


def _solve_fwd(k_hat, v, docs, block):
  v_prime = _forward(k_hat, v, docs, block)
  return v_prime, (k_hat, v_prime, docs)


def _solve_bwd(block, residuals, d_v_prime):
  k_hat, v_prime, docs = residuals
  t, d = k_hat.shape[2], k_hat.shape[3]
  rows, cols = _blocks(t, block)
  strict = rows[:, None] > rows[None, :]

  # dV = L⁻ᵀ dV′, sweeping blocks from last to first.
  def transposed_block(d_v, i):
    start = i * block
    k_i = jax.lax.dynamic_slice_in_dim(k_hat, start, block, axis=2)
    g_i = jax.lax.dynamic_slice_in_dim(d_v_prime, start, block, axis=2)
    same = _same(docs, start, block)  # [B, 1, blk, T]
    visible = (cols >= start + block)[:, None] & jnp.swapaxes(same, -1, -2)
    later = jnp.where(visible, kernel(k_hat, k_i), 0.0)  # [T, blk]
    rhs = g_i - jnp.swapaxes(later, -1, -2) @ d_v
    own = strict & _diagonal(same, start, block)
    inverse = _linalg.unit_lower_inverse(jnp.where(own, kernel(k_i, k_i), 0.0))
    return jax.lax.dynamic_update_slice_in_dim(
      d_v, jnp.swapaxes(inverse, -1, -2) @ rhs, start, axis=2
    ), None

  n = t // block
  d_v, _ = jax.lax.scan(transposed_block, jnp.zeros_like(d_v_prime), jnp.arange(n)[::-1])

  # dk̂ from dL = −dV V′ᵀ on the strict lower part, through L = exp(k̂k̂ᵀ/√D − √D).
  def key_block(d_k, i):
    start = i * block
    k_i = jax.lax.dynamic_slice_in_dim(k_hat, start, block, axis=2)
    dv_i = jax.lax.dynamic_slice_in_dim(d_v, start, block, axis=2)
    lower = ((start + rows)[:, None] > cols[None, :]) & _same(docs, start, block)
    d_g = jnp.where(lower, -(dv_i @ jnp.swapaxes(v_prime, -1, -2)) * kernel(k_i, k_hat), 0.0)
    d_k = d_k + d**-0.5 * (jnp.swapaxes(d_g, -1, -2) @ k_i)
    own = jax.lax.dynamic_slice_in_dim(d_k, start, block, axis=2) + d**-0.5 * (d_g @ k_hat)
    return jax.lax.dynamic_update_slice_in_dim(d_k, own, start, axis=2), None

  d_k, _ = jax.lax.scan(key_block, jnp.zeros_like(k_hat), jnp.arange(n))
  return d_k, d_v, None


solve.defvjp(_solve_fwd, _solve_bwd)


def preconditioned_values(
  k, v, *, eps, block_size, context_keys, context_values, context_length, segment_ids=None
):
  """[B,T,H,D] keys and values -> V′ [B,T,H,Dv]; optional context of earlier
  tokens, and packed documents (`segment_ids` [B, T], or the cache rows'
  [B, cache_len] with a context)."""
  t = k.shape[1]
  block = max(1, min(block_size, t))
  pad = -t % block
  k_hat = normalize_keys(jnp.moveaxis(k, 2, 1), eps)  # [B,H,T,D]
  rhs = jnp.moveaxis(v, 2, 1)
  docs = None if segment_ids is None else _segments.document_index(segment_ids)
  if context_keys is not None:
    c_hat = normalize_keys(jnp.moveaxis(context_keys, 2, 1), eps)
    valid = jnp.arange(c_hat.shape[2]) < context_length
    if docs is not None:  # a new token reaches back only into its own document
      new_docs, context_docs = _segments.query_documents(segment_ids, context_length, t)
      valid = valid & _segments.same_document(new_docs, context_docs)[:, None]
      docs = new_docs
    weights = jnp.where(valid, kernel(k_hat, c_hat), 0.0)
    rhs = rhs - weights @ jnp.moveaxis(context_values, 2, 1)
  # Trailing padding cannot reach earlier rows of a lower-triangular system.
  k_hat, rhs = (jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0))) for a in (k_hat, rhs))
  if docs is None:
    docs = jnp.zeros((k.shape[0], t + pad), jnp.int32)
  else:  # padded tokens join the last document: they come after it
    docs = jnp.pad(docs, ((0, 0), (0, pad)), mode="edge")
  v_prime = solve(k_hat, rhs, docs, block)[:, :, :t]
  return jnp.moveaxis(v_prime, 1, 2)
