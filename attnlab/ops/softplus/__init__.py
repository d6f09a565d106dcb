"""Softplus attention (LSSA / LSSAR); the op is `api.softplus_attention`.

The cosine normalisation and the row weights are exported too: the analysis
rebuilds the attention weights of a softplus `KernelForm` with them.
"""

import jax

from attnlab.ops.softplus import xla
from attnlab.ops.softplus.xla import row_weights


def normalize(x: jax.Array) -> jax.Array:
  """x / ‖x‖ over the last axis (0 for a zero vector), as the op normalises q
  and k [batch, time, heads, head_dim] (or any [..., head_dim]) before scoring."""
  return xla._normalize(x)


__all__ = ["normalize", "row_weights"]
