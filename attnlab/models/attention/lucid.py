"""LUCID attention (Duvvuri, Patel, Gupta & Dhillon, 2026; saisuryadv/LUCID).

Softmax attention whose values are preconditioned by the key kernel:

    V′ = L⁻¹ V,   L = tril(exp(k̂ k̂ᵀ/√D − √D)),   k̂ = k / rms(k)  (no gain)
    o  = softmax(q kᵀ/√D) V′                       (raw keys in the softmax)

V′ is formed per kv head before GQA repetition, in float32, with a unit
diagonal in both the parallel and the decoding form (the release's training
path uses the slightly-off-unit diagonal exp(−eps effect); decoding assumes
1). No new parameters. NoPE by default, as in the released config; RoPE with
`model.rope=True` (k̂ is then taken from the rotated keys, as in the release).
The cache holds raw keys and preconditioned values; a new token's value is
v′_t = v_t − Σ_{j<t} exp(k̂_t·k̂_j/√D − √D) v′_j, and a prompt chunk solves
its own block after subtracting the cache's contribution (in packed prompts,
within each document).
"""

from __future__ import annotations

import jax

from attnlab import ops
from attnlab.models.attention import registry, softmax


@registry.register(
  "lucid",
  uses_rope=False,
  analysis=softmax.ANALYSIS,
)
class LucidAttention(softmax.SoftmaxAttention):
  """LUCID: [B, T, d_model] -> [B, T, d_model]; cache of (k, v′)."""

  def __init__(self, model, options, *, use_rope, rngs):
    super().__init__(model, options, use_rope=use_rope, rngs=rngs)
    self.eps = options.eps
    self.block_size = options.block_size

  def values(self, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """V′ = L⁻¹ V [B, T, Hkv, hd] from k, v [B, T, Hkv, hd] (see the module docstring);
    with segment_ids [B, T] L is block diagonal by document."""
    v_prime = ops.lucid_values(
      k, v, eps=self.eps, block_size=self.block_size, segment_ids=segment_ids,
      implementation=self.implementation,
    )  # fmt: skip
    return v_prime.astype(v.dtype)

  def cached_values(self, k, v, cache, start, segment_ids):
    v_prime = ops.lucid_values(
      k,
      v,
      eps=self.eps,
      context_keys=cache["k"],
      context_values=cache["v"],
      context_length=start,
      block_size=self.block_size,
      segment_ids=segment_ids,
      implementation=self.implementation,
    )
    return v_prime.astype(v.dtype)
