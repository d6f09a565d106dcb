"""Context parallelism: ops whose sequence is split over a mesh axis (call inside shard_map).

Each function takes this shard's tokens and the mesh axis name and returns this
shard's rows of the unsplit op's output, exchanging only what the op's math
needs across the axis.
"""

from attnlab.ops.context_parallel.chunk_state import (
  block_gated_delta_rule,
  gated_delta_rule,
  linear_attention,
  soft_attention,
)
from attnlab.ops.context_parallel.softmax_family import (
  lucid_attention,
  softmax_attention,
  softplus_attention,
)

__all__ = [
  "block_gated_delta_rule",
  "gated_delta_rule",
  "linear_attention",
  "lucid_attention",
  "soft_attention",
  "softmax_attention",
  "softplus_attention",
]
