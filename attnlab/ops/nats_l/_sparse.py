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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def visited_tiles(gates: jax.Array) -> dict[str, int]:
  """How many [block, block] tiles the kernels visit, against a dense causal kernel.

  Args:
    gates: [batch, num_blocks, heads] (the op's `block_visible`).

  Returns:
    {'forward': tiles of the forward and dq passes, 'dkv': of the dk/dv pass,
     'dense_causal': tiles a causal flash kernel visits per pass}.
  """
  _, before, visible = block_lists(jnp.moveaxis(gates, 2, 1))
  b, h, n = visible.shape
  forward = int(jnp.sum(before + 1))
  later = jnp.arange(n - 1, -1, -1)  # query blocks after block j
  dkv = int(jnp.sum(1 + visible * later))
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
