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
from attnlab.models.attention import base, common_form, registry
from attnlab.ops import soft as soft_op


def _forms(mixer: SoftAttention, x: jax.Array) -> common_form.Forms:
  """Linear attention over the op's own Nyström features: P A⁺ on the query
  side, P on the key side; state [m, dv] per head. The normalised form clamps
  η_t as the op does (`soft_op.normalizer_floor`); the conv skip on v is
  outside the form (`_readout`)."""
  dt = common_form.analysis_dtype(x)
  opts = mixer.options
  q, v = mixer.project(x)
  q_side, k_side = soft_op.nystrom_features(
    q.astype(dt), mixer.landmarks[...].astype(dt), newton_iters=opts.newton_iters, ridge=opts.ridge
  )
  if not opts.normalize:
    q_side, k_side, v = (common_form.heads_first(a, dt) for a in (q_side, k_side, v))
    return {"main": common_form.ScalarForm(jnp.zeros(q_side.shape[:3], dt), k_side, q_side, v)}
  floor = soft_op.normalizer_floor(q_side, jnp.cumsum(k_side, axis=1), soft_op.NORMALIZER_EPS)
  q_side, k_side, v = (common_form.heads_first(a, dt) for a in (q_side, k_side, v))
  floor = common_form.heads_first(floor[..., 0], dt)  # [B, H, T]
  form = common_form.normalized_linear_form(q_side, k_side, v, floor=floor, positive=True)
  return {"main": form}


def _readout(mixer: SoftAttention, x: jax.Array, outputs: dict[str, jax.Array]) -> jax.Array:
  _, v = mixer.project(x)
  return mixer.output(common_form.time_first(outputs["main"]).astype(mixer.dtype), v)[0]


@registry.register(
  "soft",
  uses_rope=False,
  analysis=common_form.Adapter(forms=_forms, readout=_readout, hooks=("project", "output")),
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

  def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, T, d_model] -> q (also the keys) and v, both [B, T, H, hd]."""
    b, t, _ = x.shape
    shape = (b, t, self.num_heads, self.head_dim)
    return self.q(x).reshape(shape), self.v(x).reshape(shape)

  def output(
    self,
    o: jax.Array,
    v: jax.Array,
    conv_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array | None]:
    """Attention output o and values v [B, T, H, hd] -> ([B, T, d_model], conv state).

    Adds the causal depthwise conv skip on v (continuing from `conv_state`;
    within each document of packed rows) before the output projection; the
    state is None without a conv.
    """
    b, t = o.shape[:2]
    o = o.reshape(b, t, -1)
    if self.v_conv is None:
      return self.out(o), None
    skip, conv_state = self.v_conv(v.reshape(b, t, -1), conv_state, segment_ids)
    return self.out(o + skip), conv_state

  def _mix(
    self, x: jax.Array, cache: dict | None, segment_ids: jax.Array | None = None
  ) -> tuple[jax.Array, dict]:
    q, v = self.project(x)
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
      segment_ids=segment_ids,
      implementation=opts.implementation,
    )
    y, conv_state = self.output(o, v, None if cache is None else cache["conv"], segment_ids)
    return y, {"state": state.astype(jnp.float32), "conv": conv_state}

  supports_segments = True  # packed documents: __call__(x, segment_ids)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, T, d_model] -> [B, T, d_model]; segment_ids [B, T] int (packed) or None."""
    return self._mix(x, None, segment_ids)[0]

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict:
    del max_len  # O(1) in length
    width = self.head_dim + int(self.options.normalize)
    state = jnp.zeros((batch, self.num_heads, self.options.num_landmarks, width), jnp.float32)
    conv = None if self.v_conv is None else self.v_conv.init_state(batch, dtype)
    return {"state": state, "conv": conv}

  def step(
    self, x: jax.Array, cache: dict, start: jax.Array, docs: base.Documents
  ) -> tuple[jax.Array, dict]:
    del start  # position enters only through the conv state
    return self._mix(x, docs.carry(cache), docs.chunk)
