"""The common (dynamical-systems) form of every attention layer, and how to run it.

Every mixer is read as an input-dependent linear recurrence (the Dynamical
Systems Framework, Sieber et al., 2024) per head,

    h_t = Λ_t h_{t−1} + b_t u_tᵀ,      y_t = h_tᵀ c_t,      h_{−1} = 0,

with h_t ∈ R^{N×dv}, or, for the softmax family, as its implicit attention
matrix with the normaliser trajectory (an infinite-dimensional state). Three
form types cover the registered variants:

* `ScalarForm`: Λ_t = λ_t·I (or diagonal). Linear attention, with the
  normaliser folded into the state: λ_t = η_{t−1}/η_t, b_t = φ(k_t)/η_t.
* `DeltaForm`: Λ_t = α_t (I − β_t k_t k_tᵀ), a dense rank-one update of a
  scaled identity (Gated DeltaNet). With `reset` it is NAtS-L's delta path, a
  direct sum of the persistent state P (written only by delta-typed blocks)
  and a per-block scratch R that restarts from P at every block start.
* `KernelForm`: y_t = Σ_{s≤t} w_t(s) u_s with normalised kernel weights
  (softmax, SSA, LUCID, softplus, NAtS-L's softmax path).

Arrays are head-major: [batch, heads, time, ...]. The form containers are
defined in `attnlab.models.attention.common_form` (each variant builds its
forms next to its mixer) and re-exported here. The recurrent form runs as a
`lax.scan` (`run_recurrent`), the parallel form as y = M u with the implicit
attention matrix M[t, s] = c_tᵀ Λ_t⋯Λ_{s+1} b_s (`implicit_attention`,
`run_parallel`). Both reproduce the layers' production forward
(`attnlab.analysis.collect.layer_forms`); the tests check it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.models.attention.common_form import DeltaForm, Form, KernelForm, ScalarForm
from attnlab.ops import softplus as softplus_op

Array = jax.Array


def state_dim(form: Form) -> float:
  """Size of the recurrent state per head, N·dv (inf for kernel forms)."""
  if isinstance(form, ScalarForm):
    return float(form.b.shape[-1] * form.u.shape[-1])
  if isinstance(form, DeltaForm):
    copies = 1 if form.reset is None else 2
    return float(copies * form.k.shape[-1] * form.u.shape[-1])
  return float("inf")


def _causal(t: int) -> Array:
  return jnp.tril(jnp.ones((t, t), bool))


def _time_major(*arrays: Array) -> tuple[Array, ...]:
  """[B, H, T, ...] -> [T, B, H, ...] for scans over time."""
  return tuple(jnp.moveaxis(a, 2, 0) for a in arrays)


def scalar_lambda(form: ScalarForm) -> Array:
  """λ_t (signed) of a scalar or diagonal form, shaped like `form.log_lam`."""
  lam = jnp.exp(form.log_lam)
  return lam if form.sign is None else form.sign * lam


# Kernel weights ------------------------------------------------------------------


def kernel_logits(form: KernelForm) -> Array:
  """Masked softmax logits s[t, s'] = scale_t q_t·k_s', −inf where not visible: [B,H,T,T]."""
  logits = jnp.einsum("bhtd,bhsd->bhts", form.q, form.k) * form.scale[..., None]
  return jnp.where(visible_mask(form), logits, -jnp.inf)


def visible_mask(form: KernelForm) -> Array:
  """Causal mask, intersected with the form's own: [B, H, T, T] bool."""
  t = form.q.shape[2]
  mask = jnp.broadcast_to(_causal(t), (*form.q.shape[:2], t, t))
  return mask if form.visible is None else mask & form.visible


def kernel_weights(form: KernelForm) -> tuple[Array, Array]:
  """(weights [B,H,T,T], log row normaliser [B,H,T]) of a kernel form.

  Softmax: the normaliser is ν_t = Σ_s exp(s_ts), so log ν_t is the LSE.
  Softplus: ν_t = Σ_s softplus(log D · log(t+1) · q̂_t·k̂_s), before LSSAR's
  sharpening (a row that LSSAR empties has zero weights).
  """
  if form.kernel == "softmax":
    logits = kernel_logits(form)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.exp(logits - lse[..., None]), lse
  if form.kernel == "softplus":
    t, d = form.q.shape[2], form.q.shape[-1]
    scores = jnp.einsum(
      "bhtd,bhsd->bhts", softplus_op.normalize(form.q), softplus_op.normalize(form.k)
    )
    mask = visible_mask(form)
    rows = jnp.arange(1, t + 1)
    raw = jnp.where(mask, jax.nn.softplus(jnp.log(d) * jnp.log(rows)[:, None] * scores), 0.0)
    weights = softplus_op.row_weights(scores, mask, rows, form.power, d)
    return weights, jnp.log(raw.sum(-1))
  raise ValueError(f"unknown kernel {form.kernel!r}; expected 'softmax' or 'softplus'")


# Parallel form -------------------------------------------------------------------


def _scalar_matrix(form: ScalarForm) -> Array:
  t = form.b.shape[2]
  causal = _causal(t)
  diagonal = form.log_lam.ndim == 4
  log_lam = form.log_lam if diagonal else form.log_lam[..., None]  # [B,H,T,N or 1]
  cum = jnp.cumsum(log_lam, axis=2)
  diff = cum[:, :, :, None] - cum[:, :, None, :]  # [B,H,T(t),T(s),N|1] = Σ_{s<r≤t} log|λ_r|
  decay = jnp.where(causal[..., None], jnp.exp(jnp.where(causal[..., None], diff, 0.0)), 0.0)
  if form.sign is not None:
    sign = form.sign if diagonal else form.sign[..., None]
    flips = jnp.cumsum((sign < 0).astype(jnp.int32), axis=2)
    parity = (flips[:, :, :, None] - flips[:, :, None, :]) % 2
    decay = decay * (1 - 2 * parity).astype(decay.dtype)
  return jnp.einsum("bhtn,bhsn,bhtsn->bhts", form.c, form.b, decay)


def _apply_delta(
  log_alpha: Array, beta: Array, k: Array, w: Array, write: Array | None = None
) -> Array:
  """α (I − m β k kᵀ) w for w [B, H, dk, X]; scalars [B, H], k [B, H, dk]."""
  coef = beta if write is None else beta * write
  proj = jnp.einsum("bhk,bhkx->bhx", k, w)
  w = w - (coef[..., None] * k)[..., None] * proj[:, :, None, :]
  return jnp.exp(log_alpha)[..., None, None] * w


def _delta_matrix(form: DeltaForm) -> Array:
  """M[t, s] by carrying W_t = [Φ(t, s) b_s]_s (columns s ≤ t) through the scan."""
  b, h, t, dk = form.k.shape
  eye = jnp.eye(t, dtype=form.k.dtype)
  write = jnp.ones_like(form.beta) if form.write is None else form.write
  reset = jnp.zeros((t,), bool) if form.reset is None else form.reset
  xs = (*_time_major(form.log_alpha, form.beta, form.k, form.c, write), eye, reset)

  def step(carry, inputs):
    w_p, w_r = carry  # [B,H,dk,T]: persistent P and scratch R columns
    g, beta, k, c, m, onehot, is_start = inputs
    w_r = jnp.where(is_start, w_p, w_r)
    w_r = _apply_delta(g, beta, k, w_r)
    w_r = w_r + (beta[..., None] * k)[..., None] * onehot
    if form.reset is not None:
      w_p = _apply_delta(g, beta, k, w_p, m)
      w_p = w_p + (m[..., None] * beta[..., None] * k)[..., None] * onehot
    return (w_p, w_r), jnp.einsum("bhk,bhks->bhs", c, w_r)

  zeros = jnp.zeros((b, h, dk, t), form.k.dtype)
  _, rows = jax.lax.scan(step, (zeros, zeros), xs)
  return jnp.moveaxis(rows, 0, 2)


def implicit_attention(form: Form) -> Array:
  """The implicit attention matrix M [batch, heads, time(query), time(key)].

  y = M u for every form (u the form's values); zero above the diagonal.
  Scalar/diagonal forms use a log-space segment sum, delta forms sequential
  rank-one products, kernel forms their normalised weights. For LUCID the
  weights act on V′; `effective_attention` gives the map from raw values.
  """
  if isinstance(form, ScalarForm):
    return _scalar_matrix(form)
  if isinstance(form, DeltaForm):
    return _delta_matrix(form)
  return kernel_weights(form)[0]


def effective_attention(form: Form) -> Array:
  """The map from the layer's raw values: M @ value_map (LUCID), else M."""
  m = implicit_attention(form)
  if isinstance(form, KernelForm) and form.value_map is not None:
    return m @ form.value_map
  return m


def run_parallel(form: Form) -> Array:
  """y = M u: [batch, heads, time, dv]."""
  return implicit_attention(form) @ form.u


# Recurrent form ------------------------------------------------------------------


def run_recurrent(form: Form, observe=None) -> tuple[Array, object]:
  """Runs the form as an RNN, one `lax.scan` step per token.

  Args:
    form: a ScalarForm, DeltaForm or KernelForm.
    observe: optional function of the state after each step (ScalarForm:
      h [B,H,N,dv]; DeltaForm: the persistent state [B,H,dk,dv]; KernelForm:
      the (keys, values) cache) whose outputs are stacked over time.

  Returns:
    (y [batch, heads, time, dv], observations stacked on axis 2, or None).
  """
  observe = observe or (lambda state: None)
  if isinstance(form, ScalarForm):
    return _scalar_recurrent(form, observe)
  if isinstance(form, DeltaForm):
    return _delta_recurrent(form, observe)
  return _kernel_recurrent(form, observe)


def _stack(observed):
  return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 2), observed)


def _scalar_recurrent(form: ScalarForm, observe):
  b, h, _, n = form.b.shape
  lam = scalar_lambda(form)
  if lam.ndim == 3:
    lam = lam[..., None]  # scalar: broadcast over N

  def step(state, inputs):
    lam_t, b_t, c_t, u_t = inputs  # [B,H,N|1], [B,H,N], [B,H,N], [B,H,dv]
    state = lam_t[..., None] * state + b_t[..., None] * u_t[:, :, None, :]
    return state, (jnp.einsum("bhnv,bhn->bhv", state, c_t), observe(state))

  h0 = jnp.zeros((b, h, n, form.u.shape[-1]), form.u.dtype)
  _, (y, observed) = jax.lax.scan(step, h0, _time_major(lam, form.b, form.c, form.u))
  return jnp.moveaxis(y, 0, 2), _stack(observed)


def _delta_recurrent(form: DeltaForm, observe):
  b, h, t, dk = form.k.shape
  write = jnp.ones_like(form.beta) if form.write is None else form.write
  reset = jnp.zeros((t,), bool) if form.reset is None else form.reset
  xs = (*_time_major(form.log_alpha, form.beta, form.k, form.c, form.u, write), reset)

  def step(carry, inputs):
    p, r = carry
    g, beta, k, c, u, m, is_start = inputs
    r = _apply_delta(g, beta, k, jnp.where(is_start, p, r))
    r = r + (beta[..., None] * k)[..., None] * u[:, :, None, :]
    if form.reset is None:
      p = r  # a single state
    else:
      p = _apply_delta(g, beta, k, p, m)
      p = p + (m[..., None] * beta[..., None] * k)[..., None] * u[:, :, None, :]
    return (p, r), (jnp.einsum("bhkv,bhk->bhv", r, c), observe(p))

  s0 = jnp.zeros((b, h, dk, form.u.shape[-1]), form.u.dtype)
  _, (y, observed) = jax.lax.scan(step, (s0, s0), xs)
  return jnp.moveaxis(y, 0, 2), _stack(observed)


def _kernel_recurrent(form: KernelForm, observe):
  """The KV-cache RNN: the state is every key and value seen so far."""
  b, h, t, _ = form.q.shape
  mask = visible_mask(form)

  def step(cache, inputs):
    keys, values = cache
    i, q_t, k_t, u_t, scale_t, mask_t = inputs
    keys = jax.lax.dynamic_update_index_in_dim(keys, k_t, i, axis=2)
    values = jax.lax.dynamic_update_index_in_dim(values, u_t, i, axis=2)
    row = KernelForm(
      q=q_t[:, :, None],
      k=keys,
      scale=scale_t[:, :, None],
      u=values,
      visible=mask_t[:, :, None],
      kernel=form.kernel,
      power=form.power,
    )
    w = _kernel_row(row, i)
    return (keys, values), (jnp.einsum("bhs,bhsv->bhv", w, values), observe((keys, values)))

  cache = (jnp.zeros_like(form.k), jnp.zeros_like(form.u))
  xs = (jnp.arange(t), *_time_major(form.q, form.k, form.u, form.scale, mask))
  _, (y, observed) = jax.lax.scan(step, cache, xs)
  return jnp.moveaxis(y, 0, 2), _stack(observed)


def _kernel_row(row: KernelForm, i: Array) -> Array:
  """Weights [B, H, S] of the single query at absolute position i over a cache."""
  visible = row.visible[:, :, 0]  # [B, H, S]: the query's own mask row
  if row.kernel == "softmax":
    logits = jnp.einsum("bhd,bhsd->bhs", row.q[:, :, 0], row.k) * row.scale
    return jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
  d = row.q.shape[-1]
  scores = jnp.einsum(
    "bhd,bhsd->bhs", softplus_op.normalize(row.q[:, :, 0]), softplus_op.normalize(row.k)
  )
  w = softplus_op.row_weights(scores[:, :, None], visible[:, :, None], (i + 1)[None], row.power, d)
  return w[:, :, 0]


# Explicit transitions (small sizes: tests and numeric eigenvalues) ---------------


def transition_matrices(form: DeltaForm) -> Array:
  """Explicit Λ_t [batch, heads, time, N, N] of a delta form, N = dk (or 2·dk
  for the direct sum (P, R), ordered P first)."""
  dk = form.k.shape[-1]
  eye = jnp.eye(dk, dtype=form.k.dtype)
  alpha = jnp.exp(form.log_alpha)[..., None, None]
  outer = form.k[..., :, None] * form.k[..., None, :]
  full = alpha * (eye - form.beta[..., None, None] * outer)
  if form.reset is None:
    return full
  write = jnp.ones_like(form.beta) if form.write is None else form.write
  persistent = alpha * (eye - (write * form.beta)[..., None, None] * outer)
  start = form.reset[:, None, None]
  top = jnp.concatenate([persistent, jnp.zeros_like(full)], -1)
  bottom = jnp.concatenate([jnp.where(start, full, 0.0), jnp.where(start, 0.0, full)], -1)
  return jnp.concatenate([top, bottom], -2)
