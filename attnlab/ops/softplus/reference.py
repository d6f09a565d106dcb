"""Oracle for softplus attention: one query row at a time, following the
paper's steps literally (softplus, L1, ReLU(A·i − O)^p, L1), with the row
max rescale before the power.

It takes the spec's rounding slack from `attnlab.ops._softplus_semantics` and
computes everything else itself, independent of the xla path and the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops._softplus_semantics import ROUNDING_SLACK


def softplus_attention(q, k, v, *, power, query_positions, key_length, segment_ids=None):
  """segment_ids [B, T] (full causal op only): a query sees keys with its own
  id, and i counts the keys it sees (its position within the document)."""
  d = q.shape[-1]
  b = q.shape[0]
  seg = jnp.zeros((b, k.shape[1]), jnp.int32) if segment_ids is None else segment_ids
  qn = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  key_pos = jnp.arange(k.shape[1])

  def one_row(_, inputs):
    q_row, pos = inputs  # [B, H, D], scalar
    causal = (key_pos <= pos) & (key_pos < key_length)  # [Tk]
    own = seg == jax.lax.dynamic_index_in_dim(seg, pos, axis=1)  # [B, Tk]
    seen = causal[None] & own
    i = seen.sum(1).astype(q.dtype)[:, None, None]  # [B, 1, 1] keys seen = 1-based position
    visible = seen[:, :, None]
    a = jnp.where(
      visible,
      jax.nn.softplus(jnp.log(d) * jnp.log(i) * jnp.einsum("bhd,bkhd->bkh", q_row, kn)),
      0.0,
    )
    a = a / a.sum(1, keepdims=True)
    if power is not None:
      offset = jnp.where(i <= 3, 0.0, 1.0) + ROUNDING_SLACK * jnp.finfo(q.dtype).eps
      x = jnp.where(visible, jnp.maximum(a * i - offset, 0.0), 0.0)
      peak = jax.lax.stop_gradient(x.max(1, keepdims=True))
      x = x / jnp.where(peak > 0, peak, 1.0)
      b = x**power
      total = b.sum(1, keepdims=True)
      a = jnp.where(total > 0, b / jnp.where(total > 0, total, 1.0), 0.0)
    return None, jnp.einsum("bkh,bkhd->bhd", a, v)

  xs = (jnp.moveaxis(qn, 1, 0), query_positions)
  _, out = jax.lax.scan(one_row, None, xs)
  return jnp.moveaxis(out, 0, 1)
