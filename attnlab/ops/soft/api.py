"""SOFT attention (Lu et al., NeurIPS 2021) made causal: Gaussian-kernel
Nyström attention with learned landmarks.

    p_t = exp(−‖q_t − l_a‖² / (2√d))_a              [m]   (K = Q, as in SOFT)
    A   = exp(−‖l_a − l_b‖² / (2√d))_ab             [m, m]
    o_t = (p_t A⁺) Σ_{s≤t} p_sᵀ v_s  [/ (p_t A⁺) Σ_{s≤t} p_sᵀ]

Landmarks that do not depend on the input make Ŝ = P A⁺ Pᵀ separable, so the
causal mask is exact and the product is linear attention over m features:
O(T·m·d) to train and an [m, d_v] state to decode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _dispatch, _dtypes, _segments
from attnlab.ops.linear.api import linear_attention
from attnlab.ops.soft import reference, xla

# Nyström features run in XLA; the linear-attention part dispatches on its own.
_DISPATCH = _dispatch.Dispatch(
  op="soft_attention", package="attnlab.ops.soft", implementations=("xla", "reference")
)

# Relative floor of the normalised row sum (see `soft_attention`); the analysis
# rebuilds the same clamp from it.
NORMALIZER_EPS = 1e-6


def newton_inverse(a: jax.Array, *, iters: int = 20, ridge: float = 0.01) -> jax.Array:
  """(A + ridge·I)⁻¹ by Newton–Schulz iterations, with SOFT's gradient rule.

  Args:
    a: [..., m, m]; should be well conditioned once the ridge is added.
    iters: fixed iteration count; keep it equal in training and evaluation,
      since unconverged directions act as a spectral filter.
    ridge: added to the diagonal (SOFT uses 0.01).

  Returns:
    [..., m, m] in the compute dtype. Its VJP is −Xᵀ G Xᵀ at the output X,
    not autodiff through the iterations.
  """
  if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
    raise ValueError(f"newton_inverse expects square [..., m, m] matrices, got {a.shape}")
  if iters < 0:
    raise ValueError(f"iters must be >= 0, got {iters}")
  a = jnp.asarray(a, _dtypes.compute_dtype(a))
  return xla.newton_inverse(a, int(iters), float(ridge))


def soft_attention(
  q: jax.Array,
  v: jax.Array,
  landmarks: jax.Array,
  *,
  newton_iters: int = 20,
  ridge: float = 0.01,
  normalize: bool = True,
  eps: float = NORMALIZER_EPS,
  causal: bool = True,
  initial_state: jax.Array | None = None,
  output_final_state: bool = False,
  chunk_size: int = 64,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """Nyström Gaussian-kernel attention with K = Q.

  Args:
    q: [batch, time, heads, head_dim] queries, also used as keys.
    v: [batch, time, heads, head_dim_v]
    landmarks: [heads, num_landmarks, head_dim], in the units of q.
    newton_iters, ridge: of the pseudo-inverse of A (see `newton_inverse`).
    normalize: divide by the causal row sum Σ_{s≤t} Ŝ_ts. Each query's
      kernel row is rescaled in log space (the factor cancels), so rows stay
      exact as ‖q‖ grows; the sum is floored at `eps` times the size of its
      terms, Σ_a |(P A⁺)_ta| Σ_{s≤t} P_sa, because A⁺ has negative entries.
      False is SOFT's unnormalised form.
    eps: relative floor of the row sum (scale-free).
    causal: False gives the original bidirectional SOFT (encoders); then no
      state is taken or returned.
    initial_state: [batch, heads, num_landmarks, head_dim_v (+1 if normalize)]
      = Σ_s p_sᵀ [v_s, 1] over earlier tokens.
    output_final_state: also return the state after the last step.
    chunk_size: of the linear-attention scan; any T works.
    segment_ids: optional [batch, time] int document ids of packed rows
      (causal only): the scan's state and the row-sum normaliser restart at
      every document; an initial state belongs to the row's first document.
    implementation: None, 'xla' (features + chunked linear attention) or
      'reference' (explicit T×T matrix with a direct inverse; no state).

  Returns:
    (o [batch, time, heads, head_dim_v] in q.dtype, final state or None).
  """
  if q.ndim != 4 or v.ndim != 4 or q.shape[:3] != v.shape[:3]:
    raise ValueError(
      f"soft_attention expects q [B,T,H,D] and v [B,T,H,Dv]; got q{q.shape} v{v.shape}"
    )
  if landmarks.ndim != 3 or landmarks.shape[0] != q.shape[2] or landmarks.shape[2] != q.shape[3]:
    raise ValueError(
      f"landmarks must be [heads, num_landmarks, head_dim] = [{q.shape[2]}, m, {q.shape[3]}], "
      f"got {landmarks.shape}"
    )
  if not causal and (initial_state is not None or output_final_state):
    raise ValueError("bidirectional SOFT (causal=False) has no recurrent state")
  _segments.check(segment_ids, q.shape[:2], "soft_attention")
  if not causal and segment_ids is not None:
    raise ValueError("soft_attention: segment_ids need the causal form")
  impl = "reference" if _DISPATCH.choose(implementation) == "reference" else "xla"
  dtype = _dtypes.compute_dtype(q, v, landmarks)
  q32, v32, l32 = (jnp.asarray(a, dtype) for a in (q, v, landmarks))

  if impl == "reference":
    if initial_state is not None or output_final_state:
      raise ValueError("the reference SOFT has no state; use implementation='xla'")
    out = reference.soft_attention(
      q32, v32, l32, ridge=ridge, normalize=normalize, eps=eps, causal=causal,
      segment_ids=segment_ids,
    )  # fmt: skip
    return out.astype(q.dtype), None

  if normalize:
    # Features in log-space-rescaled units; the state stays in absolute units
    # Σ_s P_sᵀ [v_s, 1], converted on the way in and out.
    query_side, key_side, log_reference = xla.rescaled_nystrom_features(
      q32, l32, newton_iters=newton_iters, ridge=ridge
    )
    to_units = jnp.exp(log_reference)[..., None, None]  # [B, H, 1, 1]
    if initial_state is not None:
      initial_state = jnp.asarray(initial_state, dtype) / to_units
    # A ones column carries the row sums through the same scan.
    v32 = jnp.concatenate([v32, jnp.ones((*v32.shape[:3], 1), dtype)], -1)
  else:
    query_side, key_side = xla.nystrom_features(q32, l32, newton_iters=newton_iters, ridge=ridge)
  if causal:
    out, state = linear_attention(
      query_side,
      key_side,
      v32,
      scale=1.0,
      initial_state=initial_state,
      output_final_state=output_final_state,
      chunk_size=chunk_size,
      segment_ids=segment_ids,
      implementation=impl,
    )
  else:
    out = jnp.einsum("bthm,bhme->bthe", query_side, jnp.einsum("bshm,bshe->bhme", key_side, v32))
    state = None
  if normalize:
    if causal:
      key_sums = jnp.cumsum(key_side, axis=1)
      if initial_state is not None:  # its last column is Σ P̂_s over earlier tokens
        key_sums = key_sums + initial_state[..., -1][:, None]
      if segment_ids is not None:  # restart at each document: drop the sums before it
        first = jnp.arange(q.shape[1]) - _segments.positions(segment_ids)  # [B, T]
        before = jnp.concatenate([jnp.zeros_like(key_sums[:, :1]), key_sums], axis=1)
        key_sums = key_sums - jnp.take_along_axis(before, first[:, :, None, None], axis=1)
    else:
      key_sums = jnp.sum(key_side, axis=1, keepdims=True)
    floor = xla.normalizer_floor(query_side, key_sums, eps)
    out = out[..., :-1] / jnp.maximum(out[..., -1:], floor)
    if state is not None:
      state = state * to_units
  return out.astype(q.dtype), state
