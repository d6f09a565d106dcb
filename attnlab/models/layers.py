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


def apply_rope(
  x: jax.Array, positions: jax.Array, theta: float, fraction: float = 1.0
) -> jax.Array:
  """Rotary embedding, rotating half-split pairs (Llama/NeoX layout).

  Args:
    x: [batch, time, heads, head_dim].
    positions: [time] or [batch, time] absolute integer positions.
    theta: base of the frequencies.
    fraction: share of head_dim that is rotated (partial rotary, as in
      GPT-NeoX); the remaining dims stay position-free for content matching.
  """
  d = x.shape[-1]
  rotated_dims = 2 * int(d * fraction // 2)
  if not 0 < rotated_dims <= d:
    raise ValueError(f"RoPE rotates no dims: head_dim={d}, fraction={fraction}")
  x32 = x.astype(jnp.float32)
  x_rot, x_pass = x32[..., :rotated_dims], x32[..., rotated_dims:]
  half = rotated_dims // 2
  freqs = theta ** (-jnp.arange(0, half, dtype=jnp.float32) / half)
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
    another document; the state counts as the row's first document.
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
    y = sum(taps)
    return (jax.nn.silu(y) if self.activation else y), padded[:, t:]


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(Σx² + eps) over the last axis, in float32."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32**2, axis=-1, keepdims=True) + eps)).astype(x.dtype)
