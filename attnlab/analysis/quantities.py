"""What to measure on a layer's common form: transition eigenvalues and their
histograms, decay and memory horizons, per-query attention statistics and
state statistics. Pure JAX, head-major arrays [batch, heads, time, ...].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from attnlab.analysis import forms as F

Array = jax.Array

RADIUS_EDGES = (0.1, 0.5, 0.9, 1.0, 10.0, 100.0)
PHASE_EDGES_DEG = (1.0, 10.0, 45.0, 90.0, 180.0)


# Eigenvalues --------------------------------------------------------------------


def softmax_eigs_from_lse(lse: Array, base: float = math.e) -> Array:
  """DSF eigenvalues of softmax attention from the kernel's log-sum-exp.

  λ_t = ν_{t−1}/ν_t = base^(lse_{t−1} − lse_t), with lse [..., time] in log
  base `base` (2 for kernels that work in exp2). Returns [..., time − 1]:
  entry i is the transition into step i + 1. The ratio compares normalisers
  of two different queries, so it is not bounded by 1.
  """
  delta = lse[..., :-1] - lse[..., 1:]
  return jnp.exp(delta) if base == math.e else jnp.power(base, delta)


def delta_eigs(log_alpha: Array, beta: Array, k: Array, write: Array | None = None) -> Array:
  """Closed-form eigenvalues of α(I − mβ k kᵀ): α(1 − mβ‖k‖²) once, α (d_k − 1) times.

  Args:
    log_alpha, beta: [...]; k: [..., d_k]; write: m [...] or None (1).

  Returns:
    [..., d_k], the special eigenvalue first.
  """
  coef = beta if write is None else beta * write
  alpha = jnp.exp(log_alpha)
  special = alpha * (1.0 - coef * jnp.sum(k * k, axis=-1))
  rest = jnp.broadcast_to(alpha[..., None], (*alpha.shape, k.shape[-1] - 1))
  return jnp.concatenate([special[..., None], rest], axis=-1)


@jax.jit
def transition_eigs(form: F.Form) -> Array:
  """Eigenvalues of Λ_t for t = 1 .. T−1 (Λ_0 acts on the zero state).

  Returns [batch, heads, time − 1, K]:
    * scalar forms: λ_t (K = 1, standing for N equal eigenvalues);
      diagonal forms: the N diagonal entries;
    * delta forms: the closed form α_t(1 − β_t‖k_t‖²), α_t, …; for NAtS-L's
      direct sum (P, R), the P block's d_k eigenvalues then the R block's
      (all zero at a block start, where R restarts from P);
    * kernel forms: ν_{t−1}/ν_t from the row normalisers (the LSE for softmax).
  All eigenvalues are real for these layers.
  """
  if isinstance(form, F.ScalarForm):
    lam = F.scalar_lambda(form)
    lam = lam[..., None] if lam.ndim == 3 else lam
    return lam[:, :, 1:]
  if isinstance(form, F.DeltaForm):
    full = delta_eigs(form.log_alpha, form.beta, form.k)
    if form.reset is not None:
      persistent = delta_eigs(form.log_alpha, form.beta, form.k, form.write)
      scratch = jnp.where(form.reset[:, None], 0.0, full)
      full = jnp.concatenate([persistent, scratch], axis=-1)
    return full[:, :, 1:]
  _, log_norm = F.kernel_weights(form)
  return softmax_eigs_from_lse(log_norm)[..., None]


@functools.partial(jax.jit, static_argnums=(1, 2))
def spectrum_histogram(
  eigs: Array,
  radius_edges: tuple[float, ...] = RADIUS_EDGES,
  phase_edges_deg: tuple[float, ...] = PHASE_EDGES_DEG,
) -> dict[str, Array]:
  """Percentage of eigenvalues per magnitude and phase bin, per head.

  Bins are half-open, (e_{i−1}, e_i], the first closed at 0 and the last
  open-ended: [0, .1], (.1, .5], …, (10, 100], (100, ∞) by default, so every
  value lands in exactly one bin. Phases are |arg λ| in degrees; a negative
  real eigenvalue has phase 180.

  Args:
    eigs: [batch, heads, time, K], real or complex.

  Returns:
    {'radius': [heads, len(radius_edges) + 1], 'phase': [heads,
    len(phase_edges_deg)]}, each row summing to 100.
  """
  radius = jnp.abs(eigs)
  phase = jnp.degrees(jnp.abs(jnp.angle(eigs)))  # a real λ < 0 has angle π

  def percent(values, edges, bins):
    index = jnp.searchsorted(jnp.asarray(edges, values.dtype), values, side="left")
    counts = jax.nn.one_hot(jnp.minimum(index, bins - 1), bins).sum(axis=(0, 2, 3))
    return 100.0 * counts / counts.sum(-1, keepdims=True)

  return {
    "radius": percent(radius, radius_edges, len(radius_edges) + 1),
    "phase": percent(phase, phase_edges_deg, len(phase_edges_deg)),
  }


def histogram_labels(edges: tuple[float, ...], open_end: bool = True) -> list[str]:
  """Readable names of `spectrum_histogram`'s bins."""
  labels, low = [], 0.0
  for i, edge in enumerate(edges):
    labels.append(f"[{low:g},{edge:g}]" if i == 0 else f"({low:g},{edge:g}]")
    low = edge
  if open_end:
    labels.append(f">{low:g}")
  return labels


# Decay and memory ---------------------------------------------------------------


def by_lag(matrix: Array, fill: float) -> Array:
  """[..., T(t), T(s)] -> [..., T(t), T(Δ)] with entry [t, Δ] = matrix[t, t − Δ]."""
  t = matrix.shape[-1]
  rows = jnp.arange(t)[:, None]
  lags = jnp.arange(t)[None, :]
  cols = rows - lags
  picked = jnp.take_along_axis(matrix, jnp.broadcast_to(jnp.maximum(cols, 0), matrix.shape), -1)
  return jnp.where(cols >= 0, picked, fill)


def log_decay(form: F.Form) -> Array:
  """log of the transition's gain over lag Δ: log‖Φ(t, t−Δ)‖, [B, H, T(t), T(Δ)].

  Scalar forms: log|λ_{t−Δ+1}⋯λ_t| (diagonal: the largest channel). Delta
  forms: Σ log α_r, the spectral norm of the product while β‖k‖² ≤ 2 (exact
  when Δ < d_k: some direction is orthogonal to every key in the window).
  Kernel forms: log ν_{t−Δ} − log ν_t, the telescoped normaliser ratios.
  Entries with Δ > t are NaN.
  """
  if isinstance(form, F.ScalarForm):
    log_lam = form.log_lam
  elif isinstance(form, F.DeltaForm):
    log_lam = form.log_alpha
  else:
    _, log_norm = F.kernel_weights(form)
    log_lam = jnp.concatenate([jnp.zeros_like(log_norm[..., :1]), -jnp.diff(log_norm)], -1)
  if log_lam.ndim == 3:
    log_lam = log_lam[..., None]
  cum = jnp.cumsum(log_lam, axis=2)  # [B, H, T, N|1]
  pairwise = (cum[:, :, :, None] - cum[:, :, None, :]).max(-1)  # max_n Σ_{s<r≤t} log|λ_rn|
  return by_lag(pairwise, jnp.nan)


def first_lag_below(curve: Array, threshold: float) -> Array:
  """Smallest Δ with curve[..., Δ] ≤ threshold (NaNs never count); inf if none."""
  hit = curve <= threshold
  first = jnp.argmax(hit, axis=-1).astype(curve.dtype)
  return jnp.where(hit.any(-1), first, jnp.inf)


@functools.partial(jax.jit, static_argnums=1)
def memory_profile(form: F.Form, eps: tuple[float, ...] = (0.5, 0.1, 0.01)) -> dict:
  """Decay-based memory of a form.

  Returns:
    'log_decay' [B,H,T,T(Δ)] (see `log_decay`); 'horizon' {ε: [B,H,T]}, the
    smallest lag Δ at which the gain falls to ε (inf if it does not within the
    sequence; ε = 0.5 is the half-life); 'time_constant' [B,H,T−1], −1/log|λ_t|
    of the slowest mode (delta forms: −1/log α_t).
  """
  decay = log_decay(form)
  horizon = {e: first_lag_below(decay, math.log(e)) for e in eps}
  # log|λ_t| of the slowest mode, t ≥ 1: lag 1 of the decay.
  slowest = (form.log_alpha if isinstance(form, F.DeltaForm) else decay[..., 1])[..., 1:]
  safe = jnp.where(slowest < 0, slowest, -1.0)
  return {
    "log_decay": decay,
    "horizon": horizon,
    "time_constant": jnp.where(slowest < 0, -1.0 / safe, jnp.inf),
  }


# Attention statistics -----------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def attention_stats(
  m: Array,
  topk: tuple[int, ...] = (1, 4),
  distances: tuple[int, ...] = (4, 16),
  eps: tuple[float, ...] = (0.5, 0.1),
) -> dict:
  """Per-query statistics of an implicit attention matrix m [B, H, T, T].

  Rows are ℓ1-normalised in absolute value, a = |m| / Σ|m| (the identity for
  softmax rows); 'row_sum' and 'neg_mass' report what that hides.

  Returns (each [B, H, T], dicts keyed by k, D or ε):
    entropy H_t; norm_entropy H_t / log(t + 1) (0 at t = 0); eff_support
    exp(H_t); participation 1/Σa²; topk_mass {k}; mean_dist Σ a_s (t − s);
    mass_beyond {D}: mass at distance > D; sink_mass a_t(0);
    attention_horizon {ε}: smallest D holding 1 − ε of the mass within
    distance D; row_sum Σ m; neg_mass Σ max(−m, 0)/Σ|m|.
  """
  t = m.shape[-1]
  absolute = jnp.abs(m)
  total = absolute.sum(-1, keepdims=True)
  a = jnp.where(total > 0, absolute / jnp.where(total > 0, total, 1.0), 0.0)
  log_a = jnp.log(jnp.where(a > 0, a, 1.0))
  entropy = -jnp.sum(a * log_a, -1)
  log_len = jnp.log(jnp.arange(1, t + 1, dtype=m.dtype))
  distance = (jnp.arange(t)[:, None] - jnp.arange(t)[None, :]).astype(m.dtype)
  within = jnp.cumsum(by_lag(a, 0.0), -1)  # mass at distance ≤ D
  sorted_top = jax.lax.top_k(a, max(topk))[0]
  return {
    "entropy": entropy,
    "norm_entropy": jnp.where(log_len > 0, entropy / jnp.where(log_len > 0, log_len, 1.0), 0.0),
    "eff_support": jnp.exp(entropy),
    "participation": 1.0 / jnp.maximum(jnp.sum(a * a, -1), 1e-30),
    "topk_mass": {k: sorted_top[..., :k].sum(-1) for k in topk},
    "mean_dist": jnp.sum(a * jnp.maximum(distance, 0.0), -1),
    "mass_beyond": {d: 1.0 - within[..., min(d, t - 1)] for d in distances},
    "sink_mass": a[..., 0],
    "attention_horizon": {
      e: jnp.argmax(within >= 1.0 - e - 1e-6, axis=-1).astype(m.dtype) for e in eps
    },
    "row_sum": m.sum(-1),
    "neg_mass": jnp.sum(jnp.maximum(-m, 0.0), -1) / jnp.maximum(total[..., 0], 1e-30),
  }


def sink_heads(sink_mass: Array, threshold: float = 0.5, skip: int = 1) -> Array:
  """Heads whose mean sink mass over queries t ≥ `skip` exceeds `threshold`: [heads] bool."""
  return sink_mass[..., skip:].mean(axis=(0, 2)) > threshold


# States -------------------------------------------------------------------------


def effective_rank(matrix: Array) -> Array:
  """exp(entropy of the normalised singular values) of [..., N, dv] (Roy & Vetterli)."""
  s = jnp.linalg.svd(matrix, compute_uv=False)
  p = s / jnp.maximum(s.sum(-1, keepdims=True), 1e-30)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1))


def state_stats(form: F.Form) -> dict | None:
  """‖h_t‖_F and effective rank of the state after every step ([B, H, T] each),
  plus the state size N·dv; None for kernel forms (no finite state). For
  NAtS-L the persistent state P is measured."""
  if isinstance(form, F.KernelForm):
    return None
  norm, rank = _state_trajectory(form)
  return {"norm": norm, "eff_rank": rank, "state_dim": F.state_dim(form)}


@jax.jit
def _state_trajectory(form: F.Form) -> tuple[Array, Array]:
  def observe(state):
    return jnp.sqrt(jnp.sum(state * state, axis=(-2, -1))), effective_rank(state)

  return F.run_recurrent(form, observe)[1]
