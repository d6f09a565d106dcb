"""Small building blocks of the trunk: dense, RMSNorm, RoPE, SwiGLU.

Parameters carry logical axis names ('embed', 'heads', 'mlp', 'vocab', ...);
`attnlab.sharding` maps them to mesh axes with the config's rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def dense(
  in_features: int,
  out_features: int,
  axes: Axes,
  *,
  dtype: jnp.dtype,
  rngs: nnx.Rngs,
  use_bias: bool = False,
  init_scale: float = 1.0,
) -> nnx.Linear:
  """A bias-free projection whose kernel [in, out] is named by `axes`."""
  init = nnx.initializers.variance_scaling(init_scale, "fan_in", "normal")
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=use_bias,
    kernel_init=nnx.with_partitioning(init, axes),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros, axes[-1:]),
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis: x / rms(x) * scale. Statistics in float32."""

  def __init__(self, features: int, *, eps: float = 1e-6, axis_name: str | None = "norm"):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32), out_sharding=(axis_name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., features] -> [..., features] in x.dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...]).astype(x.dtype)


# (type, factor, low_freq_factor, high_freq_factor, original_max_len), hashable for modules.
RopeScaling = tuple[str, float, float, float, int]


def rope_scaling(model) -> RopeScaling | None:
  """config.model.rope_scaling as a RopeScaling, or None for unscaled RoPE."""
  s = model.get("rope_scaling")
  if not s or s.type in ("", "default"):
    return None
  if s.type not in ("linear", "llama3"):
    raise ValueError(f"model.rope_scaling.type={s.type!r}: choose '', 'linear' or 'llama3'")
  return (s.type, float(s.factor), float(s.low_freq_factor), float(s.high_freq_factor),
          int(s.original_max_len))  # fmt: skip


def rope_frequencies(half: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
  """[half] float32 angular frequencies θ^(−i/half) of RoPE, optionally scaled.

  'linear' divides every frequency by the factor (position interpolation).
  'llama3' (Llama 3.1) keeps wavelengths below original_max_len /
  high_freq_factor, divides those above original_max_len / low_freq_factor by
  the factor, and interpolates in between, linearly in original_max_len /
  wavelength.
  """
  freqs = theta ** (-jnp.arange(0, half, dtype=jnp.float32) / half)
  if scaling is None:
    return freqs
  kind, factor, low, high, original = scaling
  if kind == "linear":
    return freqs / factor
  wavelength = 2 * jnp.pi / freqs
  smooth = (original / wavelength - low) / (high - low)
  mixed = (1 - smooth) * freqs / factor + smooth * freqs
  return jnp.where(
    wavelength < original / high,
    freqs,
    jnp.where(wavelength > original / low, freqs / factor, mixed),
  )


def apply_rope(
  x: jax.Array,
  positions: jax.Array,
  theta: float,
  fraction: float = 1.0,
  scaling: RopeScaling | None = None,
) -> jax.Array:
  """Rotary embedding, rotating half-split pairs (Llama/NeoX layout).

  Args:
    x: [batch, time, heads, head_dim].
    positions: [time] or [batch, time] absolute integer positions.
    theta: base of the frequencies.
    fraction: share of head_dim that is rotated (partial rotary, as in
      GPT-NeoX); the remaining dims stay position-free for content matching.
    scaling: frequency scaling (`rope_frequencies`), or None.
  """
  d = x.shape[-1]
  rotated_dims = 2 * int(d * fraction // 2)
  if not 0 < rotated_dims <= d:
    raise ValueError(f"RoPE rotates no dims: head_dim={d}, fraction={fraction}")
  x32 = x.astype(jnp.float32)
  x_rot, x_pass = x32[..., :rotated_dims], x32[..., rotated_dims:]
  half = rotated_dims // 2
  freqs = rope_frequencies(half, theta, scaling)
  angles = positions.astype(jnp.float32)[..., None] * freqs  # [(B,) T, half]
  if angles.ndim == 2:
    angles = angles[None]
  sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
  x1, x2 = jnp.split(x_rot, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_pass], axis=-1)
  return out.astype(x.dtype)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)): [B, T, d_model] -> [B, T, d_model]."""

  def __init__(self, d_model: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.gate = dense(d_model, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.up = dense(d_model, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.down = dense(hidden, d_model, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class ShortConv(nnx.Module):
  """Causal depthwise conv over time, then SiLU (or nothing): [B, T, C] -> [B, T, C].

  The decoding state is the last `kernel_size - 1` inputs, [B, kernel_size - 1, C].
  """

  def __init__(
    self,
    channels: int,
    kernel_size: int,
    *,
    axis: str | None,
    rngs: nnx.Rngs,
    activation: bool = True,
    kaiming_init: bool = False,
  ):
    # fla initialises its short convs at N(0, 0.02); Canon layers keep nn.Conv1d's
    # depthwise default U(±1/√k) (fan_in = k), under which a neighbour arrives at
    # full strength instead of 2% (see benchmarks/results/tiny_mqar_canon_*).
    shape, key = (kernel_size, channels), rngs.params()
    if kaiming_init:
      bound = kernel_size**-0.5
      kernel = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    else:
      kernel = nnx.initializers.normal(0.02)(key, shape, jnp.float32)
    self.activation = activation
    self.kernel = nnx.Param(kernel, out_sharding=(None, axis))
    self.kernel_size = kernel_size

  def init_state(self, batch: int, dtype: jnp.dtype) -> jax.Array:
    return jnp.zeros((batch, self.kernel_size - 1, self.kernel.shape[1]), dtype)

  def __call__(
    self, x: jax.Array, state: jax.Array | None = None, segment_ids: jax.Array | None = None
  ):
    """x [B, T, C], state [B, K-1, C] or None -> (y [B, T, C], new state).

    segment_ids [B, T] int (packed documents): a tap never reads a position of
    another document; the state counts as the row's first document, and the
    new state keeps only the last document's inputs (zeros before it).
    """
    t = x.shape[1]
    if state is None:
      state = self.init_state(x.shape[0], x.dtype)
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, K-1+T, C]
    w = self.kernel[...].astype(x.dtype)
    taps = [padded[:, i : i + t] * w[i] for i in range(self.kernel_size)]
    if segment_ids is not None:
      seg = jnp.pad(segment_ids, ((0, 0), (self.kernel_size - 1, 0)), mode="edge")
      taps = [tap * (seg[:, i : i + t] == segment_ids)[..., None] for i, tap in enumerate(taps)]
      last = (seg[:, t:] == segment_ids[:, -1:])[..., None]
      padded = padded.at[:, t:].set(jnp.where(last, padded[:, t:], 0))
    y = sum(taps)
    return (jax.nn.silu(y) if self.activation else y), padded[:, t:]


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(Σx² + eps) over the last axis, in float32."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32**2, axis=-1, keepdims=True) + eps)).astype(x.dtype)
