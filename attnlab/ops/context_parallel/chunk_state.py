"""Context parallelism for the chunk-state family: the sequence split over a mesh axis.

Called inside `jax.shard_map` with the time axis of every input sharded over
`axis_name` (P shards, shard j holding tokens j·T/P .. (j+1)·T/P − 1). The
state recurrence of the gated delta rule,

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,

is affine in the state, so a shard's whole effect is one map
S_out = M_j S_in + B_j with M_j [K, K] and B_j [K, V] per head, whatever the
shard's length (linear attention and SOFT: M_j = I). Each shard

1. runs its tokens from a zero state: B_j, the final state;
2. runs them again with v = 0 from the identity: M_j (state [K, K]);
3. all-gathers the P maps (O(P·K·(K + V)) per head, independent of T) and
   folds the earlier shards' maps into its incoming state;
4. runs its tokens from that state: the outputs.

Three runs of the single-device op (two for linear attention) instead of one,
and one all-gather of the maps: the exchange does not grow with T. Autodiff
gives the backward (the all-gather's transpose is a reduce-scatter; the ops'
VJPs take the initial state's cotangent). Packed documents: a shard whose
first token starts a document receives a zero state, and a document start
inside a shard makes its M_j zero (the op's final state is then its last
document's alone).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops.gated_delta import api as gated_delta
from attnlab.ops.linear import api as linear
from attnlab.ops.nats_l import api as nats_l
from attnlab.ops.soft import api as soft


def _continues(segment_ids: jax.Array | None, axis_name: str, batch: int) -> jax.Array:
  """[batch] bool: this shard's first token continues the previous shard's last document."""
  if segment_ids is None:
    return jnp.ones((batch,), bool)
  edges = jax.lax.all_gather(segment_ids[:, [0, -1]], axis_name)  # [P, B, 2]
  j = jax.lax.axis_index(axis_name)
  previous_last = edges[jnp.maximum(j - 1, 0), :, 1]
  return (j > 0) & (segment_ids[:, 0] == previous_last)


def _incoming_state(
  transition: jax.Array, final: jax.Array, continues: jax.Array, axis_name: str
) -> jax.Array:
  """The state entering this shard from its maps' all-gather.

  transition [B, H, K, K], final [B, H, K, V] and continues [B] of this shard
  -> [B, H, K, V]: the earlier shards' maps folded in order from zero.
  """
  maps = jax.lax.all_gather((transition, final, continues), axis_name)
  j = jax.lax.axis_index(axis_name)

  def fold(state, shard):
    i, (m, b, keep) = shard
    entering = jnp.where(keep[:, None, None, None], state, 0)
    after = jnp.einsum("bhkl,bhlv->bhkv", m, entering) + b
    return jnp.where(i < j, after, state), None

  shards = jnp.arange(maps[0].shape[0])
  state, _ = jax.lax.scan(fold, jnp.zeros_like(final), (shards, maps))
  return jnp.where(continues[:, None, None, None], state, 0)


def gated_delta_rule(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  g: jax.Array,
  beta: jax.Array,
  *,
  axis_name: str,
  scale: float | None = None,
  chunk_size: int = 64,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """`ops.gated_delta_rule` on this shard's tokens of a sequence split over `axis_name`.

  Args: as `ops.gated_delta_rule` (q, k [B, t, H, K], v [B, t, HV, V], g, beta
  [B, t, HV], segment_ids [B, t]), each the local shard; call inside a
  shard_map over `axis_name`.

  Returns:
    o [B, t, HV, V]: this shard's rows of the unsplit op's output.
  """
  run = lambda v, state: gated_delta.gated_delta_rule(  # noqa: E731
    q, k, v, g, beta, scale=scale, initial_state=state, output_final_state=True,
    chunk_size=chunk_size, segment_ids=segment_ids, implementation=implementation,
  )  # fmt: skip
  return _through_affine_map(run, v, k.shape[-1], segment_ids, axis_name)


def block_gated_delta_rule(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  g: jax.Array,
  beta: jax.Array,
  block_write: jax.Array,
  *,
  axis_name: str,
  block_size: int = 64,
  scale: float | None = None,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """`ops.block_gated_delta_rule` (NAtS-L's delta path) on this shard's tokens of a
  sequence split over `axis_name`; each shard holds whole blocks (block_write
  [B, t / block_size, H] its own). Returns o [B, t, H, V]."""
  if q.shape[1] % block_size:
    raise ValueError(
      f"block_gated_delta_rule: a shard's {q.shape[1]} tokens must be whole blocks of {block_size}"
    )
  run = lambda v, state: nats_l.block_gated_delta_rule(  # noqa: E731
    q, k, v, g, beta, block_write, block_size=block_size, scale=scale, initial_state=state,
    return_final_state=True, segment_ids=segment_ids, implementation=implementation,
  )  # fmt: skip
  return _through_affine_map(run, v, k.shape[-1], segment_ids, axis_name)


def _through_affine_map(run, v, key_dim, segment_ids, axis_name):
  """Steps 1-4 of the module docstring for a delta-rule op `run(v, initial_state)`
  -> (o, final state): v [B, t, HV, V], states [B, HV, key_dim, V]."""
  b, _, hv, _ = v.shape
  _, final = run(v, None)
  eye = jnp.broadcast_to(jnp.eye(key_dim, dtype=final.dtype), (b, hv, key_dim, key_dim))
  _, transition = run(jnp.zeros((*v.shape[:3], key_dim), v.dtype), eye)
  continues = _continues(segment_ids, axis_name, b)
  state = _incoming_state(transition, final, continues, axis_name)
  return run(v, state)[0]


def linear_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  axis_name: str,
  normalize: bool = False,
  scale: float | None = None,
  chunk_size: int = 64,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """`ops.linear_attention` on this shard's tokens of a sequence split over `axis_name`.

  The state passes unchanged through a shard (M_j = I) unless a document
  starts inside it (M_j = 0); with `normalize` the key sum travels with it.
  Returns o [B, t, H, V], this shard's rows of the unsplit op's output.
  """
  run = lambda state: linear.linear_attention(  # noqa: E731
    q, k, v, normalize=normalize, scale=scale, initial_state=state, output_final_state=True,
    chunk_size=chunk_size, segment_ids=segment_ids, implementation=implementation,
  )  # fmt: skip
  _, final = run(None)
  kv, k_sum = final if normalize else (final, None)
  # The key sum is one more value column of the same identity-or-zero map.
  packed = kv if k_sum is None else jnp.concatenate([kv, k_sum[..., None]], axis=-1)
  state = _passed_through(packed, segment_ids, axis_name)
  if normalize:
    state = (state[..., :-1], state[..., -1])
  return run(state)[0]


def soft_attention(
  q: jax.Array,
  v: jax.Array,
  landmarks: jax.Array,
  *,
  axis_name: str,
  segment_ids: jax.Array | None = None,
  **options,
) -> jax.Array:
  """`ops.soft_attention` (causal) on this shard's tokens of a sequence split over
  `axis_name`: its state [B, H, m, dv (+1)] over the m landmarks passes unchanged
  through a shard, like linear attention's. `options` as `ops.soft_attention`'s.
  Returns o [B, t, H, dv], this shard's rows of the unsplit op's output."""
  run = lambda state: soft.soft_attention(  # noqa: E731
    q, v, landmarks, initial_state=state, output_final_state=True, segment_ids=segment_ids,
    **options,
  )  # fmt: skip
  _, final = run(None)
  return run(_passed_through(final, segment_ids, axis_name))[0]


def _passed_through(final: jax.Array, segment_ids: jax.Array | None, axis_name: str) -> jax.Array:
  """The incoming state [B, H, N, V] of a state that no token changes but by adding
  (M_j = I; 0 where a document starts inside shard j), from this shard's final
  state from zero."""
  b, h, n, _ = final.shape
  if segment_ids is None:
    inside = jnp.zeros((b,), bool)
  else:  # a document starts inside the shard: nothing before it reaches the end
    inside = jnp.any(segment_ids[:, 1:] != segment_ids[:, :-1], axis=1)
  keep = jnp.where(inside, 0.0, 1.0).astype(final.dtype)[:, None, None, None]
  transition = keep * jnp.broadcast_to(jnp.eye(n, dtype=final.dtype), (b, h, n, n))
  continues = _continues(segment_ids, axis_name, b)
  return _incoming_state(transition, final, continues, axis_name)
