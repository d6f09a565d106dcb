"""Chunkwise gated delta rule (WY / UT transform) in plain jnp.

Shared by the gated delta rule op and NAtS-L's gated-write variant. For a
chunk with in-chunk cumulative log decay γ and Γ_ij = exp(γ_i − γ_j) (i ≥ j):

    A  = strict_lower(diag(β) K Kᵀ ⊙ Γ)
    U  = (I + A)⁻¹ diag(β) V           W = (I + A)⁻¹ diag(β e^γ) K
    V' = U − W S                        (the chunk's corrected values)
    O  = diag(e^γ) (scale·Q) S + (scale·Q Kᵀ ⊙ Γ) V'
    S' = e^{γ_C} S + m (K ⊙ e^{γ_C − γ})ᵀ V'

with S the state at the chunk start and m the chunk's write gate (1 for the
plain rule). Everything that does not depend on S (A, its inverse, U, W,
Q Kᵀ ⊙ Γ) is computed for all chunks at once; the scan over chunks carries
S with fla's state update, W S and Kᵀ V' (4·C·K·V flops per chunk and value
head, against 2·K²·V for carrying a K×K transition), and forms the chunk's
outputs while its S and V' are at hand (measured faster on CPU than storing
every chunk-start state and multiplying afterwards). Every exponent is ≤ 0,
so nothing overflows.

Grouped value heads (GVA): q and k have H heads, v, g, β and the state
HV = H·G. Q Kᵀ and K Kᵀ are formed once per q/k head (as one [2C, K] x [K, C]
dot) and broadcast over the G value heads of the group. Only diag(e^γ) Q,
whose product with the state is per value head anyway, exists per value head:
it rides with W as one [2C, K] operand, so each scan step does one dot with S
where it would do two.

Packed sequences: `segment_ids` [B, T] marks documents (a new document
starts wherever the id changes). Pairs of tokens in different documents are
masked out of A, Γ and Q Kᵀ explicitly, tokens after a boundary inside a
chunk do not read the chunk-start state, and the state carried out of a chunk
holds only its last document's writes (no decay of the old state). No
-inf decays, so the cumulative sums keep their precision.

Precision: matmul operands are in the inputs' dtype (bf16 stays bf16 on the
MXU / tensor cores) and accumulate in the compute dtype (≥ float32) through
`preferred_element_type`; float32 or float64 operands use
Precision.HIGHEST so TPUs do not silently round them to bf16 passes. The
in-chunk inverse (I + A)⁻¹ and its products with β V and β e^γ K run in
`inverse_dtype` (default: the compute dtype, float32 even for bf16 inputs):
the entries of (I + A)⁻¹ grow with the chunk length and bf16 loses them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops import _dispatch, _linalg


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[B, T, H, ...] (T a multiple of chunk) -> [B, H, N, C, ...]."""
  b, t, h = x.shape[:3]
  x = x.reshape(b, t // chunk, chunk, h, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def _to_group_chunks(x: jax.Array, heads: int, chunk: int) -> jax.Array:
  """[B, T, H·G, ...] -> [B, H, G, N, C, ...] (value head h·G + j is (h, j))."""
  b, t, hv = x.shape[:3]
  x = x.reshape(b, t // chunk, chunk, heads, hv // heads, *x.shape[3:])
  return jnp.moveaxis(x, (3, 4), (1, 2))


def pad_time(x: jax.Array, pad: int, mode: str = "constant") -> jax.Array:
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode=mode)


def _einsum(spec: str, a: jax.Array, b: jax.Array, operand: jnp.dtype, acc: jnp.dtype):
  """einsum with operands cast to `operand` and accumulation in `acc`.

  XLA:CPU has no bf16 x bf16 -> f32 dot, so when compiling for a CPU 16-bit
  operands are widened to `acc` first (the same products, exactly).
  """
  if jnp.dtype(operand).itemsize < 4 and _dispatch.target_platform(a, b) == "cpu":
    operand = acc
  return jnp.einsum(
    spec,
    a.astype(operand),
    b.astype(operand),
    precision=_linalg.matmul_precision(operand),
    preferred_element_type=acc,
  )


def segment_masks(segment_ids: jax.Array, t_padded: int, chunk: int):
  """Per-chunk document structure from segment ids [B, T].

  Returns (same [B,N,C,C] bool: tokens i, j in one document; fresh [B,N,C]:
  token reads the chunk-start state; last [B,N,C]: token belongs to the
  chunk's last document; carry [B,N]: the chunk has no document start, so the
  old state survives it). The row's first token never starts a document: the
  initial state belongs to the row's first document.
  """
  b, t = segment_ids.shape
  seg = pad_time(segment_ids, t_padded - t, mode="edge")
  starts = jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  count = jnp.cumsum(starts.reshape(b, -1, chunk).astype(jnp.int32), axis=-1)  # [B,N,C]
  same = count[..., :, None] == count[..., None, :]
  fresh = count == 0
  last = count == count[..., -1:]
  return same, fresh, last, count[..., -1] == 0


def chunked_gated_delta(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  g: jax.Array,
  beta: jax.Array,
  *,
  scale: float,
  initial_state: jax.Array,
  chunk: int,
  write_gate: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  inverse_dtype: jnp.dtype | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Chunked gated delta rule.

  Args:
    q, k: [B, T, H, K] in the matmul operand dtype (bf16, f32 or f64).
    v: [B, T, HV, V], HV a multiple of H; same dtype as q.
    g, beta: [B, T, HV] in the compute dtype (≥ float32). T any length.
    initial_state: [B, HV, K, V] in the compute dtype.
    chunk: chunk length C.
    write_gate: optional [B, ceil(T/C), HV]; scales each chunk's write into the
      state (its own outputs still see it). None writes every chunk fully.
    segment_ids: optional [B, T] int document ids (see the module docstring).
    inverse_dtype: dtype of (I + A)⁻¹ and its products; None: the compute dtype.

  Returns:
    (o [B, T, HV, V] in the compute dtype, final state [B, HV, K, V]).
  """
  b, t, h, dk = q.shape
  hv, dv = v.shape[2], v.shape[3]
  grp = hv // h
  operand = jnp.result_type(q, k, v)
  acc = jnp.result_type(g, initial_state)
  inv_dtype = jnp.dtype(inverse_dtype or acc)
  pad = -t % chunk
  tp = t + pad
  # Padding with k = v = β = g = 0 leaves the state untouched.
  q, k, v, g, beta = (pad_time(a, pad) for a in (q, k, v, g, beta))
  q, k = _to_chunks(q, chunk), _to_chunks(k, chunk)  # [B,H,N,C,K]
  v = _to_group_chunks(v, h, chunk)  # [B,H,G,N,C,V]
  g, beta = (_to_group_chunks(a, h, chunk) for a in (g, beta))  # [B,H,G,N,C]

  inclusive = jnp.tril(jnp.ones((chunk, chunk), bool))
  strict = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
  if segment_ids is None:
    fresh = last = carry = None
  else:
    same, fresh, last, carry = segment_masks(segment_ids, tp, chunk)
    same = same[:, None, None]  # [B,1,1,N,C,C]
    inclusive, strict = inclusive & same, strict & same
    fresh, last, carry = fresh[:, None, None], last[:, None, None], carry[:, None, None]

  gamma = jnp.cumsum(g, axis=-1)  # [B,H,G,N,C]
  diff = gamma[..., :, None] - gamma[..., None, :]
  decay = jnp.where(inclusive, jnp.exp(jnp.where(inclusive, diff, 0.0)), 0.0)  # Γ
  e_gamma = jnp.exp(gamma)
  if fresh is not None:
    e_gamma = jnp.where(fresh, e_gamma, 0.0)  # tokens after a boundary never see S

  # Q Kᵀ and K Kᵀ once per q/k head, broadcast over the value-head group, as
  # one [2C, K] x [K, C] dot per chunk.
  qs = q * jnp.asarray(scale, q.dtype)
  qk_kk = _einsum("bhnik,bhnjk->bhnij", jnp.concatenate([qs, k], axis=-2), k, operand, acc)
  qk, kk = qk_kk[:, :, None, :, :chunk], qk_kk[:, :, None, :, chunk:]
  scores = qk * decay  # [B,H,G,N,C,C]
  a = jnp.where(strict, beta[..., :, None] * kk * decay, 0.0).astype(inv_dtype)
  with jax.default_matmul_precision("highest" if inv_dtype.itemsize >= 4 else "default"):
    inv = _linalg.unit_lower_inverse(a)  # [B,H,G,N,C,C]
  # With one value head per q/k head (G = 1), k carries a size-1 group axis
  # that is a batch dimension of every dot, so XLA inserts no transposes; with
  # G > 1 the group is a free dimension of the shared operand.
  k_shared = k[:, :, None] if grp == 1 else k

  def shared(spec: str, operand_index: int) -> str:
    """Drops the group label from the shared (k) operand when G > 1."""
    if grp == 1:
      return spec
    inputs, out = spec.split("->")
    parts = inputs.split(",")
    parts[operand_index] = parts[operand_index].replace("g", "")
    return ",".join(parts) + "->" + out

  # (I + A)⁻¹ diag(β) V and (I + A)⁻¹ diag(β e^γ) K, scaling the inverse's
  # columns instead of repeating k per value head.
  u = _einsum(
    "bhgnij,bhgnjv->bhgniv", inv * beta[..., None, :].astype(inv_dtype), v, inv_dtype, acc
  )
  w = _einsum(
    shared("bhgnij,bhgnjk->bhgnik", 1),
    inv * (beta * e_gamma)[..., None, :].astype(inv_dtype),
    k_shared,
    inv_dtype,
    acc,
  )
  decay_end = jnp.exp(gamma[..., -1])  # [B,H,G,N]
  write = jnp.exp(gamma[..., -1:] - gamma)  # [B,H,G,N,C]
  if segment_ids is not None:
    decay_end = jnp.where(carry, decay_end, 0.0)
    write = jnp.where(last, write, 0.0)  # only the last document is carried out
  if write_gate is not None:
    gate = jnp.moveaxis(write_gate.reshape(b, -1, h, grp), 1, 3)  # [B,H,G,N]
    write = write * gate[..., None].astype(write.dtype)

  # W and diag(e^γ)·scale·Q both multiply the chunk-start state: one [2C, K]
  # operand per chunk makes that one dot per scan step instead of two.
  q_state = jnp.broadcast_to(qs[:, :, None], w.shape) * e_gamma[..., None]
  wq = jnp.concatenate([w, q_state.astype(w.dtype)], axis=-2)  # [B,H,G,N,2C,K]

  def advance(state, inputs):
    k_n, wq_n, u_n, write_n, decay_n, scores_n = inputs
    ws_qs = _einsum("bhgck,bhgkv->bhgcv", wq_n, state, operand, acc)
    v_new = u_n - ws_qs[..., :chunk, :]
    o_n = ws_qs[..., chunk:, :] + _einsum("bhgij,bhgjv->bhgiv", scores_n, v_new, operand, acc)
    update = _einsum(shared("bhgck,bhgcv->bhgkv", 0), k_n, v_new * write_n[..., None], operand, acc)
    return decay_n[..., None, None] * state + update, o_n

  state0 = initial_state.reshape(b, h, grp, dk, dv)
  xs = (
    jnp.moveaxis(k_shared, -3, 0),
    *(jnp.moveaxis(x, 3, 0) for x in (wq, u, write, decay_end, scores)),
  )
  final, o = jax.lax.scan(advance, state0, xs)  # o [N,B,H,G,C,V]
  o = jnp.moveaxis(o, (0, 2, 3), (1, 3, 4)).reshape(b, tp, hv, dv)[:, :t]
  return o, final.reshape(b, hv, dk, dv)


def recurrent_step(
  state: jax.Array,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  g: jax.Array,
  beta: jax.Array,
  scale: float,
) -> tuple[jax.Array, jax.Array]:
  """One step of the rule, GVA-aware.

  state [B,HV,K,V]; q, k [B,H,K]; v [B,HV,V]; g, beta [B,HV]; HV = H·G.

  S ← e^g S;  u = β (v − Sᵀk);  S ← S + k uᵀ;  o = Sᵀ (scale · q).
  Returns (new state [B,HV,K,V], o [B,HV,V]) in the state's dtype.
  """
  b, hv, dk, dv = state.shape
  h = q.shape[1]
  s = state.reshape(b, h, hv // h, dk, dv) * jnp.exp(g).reshape(b, h, -1, 1, 1)
  prec = _linalg.matmul_precision(state.dtype)
  q, k = (a.astype(state.dtype) for a in (q, k))
  kv = jnp.einsum("bhgkv,bhk->bhgv", s, k, precision=prec)
  u = beta.reshape(b, h, -1, 1) * (v.reshape(b, h, -1, dv).astype(state.dtype) - kv)
  s = s + k[:, :, None, :, None] * u[..., None, :]
  o = jnp.einsum("bhgkv,bhk->bhgv", s, scale * q, precision=prec)
  return s.reshape(b, hv, dk, dv), o.reshape(b, hv, dv)
