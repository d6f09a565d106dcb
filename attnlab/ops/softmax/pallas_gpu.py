"""Causal softmax attention (GQA, SSA logit_scale) on the GPU flash kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _dtypes
from attnlab.ops.flash import pallas_gpu


def softmax_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float | None = None,
  logit_scale: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  **kernel_options,
) -> jax.Array:
  """See `attnlab.ops.softmax_attention`; `kernel_options` go to
  `attnlab.ops.flash.pallas_gpu.flash_attention` (block sizes, interpret)."""
  alpha = None if logit_scale is None else logit_scale.astype(jnp.float32)
  return pallas_gpu.flash_attention(
    q, k, v, alpha, None, kind="softmax", scale=_dtypes.default_scale(q.shape[-1], scale),
    segment_ids=segment_ids, **kernel_options,
  )  # fmt: skip
