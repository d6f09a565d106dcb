"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, ICLR 2025), as in fla's layer.

    q, k, v = SiLU(conv4(W x))           q, k L2-normalised per head
    g = −exp(A_log) · softplus(W_a x + dt_bias)   β = σ(W_b x)  (2σ: negative eigenvalues)
    o = gated_delta_rule(q, k, v, g, β)  (forget before the error term)
    y = W_o (RMSNorm(o) ⊙ swish(W_g x))  per value head

A_log = log U(0, 16) and dt_bias = softplus⁻¹(dt), dt log-uniform in
[1e-3, 0.1] clamped at 1e-4, as in fla; both are exempt from weight decay.
Convolutions start at N(0, 0.02) like fla; projections use the trunk's
fan-in init. The decoding cache is the recurrent state plus the three conv
states. No positional encoding (the conv and the decay carry position).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from attnlab import ops
from attnlab.models import layers
from attnlab.models.attention import base, common_form, registry


def head_geometry(model: ConfigDict, options: ConfigDict) -> tuple[int, int, int, int]:
  """(heads, head_k_dim, v_heads, head_v_dim) of a delta-rule layer with the
  trunk config `model` and the variant's `options` (num_heads, head_dim,
  num_v_heads, expand_v); 0 in options means the trunk's value."""
  heads = options.num_heads or model.num_heads
  head_k = options.head_dim or model.head_dim or model.d_model // model.num_heads
  v_heads = options.num_v_heads or heads
  if v_heads % heads:
    raise ValueError(f"num_v_heads={v_heads} must be a multiple of num_heads={heads}")
  head_v = int(head_k * options.expand_v)
  return heads, head_k, v_heads, head_v


def _decay_params(v_heads: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """fla's init: A ~ U(0, 16), dt log-uniform in [1e-3, 0.1] clamped at 1e-4."""
  a_key, dt_key = jax.random.split(key)
  a = jax.random.uniform(a_key, (v_heads,), minval=1e-6, maxval=16.0)
  u = jax.random.uniform(dt_key, (v_heads,))
  dt = jnp.maximum(jnp.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)), 1e-4)
  dt_bias = dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus
  return jnp.log(a), dt_bias


class DeltaInputs(nnx.Module):
  """x [B,T,D] -> raw conv'd q, k [B,T,H·dk], v [B,T,HV·dv], decay g and β [B,T,HV].

  Shared by Gated DeltaNet and NAtS-L (which views the same q/k/v two ways).
  """

  def __init__(self, model: ConfigDict, options: ConfigDict, *, rngs: nnx.Rngs):
    heads, head_k, v_heads, head_v = head_geometry(model, options)
    d, dt = model.d_model, jnp.dtype(model.dtype)
    self.q_proj = layers.dense(d, heads * head_k, ("embed", "heads"), dtype=dt, rngs=rngs)
    self.k_proj = layers.dense(d, heads * head_k, ("embed", "heads"), dtype=dt, rngs=rngs)
    self.v_proj = layers.dense(d, v_heads * head_v, ("embed", "heads"), dtype=dt, rngs=rngs)
    self.a_proj = layers.dense(d, v_heads, ("embed", "heads"), dtype=dt, rngs=rngs)
    self.b_proj = layers.dense(d, v_heads, ("embed", "heads"), dtype=dt, rngs=rngs)
    a_log, dt_bias = _decay_params(v_heads, rngs.params())
    self.A_log = nnx.Param(a_log, out_sharding=("heads",))
    self.dt_bias = nnx.Param(dt_bias, out_sharding=("heads",))
    size = options.conv_size
    self.q_conv = layers.ShortConv(heads * head_k, size, axis="heads", rngs=rngs)
    self.k_conv = layers.ShortConv(heads * head_k, size, axis="heads", rngs=rngs)
    self.v_conv = layers.ShortConv(v_heads * head_v, size, axis="heads", rngs=rngs)
    self.beta_scale = 2.0 if options.allow_neg_eigval else 1.0

  def init_conv_states(self, batch: int, dtype: jnp.dtype) -> dict:
    return {n: getattr(self, f"{n}_conv").init_state(batch, dtype) for n in ("q", "k", "v")}

  def __call__(
    self, x: jax.Array, conv_states: dict | None = None, segment_ids: jax.Array | None = None
  ):
    """Returns (q, k, v, g, beta, new conv states); g and β in float32.

    segment_ids [B, T] (packed documents): the convs do not reach across documents.
    """
    conv_states = conv_states or {"q": None, "k": None, "v": None}
    q, q_state = self.q_conv(self.q_proj(x), conv_states["q"], segment_ids)
    k, k_state = self.k_conv(self.k_proj(x), conv_states["k"], segment_ids)
    v, v_state = self.v_conv(self.v_proj(x), conv_states["v"], segment_ids)
    a = self.a_proj(x).astype(jnp.float32)
    g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(a + self.dt_bias[...])
    beta = self.beta_scale * jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
    return q, k, v, g, beta, {"q": q_state, "k": k_state, "v": v_state}


def gated_output_norm(norm: layers.RMSNorm, o: jax.Array, gate: jax.Array | None) -> jax.Array:
  """RMSNorm(o) ⊙ swish(gate), per head: o, gate [B, T, heads, head_v]."""
  y = norm(o)
  return y if gate is None else y * jax.nn.silu(gate.astype(jnp.float32)).astype(y.dtype)


def _forms(mixer: GatedDeltaNet, x: jax.Array) -> common_form.Forms:
  """One DeltaForm; grouped value heads share their q and k."""
  dt = common_form.analysis_dtype(x)
  q, k, v, g, beta, _ = mixer.project(x)
  group = mixer.v_heads // mixer.heads
  q, k = (jnp.repeat(a, group, axis=2) for a in (q, k))
  form = common_form.DeltaForm(
    log_alpha=common_form.heads_first(g, dt),
    beta=common_form.heads_first(beta, dt),
    k=common_form.heads_first(k, dt),
    c=common_form.heads_first(q, dt) * mixer.head_k**-0.5,
    u=common_form.heads_first(v, dt),
  )
  return {"main": form}


def _readout(mixer: GatedDeltaNet, x: jax.Array, outputs: dict[str, jax.Array]) -> jax.Array:
  return mixer.output(x, common_form.time_first(outputs["main"]).astype(mixer.dtype))


@registry.register(
  "gated_deltanet",
  uses_rope=False,
  analysis=common_form.Adapter(forms=_forms, readout=_readout, hooks=("project", "output")),
  no_decay=("A_log", "dt_bias"),
)
class GatedDeltaNet(base.Mixer):
  """Gated DeltaNet mixer: [B, T, d_model] -> [B, T, d_model]; state [B,HV,dk,dv]."""

  supports_segments = True  # packed documents: __call__(x, segment_ids)

  def __init__(self, model: ConfigDict, options: ConfigDict, *, use_rope: bool, rngs: nnx.Rngs):
    del use_rope  # position comes from the conv and the decay
    super().__init__(model, options, rngs=rngs)
    self.heads, self.head_k, self.v_heads, self.head_v = head_geometry(model, options)
    self.inputs = DeltaInputs(model, options, rngs=rngs)
    value_dim = self.v_heads * self.head_v
    self.g_proj = (
      layers.dense(model.d_model, value_dim, ("embed", "heads"), dtype=self.dtype, rngs=rngs)
      if options.use_gate
      else None
    )
    self.o_norm = layers.RMSNorm(self.head_v, eps=model.norm_eps)
    self.o_proj = layers.dense(
      value_dim, model.d_model, ("heads", "embed"), dtype=self.dtype, rngs=rngs
    )
    self.chunk_size = options.chunk_size
    self.implementation = options.implementation

  def project(
    self, x: jax.Array, conv_states: dict | None = None, segment_ids: jax.Array | None = None
  ):
    """x [B, T, d_model] -> (q, k [B,T,H,dk] L2-normalised, v [B,T,HV,dv],
    g, β [B,T,HV] in float32, new conv states), continuing from `conv_states`."""
    b, t, _ = x.shape
    q, k, v, g, beta, conv = self.inputs(x, conv_states, segment_ids)
    q = layers.l2_normalize(q.reshape(b, t, self.heads, self.head_k))
    k = layers.l2_normalize(k.reshape(b, t, self.heads, self.head_k))
    return q, k, v.reshape(b, t, self.v_heads, self.head_v), g, beta, conv

  def output(self, x: jax.Array, o: jax.Array) -> jax.Array:
    """Delta-rule output o [B, T, HV, dv] -> [B, T, d_model]: per-head RMSNorm,
    the swish gate from x [B, T, d_model], the output projection."""
    b, t = o.shape[:2]
    gate = None if self.g_proj is None else self.g_proj(x).reshape(o.shape)
    return self.o_proj(gated_output_norm(self.o_norm, o, gate).reshape(b, t, -1))

  def _mix(self, x, cache, segment_ids=None):
    conv_states = None if cache is None else cache["conv"]
    q, k, v, g, beta, conv = self.project(x, conv_states, segment_ids)
    if cache is not None and x.shape[1] == 1:  # decoding: one step of the recurrence
      o, state = ops.gated_delta_rule_step(
        q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache["state"]
      )
      o = o[:, None]
    else:
      o, state = ops.gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        initial_state=None if cache is None else cache["state"],
        output_final_state=True,
        chunk_size=self.chunk_size,
        segment_ids=segment_ids,
        implementation=self.implementation,
      )
    return self.output(x, o), {"state": state.astype(jnp.float32), "conv": conv}

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, T, d_model] -> [B, T, d_model] (chunked form); segment_ids [B, T] or None."""
    return self._mix(x, None, segment_ids)[0]

  def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict:
    del max_len  # O(1) in length
    state = jnp.zeros((batch, self.v_heads, self.head_k, self.head_v), jnp.float32)
    return {"state": state, "conv": self.inputs.init_conv_states(batch, dtype)}

  def step(
    self, x: jax.Array, cache: dict, start: jax.Array, docs: base.Documents
  ) -> tuple[jax.Array, dict]:
    del start
    # A prompt goes through the chunked form; single tokens through the step op.
    return self._mix(x, docs.carry(cache), docs.chunk)
