"""Selective self-attention, SSA (Zhang et al., NeurIPS 2024).

Queries and values get per-token inverse temperatures before softmax attention:

    τ_pos(i) = 1 + σ(α)·log i                      i: absolute 1-based position
    τ_q(i)   = τ_pos(i) + tanh(u_q,h · GELU(q_i,h))   per query head h
    τ_v(j)   = τ_pos(j) + tanh(u_v,h · GELU(v_j,h))   per kv head h
    o_i      = softmax(τ_q(i) · q_i kᵀ/√D) (τ_v ⊙ V)

The query temperature enters as `softmax_attention(..., logit_scale=τ_q)`; the
cache holds τ_v-scaled values, and τ_pos uses absolute positions, so decoding
matches the parallel form (the official release takes log i within the
current call, which gives log 1 = 0 at every decoding step).

Decisions where the sources stop short. The official code has only the
position term, with one scalar per layer; the paper's token term could not be
read from its text, so the token term follows the common reading of its
"weight sharing": it reuses the q and v projections (raw, before qk-norm and
RoPE) and adds one vector per head, with a bounded tanh and the two terms
added. τ stays positive (τ_pos ≥ 1, |tanh| < 1). α starts at −7 (slope
σ(α) ≈ 9e-4) and u at 0, so SSA starts as vanilla attention, as the official
init intends. New parameters per layer: 1 + (H + Hkv)·D, under 0.5% of a
layer for any d_model ≥ 128. The position slope α is the `temperature`
group, trained with `optim.temperature_lr`, 1e-2 by default as in the
official recipe for its one temperature parameter (beta_lr 1e-2,
full_bindata_finetune.py; 1e-4 in full_gpt2_PTS.py), whatever the base lr.
The token vectors u train at the base lr: with 1e-2 on u too, tiny MQAR
reached 0.233 eval accuracy at 300 steps instead of 0.997.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.models.attention import registry, softmax


@registry.register(
  "ssa",
  uses_rope=True,
  analysis=softmax.ANALYSIS,
  temperature=("ssa_alpha",),
  no_decay=("ssa_alpha", "ssa_u_q", "ssa_u_v"),
)
class SelectiveAttention(softmax.SoftmaxAttention):
  """SSA: [B, T, d_model] -> [B, T, d_model]; cache of k and τ_v-scaled v."""

  def __init__(self, model, options, *, use_rope, rngs):
    super().__init__(model, options, use_rope=use_rope, rngs=rngs)
    self.ssa_alpha = nnx.Param(jnp.full((), options.alpha_init, jnp.float32))
    self.token_temperature = options.token_temperature
    if self.token_temperature:
      shape_q, shape_v = (self.num_heads, self.head_dim), (self.num_kv_heads, self.head_dim)
      self.ssa_u_q = nnx.Param(jnp.zeros(shape_q, jnp.float32), out_sharding=("heads", None))
      self.ssa_u_v = nnx.Param(jnp.zeros(shape_v, jnp.float32), out_sharding=("kv_heads", None))

  def temperatures(self, q_raw, v_raw, positions):
    """τ_q [B,T,H] and τ_v [B,T,Hkv] from raw q, v [B,T,*,D] at positions [T] or
    [B, T] (packed documents: positions within each document)."""
    tau_pos = 1.0 + jax.nn.sigmoid(self.ssa_alpha[...]) * jnp.log1p(positions.astype(jnp.float32))
    tau_pos = tau_pos[None, :, None] if tau_pos.ndim == 1 else tau_pos[..., None]
    tau_q = jnp.broadcast_to(tau_pos, q_raw.shape[:3])
    tau_v = jnp.broadcast_to(tau_pos, v_raw.shape[:3])
    if self.token_temperature:
      gelu = lambda x: jax.nn.gelu(x.astype(jnp.float32))
      tau_q = tau_q + jnp.tanh(jnp.einsum("bthd,hd->bth", gelu(q_raw), self.ssa_u_q[...]))
      tau_v = tau_v + jnp.tanh(jnp.einsum("bthd,hd->bth", gelu(v_raw), self.ssa_u_v[...]))
    return tau_q, tau_v

  def project(self, x: jax.Array, positions: jax.Array):
    """x [B, T, d_model] at absolute positions [T] -> q [B,T,H,hd] (qk-norm,
    RoPE), k, τ_v-scaled v [B,T,Hkv,hd], and τ_q [B,T,H] as the logit scale."""
    q, k, v = self.qkv.project(x)
    tau_q, tau_v = self.temperatures(q, v, positions)
    q, k = self.qkv.position(q, k, positions)
    return q, k, (v * tau_v[..., None]).astype(v.dtype), tau_q
