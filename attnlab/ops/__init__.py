"""Parameter-free attention ops. Imports nothing beyond jax and numpy.

Every op takes `[batch, time, heads, head_dim]` arrays, is causal, accepts any
T >= 1, accumulates in at least float32 (float64 for float64 inputs under
jax_enable_x64) and returns q's dtype. `implementation=None` picks the best
path for the backend; 'xla' is the pure-jnp path and 'reference' the slow
oracle used in tests.
"""

from attnlab.ops._segments import positions as segment_positions
from attnlab.ops.gated_delta.api import gated_delta_rule, gated_delta_rule_step
from attnlab.ops.linear.api import linear_attention
from attnlab.ops.lucid.api import lucid_attention, lucid_values
from attnlab.ops.nats_l.api import (
  block_gated_delta_rule,
  block_sparse_softmax,
  block_sparse_softmax_cached,
  block_sparse_softmax_prefill,
)
from attnlab.ops.soft.api import newton_inverse, soft_attention
from attnlab.ops.softmax.api import softmax_attention, softmax_attention_cached
from attnlab.ops.softplus.api import softplus_attention, softplus_attention_cached

__all__ = [
  "block_gated_delta_rule",
  "block_sparse_softmax",
  "block_sparse_softmax_cached",
  "block_sparse_softmax_prefill",
  "gated_delta_rule",
  "gated_delta_rule_step",
  "linear_attention",
  "lucid_attention",
  "lucid_values",
  "newton_inverse",
  "segment_positions",
  "soft_attention",
  "softmax_attention",
  "softmax_attention_cached",
  "softplus_attention",
  "softplus_attention_cached",
]
