"""Softmax attention as a sum of RNNs (Mongaras & Larson, 2025): the Taylor view.

With logits s = scale·q·k, exp(s) = Σ_n sⁿ/n! and sⁿ = (q̃^{⊗n})ᵀ k^{⊗n}
(q̃ = scale·q), so softmax attention is the ratio of two infinite sums of
linear RNNs; the n-th has a d^n × dv state and weight 1/n!, and linear
attention is the n = 1 term. Truncating at order P gives weights
T_P(s)/Σ T_P(s) with T_P(x) = Σ_{n≤P} xⁿ/n!. Use even P: T_P is then
positive everywhere, while odd orders can drive the normaliser through zero.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnlab.analysis import forms as F

Array = jax.Array

EVEN_ORDERS = tuple(range(0, 26, 2))


def taylor_exp(x: Array, order: int) -> Array:
  """T_P(x) = Σ_{n≤P} xⁿ/n! by Horner's rule."""
  acc = jnp.ones_like(x)
  for n in range(order, 0, -1):
    acc = 1.0 + x * acc / n
  return acc


def remainder_bound(x: Array, order: int) -> Array:
  """|exp(y) − T_P(y)| ≤ e^{max(x, 0)} |x|^{P+1}/(P+1)! for |y| ≤ |x| (Lagrange)."""
  x = jnp.abs(x)
  log_term = (order + 1) * jnp.log(jnp.maximum(x, 1e-30)) - math.lgamma(order + 2)
  return jnp.exp(x + log_term)


def _logits(form: F.KernelForm) -> tuple[Array, Array]:
  if form.kernel != "softmax":
    raise ValueError(f"the Taylor view needs a softmax kernel form, got {form.kernel!r}")
  mask = F.visible_mask(form)
  return jnp.where(mask, F.kernel_logits(form), 0.0), mask


def taylor_weights(form: F.KernelForm, order: int) -> Array:
  """Order-P weights T_P(s)/Σ_s T_P(s) over the visible keys: [B, H, T, T]."""
  s, mask = _logits(form)
  p = jnp.where(mask, taylor_exp(s, order), 0.0)
  return p / p.sum(-1, keepdims=True)


def taylor_analysis(
  form: F.KernelForm, orders: tuple[int, ...] = EVEN_ORDERS, max_terms: int = 40
) -> dict[str, Array]:
  """Truncation error of the order-P expansion, per head.

  Returns:
    'orders' [P]; 'weight_err' [P, heads]: max |W_P − W| over all weights;
    'out_err' [P, heads]: ‖(W_P − W) u‖ / ‖W u‖; 'remainder_bound' [P, heads]:
    the Lagrange bound on |exp − T_P| at the head's largest |s|;
    'min_poly' [P, heads]: min of T_P over visible logits (> 0 at even P);
    'term_mag' [max_terms, heads]: mean |sⁿ/n!| over visible entries (the
    magnitude probe of Mongaras & Larson, without the masked zeros);
    'dominant_order' [heads]: its argmax; 'max_abs_logit' [heads].
  """
  s, mask = _logits(form)
  exact = F.kernel_weights(form)[0]
  y = exact @ form.u
  y_norm = jnp.sqrt(jnp.sum(y * y, axis=(0, 2, 3)))
  count = mask.sum(axis=(0, 2, 3))
  log_abs = jnp.log(jnp.where(mask & (s != 0), jnp.abs(s), 1e-30))
  max_abs = jnp.max(jnp.abs(s), axis=(0, 2, 3))
  steps = max(max_terms, max(orders) + 1)

  # One scan over n carries the term sⁿ/n! and the partial sum T_n(s), so
  # every order costs one step instead of a Horner pass of its own.
  def step(carry, n):
    term, partial = carry
    term = jnp.where(n > 0, term * s / jnp.maximum(n, 1), term)
    partial = jnp.where(n > 0, partial + term, partial)
    magnitude = jnp.where(n > 0, jnp.exp(n * log_abs - jax.lax.lgamma(n + 1.0)), 1.0)
    p = jnp.where(mask, partial, 0.0)
    w = p / p.sum(-1, keepdims=True)
    diff = (w - exact) @ form.u
    return (term, partial), {
      "term_mag": jnp.where(mask, magnitude, 0.0).sum(axis=(0, 2, 3)) / count,
      "weight_err": jnp.max(jnp.abs(w - exact), axis=(0, 2, 3)),
      "out_err": jnp.sqrt(jnp.sum(diff * diff, axis=(0, 2, 3))) / y_norm,
      "min_poly": jnp.where(mask, partial, jnp.inf).min(axis=(0, 2, 3)),
    }

  ones = jnp.ones_like(s)
  _, per_n = jax.lax.scan(step, (ones, ones), jnp.arange(steps, dtype=s.dtype))
  index = jnp.asarray(orders)
  term_mag = per_n["term_mag"][:max_terms]
  return {
    "orders": index,
    "weight_err": per_n["weight_err"][index],
    "out_err": per_n["out_err"][index],
    "remainder_bound": jnp.stack([remainder_bound(max_abs, order) for order in orders]),
    "min_poly": per_n["min_poly"][index],
    "term_mag": term_mag,
    "dominant_order": jnp.argmax(term_mag, axis=0),
    "max_abs_logit": max_abs,
  }


def _kron_power(x: Array, n: int) -> Array:
  """x^{⊗n} flattened: [..., d] -> [..., d**n] (n = 0 gives ones [..., 1])."""
  out = jnp.ones((*x.shape[:-1], 1), x.dtype)
  for _ in range(n):
    out = (out[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1)
  return out


def taylor_recurrent(form: F.KernelForm, order: int) -> Array:
  """The order-P truncation run as P + 1 linear RNNs (tiny head_dim only: the
  n-th state has d^n rows).

      S_t^{(n)} = S_{t−1}^{(n)} + k_t^{⊗n} u_tᵀ,   z_t^{(n)} = z_{t−1}^{(n)} + k_t^{⊗n}
      y_t = Σ_n (q̃_t^{⊗n})ᵀ S_t^{(n)} / n!  ÷  Σ_n (q̃_t^{⊗n})ᵀ z_t^{(n)} / n!

  Equals `taylor_weights(form, order) @ form.u` for causal forms.

  Returns:
    y [batch, heads, time, dv].
  """
  if form.visible is not None:
    raise ValueError("taylor_recurrent handles plain causal forms only")
  q = form.q * form.scale[..., None]
  weights = [1.0 / math.factorial(n) for n in range(order + 1)]

  def step(states, inputs):
    q_t, k_t, u_t = inputs  # [B, H, d], [B, H, d], [B, H, dv]
    new_states, num, den = [], 0.0, 0.0
    for n, (s_n, z_n) in enumerate(states):
      fk, fq = _kron_power(k_t, n), _kron_power(q_t, n)
      s_n = s_n + fk[..., None] * u_t[..., None, :]
      z_n = z_n + fk
      num = num + weights[n] * jnp.einsum("bhf,bhfv->bhv", fq, s_n)
      den = den + weights[n] * jnp.einsum("bhf,bhf->bh", fq, z_n)
      new_states.append((s_n, z_n))
    return new_states, num / den[..., None]

  b, h, _, d = q.shape
  dv = form.u.shape[-1]
  states = [
    (jnp.zeros((b, h, d**n, dv), q.dtype), jnp.zeros((b, h, d**n), q.dtype))
    for n in range(order + 1)
  ]
  xs = tuple(jnp.moveaxis(a, 2, 0) for a in (q, form.k, form.u))
  _, y = jax.lax.scan(step, states, xs)
  return jnp.moveaxis(y, 0, 2)
