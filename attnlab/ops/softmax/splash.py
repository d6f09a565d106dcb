"""Causal softmax attention (GQA, SSA logit_scale) on jax's splash attention (TPU).

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) is the
TPU flash kernel jax ships and MaxText runs at scale: row statistics kept in
a sublane layout, dk/dv formed without transposing computed tiles, masks
only on the tiles that need them, fully masked tiles skipped through
scalar-prefetched block lists. Until a TPU measurement shows attnlab's own
flash kernel (`pallas_tpu`) ahead, `implementation=None` picks this one on
TPU for softmax and for the variants that reduce to it (SSA's per-query
temperature folded into q; LUCID's softmax over V′).

Splash takes [heads, time, head_dim] and no logit scale. The batch is folded
into the heads: with H = G·Hkv, query head b·H + h meets kv head
b·Hkv + h // G, the same kv head as unfolded, so GQA survives (a vmapped call
fails in TPU interpret mode, which then could not test it). The scale and
SSA's per-query temperature are folded into q before the kernel (in q's
dtype, as the cuDNN path does), and T is zero-padded to the block size. Padded keys sit after every real query, so
the causal mask hides them; padded query rows are sliced off, so their
cotangent is zero and they add nothing to dk or dv.

Packed documents (`segment_ids`) go to splash's own `SegmentIds`, which are
per call, not per batch row, so the batch is not folded into the heads then:
one call per batch row, `jax.vmap` (one kernel with a batch grid axis) when
compiled for a TPU and `lax.map` in interpret mode, where a vmapped splash
call fails. Splash masks by id equality; it is given each token's document
start (`flash._common.document_starts`), which numbers the contiguous runs,
so ids reused by two separate runs still make two documents, as in every
other path. Splash skips only the tiles its static causal mask hides: a tile
that documents hide entirely is still computed (masked) there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from attnlab.ops import _dispatch, _dtypes
from attnlab.ops.flash import _common

LANE = 128
MAX_BLOCK = 512  # MaxText's splash defaults (sa_block_* = 512)


def _block(t: int) -> int:
  """The largest of 512, 256, 128 that divides t (t a multiple of 128)."""
  return next(b for b in (MAX_BLOCK, 256, LANE) if t % b == 0)


def block_sizes(t: int) -> splash.BlockSizes:
  """Splash's tile sizes for a (padded) sequence of t tokens: one size for
  forward, dq and dk/dv, compute tile = DMA tile."""
  b = _block(t)
  return splash.BlockSizes(
    block_q=b, block_kv=b, block_kv_compute=b,
    block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
    block_q_dq=b, block_kv_dq=b,
  )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _mask(heads: int, t: int) -> masks.MultiHeadMask:
  """The causal mask of every head (lazy: splash evaluates it per tile, in numpy)."""
  return masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(heads)])


def softmax_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float | None = None,
  logit_scale: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  blocks: splash.BlockSizes | None = None,
  interpret: bool | None = None,
) -> jax.Array:
  """See `attnlab.ops.softmax_attention`.

  Args:
    q: [batch, time, heads, head_dim]
    k: [batch, time, kv_heads, head_dim]; kv_heads divides heads.
    v: [batch, time, kv_heads, head_dim_v]
    logit_scale: optional [batch, time, heads] per-query temperature.
    segment_ids: optional [batch, time] integer document ids of packed rows
      (a query sees only earlier keys of its own document).
    blocks: splash tile sizes for the padded length (default `block_sizes`).
    interpret: None (interpret unless compiled for a TPU) or a bool.

  Returns:
    [batch, time, heads, head_dim_v] in q.dtype.
  """
  if jax.config.jax_enable_x64:
    raise ValueError(
      "splash attention does not run with jax_enable_x64 on (jax's kernel mixes int32 and "
      "int64 index arithmetic); use implementation='pallas_tpu' or 'xla'"
    )
  dtype = _dispatch.kernel_dtype("splash", q, k, v)
  if interpret is None:
    interpret = _dispatch.interpret_default("tpu", q, k, v)
  b, t, h, d = q.shape
  tp = -(-t // LANE) * LANE
  factor = jnp.float32(_dtypes.default_scale(d, scale))
  if logit_scale is not None:
    factor = factor * logit_scale.astype(jnp.float32)[..., None]
  qs = (q.astype(jnp.float32) * factor).astype(dtype)
  pad = lambda x: jnp.pad(x.astype(dtype), ((0, 0), (0, tp - t), (0, 0), (0, 0)))

  def heads_major(x):  # [B, T, H, D] -> [B·H, Tp, D]: splash's layout
    x = jnp.swapaxes(pad(x), 1, 2)
    return x.reshape(-1, *x.shape[2:])

  make = lambda heads: splash.make_splash_mha(
    _mask(heads, tp),
    block_sizes=blocks or block_sizes(tp),
    head_shards=1,
    q_seq_shards=1,
    interpret=pltpu.InterpretParams() if interpret else False,
  )
  if segment_ids is None:
    out = make(b * h)(heads_major(qs), heads_major(k), heads_major(v))  # [B·H, Tp, Dv]
    out = out.reshape(b, h, tp, v.shape[-1])
  else:
    kernel = make(h)
    starts = _common.padded_starts(segment_ids, tp)  # [B, Tp]: one id per document
    row = lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids))
    args = (*(jnp.swapaxes(pad(x), 1, 2) for x in (qs, k, v)), starts)  # [B, H, Tp, D], ...
    out = lax.map(lambda a: row(*a), args) if interpret else jax.vmap(row)(*args)
  return jnp.swapaxes(out, 1, 2)[:, :t].astype(q.dtype)
