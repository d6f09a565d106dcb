"""Block lists and tile math shared by the block-sparse softmax kernels (jnp only).

Both kernels tile the sequence by NAtS-L's own blocks (tile = block), so a
key tile has one type and one gate. For query block i the visible key blocks
are the attention-typed blocks j < i (weight = their gate) and i itself
(weight 1, causal inside). Hidden blocks are never visited: their logits are
not formed, their K/V are not loaded, and their gate gets no gradient, as in
the xla path, whose hidden entries are exp(−inf) = 0 before the gate
multiplies them.

The lists are built here in XLA, per (batch, head):

- `order`: block indices with the attention-typed ones first, ascending;
- `before[i]`: how many attention-typed blocks precede block i, so query
  block i visits order[0 .. before[i]) and then itself;
- a key block j is visited by query block j and, when attention-typed, by
  every later query block.

Packed documents (`document_lists`): documents start on block boundaries,
so each block lies in one document and a query block sees key block j only
if both lie in the same one. The attention-typed blocks of query block i's
document that precede it are a contiguous run of `order`, from
first[i] = before[its document's first block] to before[i]; and the query
blocks that see key block j end at end[j], one past its document's last
block when j is attention-typed (j + 1 when not).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attnlab.ops import _segments
from attnlab.ops.flash import _tile

MASK_VALUE = _tile.MASK_VALUE


def block_lists(gates: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[batch, heads, blocks] gates -> (order, before, visible), int32, same shape.

  A block is visible to later queries iff its gate is > 0.
  """
  visible = gates > 0
  n = gates.shape[-1]
  index = jnp.arange(n, dtype=jnp.int32)
  order = jnp.argsort(jnp.where(visible, index, n + index), axis=-1).astype(jnp.int32)
  count = visible.astype(jnp.int32)
  before = jnp.cumsum(count, axis=-1) - count
  return order, before, count


def block_documents(segment_ids: jax.Array, block: int) -> jax.Array:
  """[batch, time] ids of block-aligned documents -> [batch, blocks] int32 document index
  of each block (its first token's; documents must not start inside a block)."""
  return _segments.document_index(segment_ids)[:, ::block]


def document_lists(gates: jax.Array, docs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[batch, heads, blocks] gates, [batch, blocks] document indices -> (first, end), int32.

  Query block i visits order[first[i] .. before[i]) and then itself; key
  block j is visited by query blocks j .. end[j] − 1. Without documents
  these are 0 and (n where attention-typed, else j + 1).
  """
  _, before, visible = block_lists(gates)
  n = gates.shape[-1]
  index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), docs.shape)
  new = jnp.concatenate([jnp.ones_like(docs[:, :1], bool), docs[:, 1:] != docs[:, :-1]], axis=1)
  last = jnp.concatenate([new[:, 1:], jnp.ones_like(new[:, :1])], axis=1)
  doc_first = lax.cummax(jnp.where(new, index, 0), axis=1)  # [B, N]
  doc_end = lax.cummin(jnp.where(last, index + 1, n), axis=1, reverse=True)
  doc_first = jnp.broadcast_to(doc_first[:, None], before.shape)
  first = jnp.take_along_axis(before, doc_first, axis=-1)
  end = jnp.where(visible > 0, doc_end[:, None], index[:, None] + 1)
  return first.astype(jnp.int32), end.astype(jnp.int32)


def visited_tiles(gates: jax.Array, docs: jax.Array | None = None) -> dict[str, int]:
  """How many [block, block] tiles the kernels visit, against a dense causal kernel.

  Args:
    gates: [batch, num_blocks, heads] (the op's `block_visible`).
    docs: optional [batch, num_blocks] document index of each block
      (`block_documents`, packed rows).

  Returns:
    {'forward': tiles of the forward and dq passes, 'dkv': of the dk/dv pass,
     'dense_causal': tiles a causal flash kernel visits per pass}.
  """
  gates = jnp.moveaxis(gates, 2, 1)
  _, before, visible = block_lists(gates)
  b, h, n = visible.shape
  if docs is None:
    forward = int(jnp.sum(before + 1))
    later = jnp.arange(n - 1, -1, -1)  # query blocks after block j
    dkv = int(jnp.sum(1 + visible * later))
  else:
    first, end = document_lists(gates, docs)
    forward = int(jnp.sum(before - first + 1))
    dkv = int(jnp.sum(end - jnp.arange(n)))
  return {"forward": forward, "dkv": dkv, "dense_causal": b * h * n * (n + 1) // 2}


def online_softmax_step(s, weight, m_prev, l_prev, exp=jnp.exp):
  """One tile of the weighted online softmax.

  Args:
    s: [bq, bk] masked logits (MASK_VALUE where hidden); weight: scalar gate
      (1 for the own block), applied after the exponential as in the xla path.
    m_prev, l_prev: [bq, 1] running max and weighted sum.
    exp: jnp.exp, or jnp.exp2 for logits in log2 units.

  Returns:
    (e, m_next, l_next, correction): e [bq, bk] the weighted tile weights,
    correction [bq, 1] the factor of the running accumulators.
  """
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  e = jnp.where(s > MASK_VALUE, exp(s - m_next), 0.0) * weight
  correction = exp(m_prev - m_next)
  return e, m_next, correction * l_prev + jnp.sum(e, axis=1, keepdims=True), correction


def backward_step(u, mask, dp, delta, lse, weight, *, base2: bool = False):
  """Weights, logit cotangents and the gate's partial gradient of one tile.

  With e = exp(u − lse) (the un-gated probability), P = w·e and
  dP = dp − δ: dv uses P, the logits get ds = w·e·dP, and the gate gets
  Σ e·dP over the tile (zero-gated tiles are never visited).

  Returns:
    (P [bq, bk], ds [bq, bk], dgate [bq, bk] before summation).
  """
  e, de = _tile.backward_tile("softmax", u, mask, dp, delta, lse=lse, base2=base2)
  return e * weight, de * weight, de
