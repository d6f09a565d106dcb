"""Packed documents (`segment_ids`) in every op's xla and reference paths.

The oracle is the op itself run on each document alone: a packed row must give
every document exactly what it gets by itself (values and every gradient), in
float64 so that the only differences are summation order. The Pallas kernels
are checked the same way in `test_ops_flash_segments.py`; the gated delta rule
and linear attention in `test_ops_delta.py`.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from attnlab.ops import _segments

from .conftest import assert_same_values_and_grads

# Rows of documents (lengths), T = 24: uneven documents, one whole-row document,
# and a row ending in padding (id 0, its own document).
ROWS = ((7, 13, 4), (24,), (10, 9, 5))


def _segment_ids(rows=ROWS) -> np.ndarray:
  seg = np.zeros((len(rows), sum(rows[0])), np.int32)
  for b, lengths in enumerate(rows):
    ids = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    if b == len(rows) - 1:
      ids[-lengths[-1] :] = 0  # trailing padding
    seg[b] = ids
  return seg


def _bounds(rows=None):
  for b, lengths in enumerate(rows or ROWS):
    edges = np.cumsum((0, *lengths))
    for start, end in zip(edges[:-1], edges[1:]):
      yield b, int(start), int(end)


def _per_document(fn, *arrays):
  """fn on each document alone ([1, len, ...] slices), reassembled as [B, T, ...]."""
  out = [[None] * len(ROWS[b]) for b in range(len(ROWS))]
  for i, (b, s, e) in enumerate(_bounds()):
    out[b][sum(1 for bb, _, _ in list(_bounds())[:i] if bb == b)] = fn(
      *(a[b : b + 1, s:e] for a in arrays)
    )
  return jnp.concatenate([jnp.concatenate(r, axis=1) for r in out], axis=0)


def _inputs(h=4, hkv=2, d=8, dv=8, seed=0):
  rng = np.random.default_rng(seed)
  b, t = len(ROWS), sum(ROWS[0])
  q = rng.normal(size=(b, t, h, d))
  k = rng.normal(size=(b, t, hkv, d))
  v = rng.normal(size=(b, t, hkv, dv))
  cot = rng.normal(size=(b, t, h, dv))
  return [jnp.asarray(a, jnp.result_type(float)) for a in (q, k, v, cot)]


def _check_against_documents(packed, alone, arrays, cot, *, atol=1e-10):
  """Values and gradients (w.r.t. every array) of packed(*arrays) == alone per document."""
  separate = lambda *a: _per_document(alone, *a)
  argnums = tuple(range(len(arrays)))
  # One compiled program each for values and gradients (eager runs of the
  # oracles' per-row scans would dominate the test's time).
  run = lambda f: jax.jit(jax.value_and_grad(lambda *a: (jnp.sum(f(*a) * cot), f(*a)),
                                             argnums, has_aux=True))  # fmt: skip
  (_, out_p), grads_p = run(packed)(*arrays)
  (_, out_a), grads_a = run(separate)(*arrays)
  np.testing.assert_allclose(out_p, out_a, atol=atol, rtol=atol)
  for i, (gp, ga) in enumerate(zip(grads_p, grads_a)):
    np.testing.assert_allclose(gp, ga, atol=atol, rtol=atol, err_msg=f"gradient {i}")
  # Not trivially equal: without segment ids the documents do mix.
  assert float(jnp.max(jnp.abs(jax.jit(alone)(*arrays) - out_a))) > 1e-3


def test_positions_and_document_index():
  seg = jnp.asarray([[3, 3, 5, 5, 5, 3, 0]])
  np.testing.assert_array_equal(_segments.positions(seg), [[0, 1, 0, 1, 2, 0, 0]])
  # A repeated id after another document is a new document.
  np.testing.assert_array_equal(_segments.document_index(seg), [[0, 0, 1, 1, 1, 2, 3]])


@pytest.mark.parametrize("with_scale", [False, True])
def test_softmax_segments(x64, with_scale):
  impl = "xla"
  q, k, v, cot = _inputs()
  seg = jnp.asarray(_segment_ids())
  rng = np.random.default_rng(3)
  ls = jnp.asarray(rng.uniform(0.5, 2.0, q.shape[:3]), jnp.float64)
  if with_scale:  # SSA: a per-query temperature
    arrays = (q, k, v, ls)
    packed = lambda q, k, v, ls: ops.softmax_attention(
      q, k, v, logit_scale=ls, segment_ids=seg, implementation=impl
    )
    # The oracle gets the segment ids of the slice: one document.
    alone = lambda q, k, v, ls: ops.softmax_attention(q, k, v, logit_scale=ls, implementation=impl)
  else:
    arrays = (q, k, v)
    packed = lambda q, k, v: ops.softmax_attention(q, k, v, segment_ids=seg, implementation=impl)
    alone = lambda q, k, v: ops.softmax_attention(q, k, v, implementation=impl)
  _check_against_documents(packed, alone, arrays, cot)


@pytest.mark.parametrize("power", [None, 3.0, 15.0])
def test_softplus_segments(x64, power):
  impl = "xla"
  q, k, v, cot = _inputs()
  seg = jnp.asarray(_segment_ids())
  packed = lambda q, k, v: ops.softplus_attention(
    q, k, v, power=power, segment_ids=seg, implementation=impl
  )
  alone = lambda q, k, v: ops.softplus_attention(q, k, v, power=power, implementation=impl)
  _check_against_documents(packed, alone, (q, k, v), cot)


def test_lucid_values_segments(x64):
  impl = "xla"
  _, k, v, _ = _inputs()
  cot = jnp.asarray(np.random.default_rng(4).normal(size=v.shape))
  seg = jnp.asarray(_segment_ids())
  # Block 8 against documents of 7, 13, 4 tokens: boundaries inside blocks.
  packed = lambda k, v: ops.lucid_values(k, v, block_size=8, segment_ids=seg, implementation=impl)
  alone = lambda k, v: ops.lucid_values(k, v, block_size=8, implementation=impl)
  _check_against_documents(packed, alone, (k, v), cot)


def test_lucid_attention_segments(x64):
  q, k, v, cot = _inputs()
  seg = jnp.asarray(_segment_ids())
  packed = lambda q, k, v: ops.lucid_attention(
    q, k, v, block_size=8, segment_ids=seg, implementation="xla"
  )
  alone = lambda q, k, v: ops.lucid_attention(q, k, v, block_size=8, implementation="xla")
  _check_against_documents(packed, alone, (q, k, v), cot)


def test_segment_ids_must_be_integer_batch_time():
  q, k, v, _ = (a.astype(jnp.float32) for a in _inputs())
  with pytest.raises(ValueError, match="segment_ids must be integer"):
    ops.softmax_attention(q, k, v, segment_ids=jnp.zeros((3, 5), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids must be integer"):
    ops.softplus_attention(q, k, v, segment_ids=jnp.zeros(q.shape[:2], jnp.float32))


@pytest.mark.slow
def test_soft_segments(x64):
  impl = "xla"
  q, _, _, cot = _inputs(h=2, hkv=2)
  v = jnp.asarray(np.random.default_rng(5).normal(size=q.shape))
  landmarks = jnp.asarray(np.random.default_rng(6).normal(size=(2, 4, q.shape[-1])))
  seg = jnp.asarray(_segment_ids())
  cot = cot[:, :, :2]
  kw = dict(newton_iters=30, chunk_size=8, implementation=impl)
  packed = lambda q, v, lm: ops.soft_attention(q, v, lm, segment_ids=seg, **kw)[0]
  alone = lambda q, v, lm: ops.soft_attention(q, v, lm, **kw)[0]
  _check_against_documents(
    lambda q, v: packed(q, v, landmarks), lambda q, v: alone(q, v, landmarks), (q, v), cot
  )
  # The landmarks are shared: their gradient is the sum over the documents' runs.
  grad = lambda f: jax.jit(jax.grad(lambda lm: jnp.sum(f(lm) * cot)))(landmarks)
  total = grad(lambda lm: _per_document(lambda q, v: alone(q, v, lm), q, v))
  np.testing.assert_allclose(grad(lambda lm: packed(q, v, lm)), total, atol=1e-10, rtol=1e-10)


@pytest.mark.slow
def test_reference_oracles_take_segments(x64):
  """The per-row oracles mask documents by their raw ids, independently of the
  xla paths' document indices; packed, they agree with the xla paths (which the
  tests above hold to per-document runs). Values only: the oracles' unrolled rows
  are slow to differentiate."""
  q, k, v, _ = _inputs(h=2, hkv=1)
  seg = jnp.asarray(_segment_ids())
  pairs = [
    lambda impl: ops.softmax_attention(q, k, v, segment_ids=seg, implementation=impl),
    lambda impl: ops.softplus_attention(q, k, v, power=15.0, segment_ids=seg, implementation=impl),
    lambda impl: ops.lucid_values(k, v, block_size=8, segment_ids=seg, implementation=impl),
  ]
  for run in pairs:
    np.testing.assert_allclose(run("reference"), run("xla"), atol=1e-10, rtol=1e-10)
  landmarks = jnp.asarray(np.random.default_rng(6).normal(size=(2, 4, q.shape[-1])))
  soft = lambda impl: ops.soft_attention(
    q, q, landmarks, newton_iters=40, segment_ids=seg, chunk_size=8, implementation=impl
  )[0]
  # The xla path inverts A by Newton iterations, the oracle directly.
  np.testing.assert_allclose(soft("reference"), soft("xla"), atol=1e-7, rtol=1e-6)


# NAtS-L's packed rows start every document on a block boundary (block 4 here).
ALIGNED = ((8, 12, 4), (24,), (12, 8, 4))


def _nats_inputs(seed=7):
  rng = np.random.default_rng(seed)
  b, t, h, d = len(ALIGNED), 24, 2, 8
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  q, k = unit(rng.normal(size=(b, t, h, d))), unit(rng.normal(size=(b, t, h, d)))
  v = rng.normal(size=(b, t, h, d))
  g = -rng.uniform(0.05, 0.5, (b, t, h))
  beta = rng.uniform(0.2, 0.9, (b, t, h))
  # Block gates, repeated over each block's tokens so they slice with the documents.
  gates = np.repeat(rng.integers(0, 2, (b, t // 4, h)).astype(float), 4, axis=1)
  return [jnp.asarray(a, jnp.float64) for a in (q, k, v, g, beta, gates)]


@pytest.fixture
def aligned_rows(monkeypatch):
  monkeypatch.setattr(sys.modules[__name__], "ROWS", ALIGNED)
  return jnp.asarray(_segment_ids(ALIGNED))


def test_nats_l_delta_segments(x64, aligned_rows):
  q, k, v, g, beta, gates = _nats_inputs()
  cot = jnp.asarray(np.random.default_rng(8).normal(size=v.shape))
  run = lambda seg: (
    lambda q, k, v, g, beta, gates: ops.block_gated_delta_rule(
      q, k, v, g, beta, gates[:, ::4], block_size=4, segment_ids=seg, implementation="xla"
    )
  )
  _check_against_documents(run(aligned_rows), run(None), (q, k, v, g, beta, gates), cot)
  # The oracle recurrence restarts its states at the same places.
  args = (q, k, v, g, beta, gates[:, ::4])
  np.testing.assert_allclose(
    ops.block_gated_delta_rule(*args, block_size=4, segment_ids=aligned_rows,
                               implementation="reference"),
    run(aligned_rows)(q, k, v, g, beta, gates), atol=1e-10, rtol=1e-10,
  )  # fmt: skip


def test_nats_l_sparse_softmax_segments(x64, aligned_rows):
  q, k, v, _, _, gates = _nats_inputs()
  cot = jnp.asarray(np.random.default_rng(9).normal(size=v.shape))
  run = lambda seg: (
    lambda q, k, v, gates: ops.block_sparse_softmax(
      q, k, v, gates[:, ::4], block_size=4, segment_ids=seg, implementation="xla"
    )
  )
  _check_against_documents(run(aligned_rows), run(None), (q, k, v, gates), cot)
  np.testing.assert_allclose(
    ops.block_sparse_softmax(q, k, v, gates[:, ::4], block_size=4, segment_ids=aligned_rows,
                             implementation="reference"),
    run(aligned_rows)(q, k, v, gates), atol=1e-10, rtol=1e-10,
  )  # fmt: skip


@pytest.mark.parametrize(
  "impl,op",
  # The softmax oracle unrolls every (query, head) pair: 30 s of compiling each, and
  # the segment rule it applies over a cache is the one it applies to the full op.
  [("xla", op) for op in ("softmax", "ssa", "lssa", "lssar15", "lucid_values")]
  + [("reference", op) for op in ("lssa", "lssar15", "lucid_values")],
)
def test_cached_ops_with_segments_equal_the_full_packed_op(x64, impl, op):
  """A prefill chunk against a cache of a packed row (segment_ids over the cache rows,
  the chunk's own included, padding rows after them): values and gradients equal the
  full packed op's rows for the chunk. The chunk starts inside a document (row 0: it
  continues one, then begins two), on a boundary (row 2) and inside the one-document
  row 1."""
  q, k, v, cot = _inputs()
  seg = jnp.asarray(_segment_ids())
  t, start, extra = q.shape[1], 5, 3  # chunk = rows 5..23; 3 unused cache rows after it
  junk = np.random.default_rng(5)  # the unused rows hold junk, never zeros only
  pad = lambda a: jnp.concatenate(
    [a, jnp.asarray(junk.normal(size=(a.shape[0], extra, *a.shape[2:])), a.dtype)], 1
  )
  cache_seg = jnp.pad(seg, ((0, 0), (0, extra)), constant_values=7)
  ls = jnp.asarray(np.random.default_rng(3).uniform(0.5, 2.0, q.shape[:3]))
  power = {"lssa": None, "lssar15": 15.0}.get(op)
  if op == "lucid_values":
    arrays, cot = (k, v), cot[:, start:, : k.shape[2]]

    def full(k, v):
      return ops.lucid_values(k, v, block_size=4, segment_ids=seg, implementation=impl)[:, start:]

    def cached(k, v):  # the prefix's V′ (the packed solve) is the cache's context
      prefix = ops.lucid_values(
        k[:, :start], v[:, :start], block_size=4, segment_ids=seg[:, :start], implementation=impl
      )
      context_values = pad(jnp.concatenate([prefix, jnp.zeros_like(v[:, start:])], 1))
      return ops.lucid_values(
        k[:, start:], v[:, start:], block_size=4, context_keys=pad(k),
        context_values=context_values, context_length=start, segment_ids=cache_seg,
        implementation=impl,
      )  # fmt: skip
  else:
    arrays, cot = (q, k, v), cot[:, start:]
    if op in ("softmax", "ssa"):
      scale = ls if op == "ssa" else None
      full = lambda q, k, v: ops.softmax_attention(
        q, k, v, logit_scale=scale, segment_ids=seg, implementation=impl
      )[:, start:]
      cached = lambda q, k, v: ops.softmax_attention_cached(
        q[:, start:], pad(k), pad(v), t, segment_ids=cache_seg, implementation=impl,
        logit_scale=None if scale is None else scale[:, start:],
      )  # fmt: skip
    else:
      full = lambda q, k, v: ops.softplus_attention(
        q, k, v, power=power, segment_ids=seg, implementation=impl
      )[:, start:]
      cached = lambda q, k, v: ops.softplus_attention_cached(
        q[:, start:], pad(k), pad(v), t, power=power, segment_ids=cache_seg,
        implementation=impl,
      )  # fmt: skip
  assert_same_values_and_grads(cached, full, arrays, cot)
