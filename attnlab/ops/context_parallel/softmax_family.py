"""Context parallelism for the softmax family: all-gather K and V, attend with local queries.

Called inside `jax.shard_map` with the time axis sharded over `axis_name`
(shard j holds tokens j·t .. (j+1)·t − 1). Each shard gathers every shard's
keys and values (and document ids) and runs its own query rows against them
as a prefill chunk against a cache of length (j+1)·t, so the position
factors (SSA's temperature scale arrives with the queries; LSSA/LSSAR's
log i, i and O_i) see absolute positions and the causal mask needs no other
offset. All-gather rather than a ring: the gathered K/V of one layer is
2·T·Hkv·D values per sequence, which fits next to the activations at the
lengths this serves, it needs one collective instead of P − 1 dependent
steps, and softplus attention's row normaliser (a sum, and for LSSAR a row
maximum before the power) would otherwise need its own merge rule. The
backward is autodiff's: the all-gather's transpose is a reduce-scatter of
dK and dV. Not load-balanced: the last shard's queries see all T keys, the
first shard's t of them.

LUCID's V′ = L⁻¹V couples every token with all earlier ones: here each shard
solves the whole gathered sequence (the single-device op, O(T²·D) work per
shard, the same on every shard) and keeps its rows; a pipelined solve across
shards is not built yet.
"""

from __future__ import annotations

import jax

from attnlab.ops.lucid import api as lucid
from attnlab.ops.softmax import api as softmax
from attnlab.ops.softplus import api as softplus


def _gathered(k, v, segment_ids, axis_name):
  """Every shard's k, v [B, T, Hkv, *] and segment_ids [B, T] (or None), in order."""
  gather = lambda a: jax.lax.all_gather(a, axis_name, axis=1, tiled=True)  # noqa: E731
  return gather(k), gather(v), None if segment_ids is None else gather(segment_ids)


def softmax_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  axis_name: str,
  scale: float | None = None,
  logit_scale: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """`ops.softmax_attention` on this shard's rows of a sequence split over `axis_name`.

  Args: as `ops.softmax_attention` (q [B, t, H, D], k, v [B, t, Hkv, *],
  logit_scale [B, t, H], segment_ids [B, t]), each the local shard.

  Returns:
    [B, t, H, Dv]: this shard's rows of the unsplit op's output.
  """
  keys, values, ids = _gathered(k, v, segment_ids, axis_name)
  end = (jax.lax.axis_index(axis_name) + 1) * q.shape[1]
  return softmax.softmax_attention_cached(
    q, keys, values, end, scale=scale, logit_scale=logit_scale, segment_ids=ids,
    implementation=implementation,
  )  # fmt: skip


def softplus_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  axis_name: str,
  power: float | None = None,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """`ops.softplus_attention` (LSSA, or LSSAR with `power`) on this shard's rows of a
  sequence split over `axis_name`; shapes as `softmax_attention` here."""
  keys, values, ids = _gathered(k, v, segment_ids, axis_name)
  end = (jax.lax.axis_index(axis_name) + 1) * q.shape[1]
  return softplus.softplus_attention_cached(
    q, keys, values, end, power=power, segment_ids=ids, implementation=implementation
  )


def lucid_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  axis_name: str,
  scale: float | None = None,
  eps: float = 1e-5,
  block_size: int = 64,
  segment_ids: jax.Array | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """`ops.lucid_attention` on this shard's rows of a sequence split over `axis_name`;
  shapes as `softmax_attention` here. V′ is solved over the whole gathered
  sequence on every shard (see the module docstring)."""
  keys, values, ids = _gathered(k, v, segment_ids, axis_name)
  v_prime = lucid.lucid_values(
    keys, values, eps=eps, block_size=block_size, segment_ids=ids, implementation=implementation
  )
  end = (jax.lax.axis_index(axis_name) + 1) * q.shape[1]
  return softmax.softmax_attention_cached(
    q, keys, v_prime.astype(v.dtype), end, scale=scale, segment_ids=ids,
    implementation=implementation,
  )  # fmt: skip
