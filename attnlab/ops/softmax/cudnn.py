"""Causal softmax attention through cuDNN's fused kernel (GPU only), the baseline
for the flash kernels: `jax.nn.dot_product_attention(implementation='cudnn')`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _dtypes


def softmax_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float | None = None,
  logit_scale: jax.Array | None = None,
) -> jax.Array:
  """See `attnlab.ops.softmax_attention`. cuDNN takes one 16-bit dtype, so k
  and v are cast to q's; it raises on a backend without cuDNN."""
  if logit_scale is not None:
    # No per-query temperature in cuDNN: a query's logits scale with the query.
    q = (q.astype(jnp.float32) * logit_scale.astype(jnp.float32)[..., None]).astype(q.dtype)
  out = jax.nn.dot_product_attention(
    q, k.astype(q.dtype), v.astype(q.dtype), scale=_dtypes.default_scale(q.shape[-1], scale),
    is_causal=True, implementation="cudnn",
  )  # fmt: skip
  return out.astype(q.dtype)
