"""SOFT (Lu et al., NeurIPS 2021), redesigned for causal language modelling.

    q = W_q x,  k = q (SOFT ties keys to queries),  v = W_v x     per head
    p_t = exp(−‖q_t − l_a‖² / (2√d))_a     over m learned landmarks l
    o_t = (p_t A⁺) Σ_{s≤t} p_sᵀ v_s / (p_t A⁺) Σ_{s≤t} p_sᵀ  +  conv_k(v)_t
    y = W_o o

Design, and why:
  * Landmarks. SOFT pools landmarks from the whole (image) sequence, which sees
    the future. Learned, input-independent landmarks [heads, m, head_dim] make
    Ŝ = P A⁺ Pᵀ separable, so the causal mask is exact and the layer is linear
    attention over m Gaussian features: O(T·m·d) to train, an [m, d_v + 1]
    state per head to decode. They start N(0, 1), the scale of the projected
    queries, so A starts near I (well conditioned) and are exempt from weight
    decay, which would pull them all onto the origin and make A singular.
  * A⁺ = (A + 0.01·I)⁻¹ by 20 Newton–Schulz steps with SOFT's one-shot
    gradient (`ops.newton_inverse`); A depends only on parameters, so it is
    computed once per step and head, not per token.
  * Normalisation. SOFT's output is unnormalised, which in a causal LM grows
    with position. `normalize=True` divides by the causal row sum of Ŝ (an
    extra state column), clamped at eps since A⁺ has negative entries.
  * SOFT's depthwise conv skip on V becomes a causal depthwise conv
    (`conv_size`, 0 disables), and gives the layer local position; there is
    no RoPE (the kernel compares queries with fixed landmarks).
  * `causal=False` in `ops.soft_attention` is the original bidirectional
    form, for encoders; the trunk is a causal LM and always uses the causal one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from attnlab import ops
from attnlab.models import layers
from attnlab.models.attention import base, registry


@registry.register(
  "soft",
  uses_rope=False,
  no_decay=("landmarks",),
)
class SoftAttention(base.Mixer):
  """Causal SOFT mixer: [B, T, d_model] -> [B, T, d_model]; state [B, H, m, hd(+1)]."""

  def __init__(self, model: ConfigDict, options: ConfigDict, *, use_rope: bool, rngs: nnx.Rngs):
    del use_rope  # see the module docstring
    super().__init__(model, options, rngs=rngs)
    h, hd, d, dt = self.num_heads, self.head_dim, self.d_model, self.dtype
    bias = model.qkv_bias
    self.q = layers.dense(d, h * hd, ("embed", "heads"), dtype=dt, rngs=rngs, use_bias=bias)
    self.v = layers.dense(d, h * hd, ("embed", "heads"), dtype=dt, rngs=rngs, use_bias=bias)
    self.out = layers.dense(h * hd, d, ("heads", "embed"), dtype=dt, rngs=rngs)
    self.landmarks = nnx.Param(
      jax.random.normal(rngs.params(), (h, options.num_landmarks, hd), jnp.float32),
      out_sharding=(None, None, None),
    )
    self.v_conv = (
      layers.ShortConv(h * hd, options.conv_size, axis="heads", rngs=rngs, activation=False)
      if options.conv_size
      else None
    )
    self.options = options

  def _mix(self, x: jax.Array, cache: dict | None) -> tuple[jax.Array, dict]:
    b, t, _ = x.shape
    q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
    v_flat = self.v(x)
    v = v_flat.reshape(q.shape)
    opts = self.options
    o, state = ops.soft_attention(
      q,
      v,
      self.landmarks[...],
      newton_iters=opts.newton_iters,
      ridge=opts.ridge,
      normalize=opts.normalize,
      initial_state=None if cache is None else cache["state"],
      output_final_state=True,
      chunk_size=opts.chunk_size,
      implementation=opts.implementation,
    )
    o = o.reshape(b, t, -1)
    conv_state = None
    if self.v_conv is not None:
      skip, conv_state = self.v_conv(v_flat, None if cache is None else cache["conv"])
      o = o + skip
    return self.out(o), {"state": state.astype(jnp.float32), "conv": conv_state}

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, d_model] -> [B, T, d_model]."""
    return self._mix(x, None)[0]

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict:
    del max_len  # O(1) in length
    width = self.head_dim + int(self.options.normalize)
    state = jnp.zeros((batch, self.num_heads, self.options.num_landmarks, width), jnp.float32)
    conv = None if self.v_conv is None else self.v_conv.init_state(batch, dtype)
    return {"state": state, "conv": conv}

  def step(self, x: jax.Array, cache: dict, start: jax.Array) -> tuple[jax.Array, dict]:
    del start  # position enters only through the conv state
    return self._mix(x, cache)
