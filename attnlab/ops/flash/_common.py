"""Argument preparation shared by the flash kernel backends (jnp only).

Both backends take q, k, v plus an optional row factor α [batch, time, heads]
and column factor β [batch, time, kv_heads] (float32), and compute the
logits u_ij = scale · α_i · β_j · (q_i · k_j). The factors are formed here, in
plain jnp outside the kernels' custom VJP, so autodiff carries their
gradients on to `logit_scale`, q and k.

Packed documents (`segment_ids` [batch, time]): a document is a contiguous run
of equal ids, and a new one starts wherever the id differs from the previous
token's. The kernels see a row's documents through one integer per query, the
index of its document's first token (`document_starts`): query i sees key j
iff start_i ≤ j ≤ i, and its 1-based position within the document
(`document_positions`, the number of keys it sees) is i − start_i + 1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnlab.ops import _segments
from attnlab.ops import _softplus_semantics as semantics


def check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, op_name: str) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3]:
    raise ValueError(f"{op_name}: expected [B,T,H,D] arrays; got q{q.shape} k{k.shape} v{v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
    raise ValueError(f"{op_name}: q{q.shape} and k{k.shape} disagree on batch, time or head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{op_name}: heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")


def check_segments(segment_ids: jax.Array | None, q: jax.Array, op_name: str) -> None:
  _segments.check(segment_ids, q.shape[:2], op_name)


def inverse_norm(x: jax.Array) -> jax.Array:
  """1/‖x‖ over the last axis (dropped) in float32; 0 for a zero vector."""
  return semantics.inverse_norm(x.astype(jnp.float32))[..., 0]


# The shared rule of `attnlab.ops._segments`: the index of each token's document's first token.
document_starts = _segments.document_starts


def document_positions(segment_ids: jax.Array) -> jax.Array:
  """[batch, time] ids -> [batch, time] int32 1-based position within the document."""
  return _segments.positions(segment_ids) + 1


def softplus_factors(
  q: jax.Array, k: jax.Array, positions: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """α_i = log D · log i / ‖q_i‖ and β_j = 1/‖k_j‖, so u_ij = log D · log i · q̂_i·k̂_j.

  Args:
    q: [batch, time, heads, head_dim]; k: [batch, time, kv_heads, head_dim].
    positions: optional [batch, time] 1-based row positions i (packed
      documents: `document_positions`); default 1 … time in every row.

  Returns:
    α [batch, time, heads] and β [batch, time, kv_heads], float32.
  """
  if positions is None:
    rows = jnp.arange(1, q.shape[1] + 1, dtype=jnp.float32)[None]
  else:
    rows = positions.astype(jnp.float32)
  log_scale = math.log(q.shape[-1]) * jnp.log(rows)  # log D · log i, [1 or batch, time]
  return log_scale[..., None] * inverse_norm(q), inverse_norm(k)


def padded_starts(segment_ids: jax.Array | None, size: int) -> jax.Array | None:
  """`document_starts` of the ids padded to `size` steps by repeating the last id.

  Padded rows continue the row's last document: they stay finite (each sees
  itself) and are dropped; padded keys come after every real query, so the
  causal mask hides them.
  """
  if segment_ids is None:
    return None
  t = segment_ids.shape[1]
  if size > t:
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, size - t)), mode="edge")
  return document_starts(segment_ids)


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def pad_axis(x: jax.Array | None, axis: int, size: int) -> jax.Array | None:
  """Zero-pads `axis` up to `size` (zeros keep padded rows finite)."""
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)
