"""Packed documents (`segment_ids`): the rules every op shares (jax only).

A row of `segment_ids` [batch, time] names each token's document; a new
document starts wherever the id differs from the previous token's (ids need
not be sorted: padding after the last document may be id 0). Every op keeps
documents apart the same way:

- a query sees a key only if both lie in one document (and the key is not
  later);
- position-dependent quantities (RoPE angles, SSA's and softplus attention's
  log-position factors) use the token's position within its document, so a
  packed document computes exactly what it computes alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check(segment_ids: jax.Array | None, batch_time: tuple[int, int], op: str) -> None:
  """ValueError unless segment_ids is None or an integer [batch, time] array."""
  if segment_ids is None:
    return
  if tuple(segment_ids.shape) != tuple(batch_time) or not jnp.issubdtype(
    segment_ids.dtype, jnp.integer
  ):
    raise ValueError(
      f"{op}: segment_ids must be integer [batch, time] = {tuple(batch_time)}, "
      f"got {segment_ids.dtype}{tuple(segment_ids.shape)}"
    )


def starts(segment_ids: jax.Array) -> jax.Array:
  """[B, T] bool: the token starts a document (the row's first token always does)."""
  b = segment_ids.shape[0]
  return jnp.concatenate(
    [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )


def document_starts(segment_ids: jax.Array) -> jax.Array:
  """[B, T] int32 index of the first token of each token's document."""
  t = segment_ids.shape[1]
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  return jax.lax.cummax(jnp.where(starts(segment_ids), index, 0), axis=1)


def positions(segment_ids: jax.Array) -> jax.Array:
  """[B, T] int32 0-based position of each token within its document."""
  return jnp.arange(segment_ids.shape[1], dtype=jnp.int32) - document_starts(segment_ids)


def document_index(segment_ids: jax.Array) -> jax.Array:
  """[B, T] int32 running count of document starts (0 for the row's first
  document): equal ids mark one contiguous document even where raw ids repeat."""
  return jnp.cumsum(starts(segment_ids).astype(jnp.int32), axis=1) - 1


def same_document(query_docs: jax.Array, key_docs: jax.Array) -> jax.Array:
  """[B, Tq], [B, Tk] document indices -> [B, Tq, Tk] bool."""
  return query_docs[:, :, None] == key_docs[:, None, :]


def query_documents(
  segment_ids: jax.Array, first: jax.Array, count: int
) -> tuple[jax.Array, jax.Array]:
  """The document numbers (`document_index`) of rows first .. first+count-1 of a
  cache's segment_ids [B, S] (`first` may be traced), and of all S rows:
  ([B, count], [B, S])."""
  docs = document_index(segment_ids)
  return jax.lax.dynamic_slice_in_dim(docs, first, count, axis=1), docs


def visible_in_cache(
  visible: jax.Array, segment_ids: jax.Array, first: jax.Array, count: int
) -> jax.Array:
  """Causal visibility [Tq, S] of queries at cache rows first .. first+Tq-1, narrowed
  to their own documents by the cache's segment_ids [B, S]: [B, Tq, S]."""
  query_docs, docs = query_documents(segment_ids, first, count)
  return visible[None] & same_document(query_docs, docs)
