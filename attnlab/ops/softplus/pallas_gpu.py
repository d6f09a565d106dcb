"""Causal LSSA / LSSAR on the GPU flash kernel (LSSAR: two passes per row)."""

from __future__ import annotations

import jax

from attnlab.ops.flash import _common, pallas_gpu


def softplus_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  power: float | None = None,
  segment_ids: jax.Array | None = None,
  **kernel_options,
) -> jax.Array:
  """See `attnlab.ops.softplus_attention`; `kernel_options` go to
  `attnlab.ops.flash.pallas_gpu.flash_attention` (block sizes, interpret).
  With `segment_ids`, log i uses each query's position within its document."""
  positions = None if segment_ids is None else _common.document_positions(segment_ids)
  alpha, beta = _common.softplus_factors(q, k, positions)
  kind = "lssa" if power is None else "lssar"
  return pallas_gpu.flash_attention(
    q, k, v, alpha, beta, kind=kind, power=power, segment_ids=segment_ids, **kernel_options
  )
