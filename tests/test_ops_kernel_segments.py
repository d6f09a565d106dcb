"""Packed documents (`segment_ids`) in LUCID's solve kernels and NAtS-L's
block-sparse softmax kernels.

The oracle is each op's xla path with the same segment ids (held to running
the documents one by one in `tests/test_ops_segments.py`). The kernels run in
interpret mode on this CPU (TPU interpret mode, Pallas interpret mode), in
float32, values and every gradient:

* LUCID, `lucid_values` (k, v): T = 40 in blocks of 16 (a padded last
  block), documents starting inside blocks (one of a single token), a row of
  one document and a row ending in padding (id 0), so that tiles are partly
  masked and whole blocks are skipped in the forward and the transposed solve.
* NAtS-L, `block_sparse_softmax` (q, k, v and the gates): documents on block
  boundaries of 16 (the op's contract), random 0/1 gates; T = 64 and a ragged
  T = 56.

The skipping rules are checked against brute force on random layouts (no
kernel runs there); one document must give exactly what no segment ids give;
and the kernels with segments compile for a TPU (libtpu, compile-only) and
lower for CUDA (Triton).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from attnlab.ops import _segments
from attnlab.ops.lucid import _solve
from attnlab.ops.nats_l import _sparse
from attnlab.ops.nats_l import xla as nats_xla
from tests.conftest import compile_for_tpu, lower_for_cuda

# Relative to the largest xla entry: float32 on both sides, differing by
# summation order (as tests/test_ops_lucid_nats_l_pallas.py).
TOL, GRAD_TOL = 2e-5, 1e-4

# LUCID rows of (id, length) at T = 40, blocks of 16 (padded to 48): row 0 has
# boundaries at 5, 19, 20 and 33 (all inside blocks; a one-token document);
# row 2's last block starts inside a document that begins at 20, so block 0 is
# skipped there in both directions.
LUCID_ROWS = [[(3, 5), (7, 14), (8, 1), (1, 13), (4, 7)], [(5, 40)], [(2, 20), (6, 13), (0, 7)]]
# NAtS-L rows at T = 64, blocks of 16 (documents on block boundaries); ragged
# T = 56 drops the last 8 tokens of every row.
NATS_ROWS = [[(3, 32), (7, 16), (8, 16)], [(5, 64)], [(1, 16), (0, 48)]]


def _ids(rows, t: int) -> jax.Array:
  return jnp.asarray(
    np.stack([np.concatenate([np.full(n, i) for i, n in row])[:t] for row in rows]), jnp.int32
  )


def _close(got, want, tol, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)), what
  scale = max(float(np.max(np.abs(want))), 1e-30)
  err = float(np.max(np.abs(got - want))) / scale
  assert err <= tol, f"{what}: max error {err:.2e} of max |ref| {scale:.2e} > {tol:.0e}"
  return err


def _value_and_vjp(fn, args, cot):
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(cot)


def _compare(kernel, xla, layouts, args, cot, names):
  """kernel(segment_ids) against xla(segment_ids) for each layout (one compile each)."""
  got = jax.jit(lambda seg, *a: _value_and_vjp(kernel(seg), a, cot))
  want = jax.jit(lambda seg, *a: _value_and_vjp(xla(seg), a, cot))
  for label, seg in layouts.items():
    g, w = got(seg, *args), want(seg, *args)
    _close(g[0], w[0], TOL, f"{label}: output")
    for name, gv, wv in zip(names, g[1], w[1], strict=True):
      _close(gv, wv, GRAD_TOL, f"{label}: d{name}")


def _random_rows(rng, t: int, align: int = 1) -> np.ndarray:
  """[4, t] ids of random layouts: documents of random lengths (multiples of `align`),
  raw ids repeating, sometimes trailing padding of id 0."""
  rows = []
  for _ in range(4):
    ids, pos, doc = np.zeros(t, np.int32), 0, 0
    while pos < t:
      n = align * int(rng.integers(1, max(2, 12 // align + 1)))
      doc = doc % 3 + 1  # raw ids repeat: only changes start documents
      ids[pos : pos + n] = doc
      pos += n
    if rng.random() < 0.5:
      ids[t - align * int(rng.integers(1, 3)) :] = 0
    rows.append(ids)
  return np.stack(rows)


# --- the skipping rules, brute force ------------------------------------------------------


def test_lucid_document_blocks_skip_exactly_the_empty_tiles():
  """`document_blocks`: ends, and the first / stop blocks against the nonzero tiles of
  the document mask (any layout, padded to whole blocks)."""
  rng = np.random.default_rng(0)

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def lists(seg, tp, block):
    blocks = _solve.document_blocks(seg, tp, block)
    padded = jnp.pad(_segments.document_index(seg), ((0, 0), (0, tp - seg.shape[1])), mode="edge")
    return (*blocks, padded)

  for t, block in ((37, 8), (37, 16), (5, 8)):
    n = -(-t // block)
    tp = n * block
    ends, first, stop, padded = map(np.asarray, lists(jnp.asarray(_random_rows(rng, t)), tp, block))
    for b in range(padded.shape[0]):
      docs = padded[b]
      np.testing.assert_array_equal(ends[b], [np.max(np.nonzero(docs == d)[0]) + 1 for d in docs])
      same = (docs[:, None] == docs[None, :]) & np.tri(tp, k=-1, dtype=bool)
      tiles = same.reshape(n, block, n, block).any(axis=(1, 3))  # [row block, col block]
      for i in range(n):
        earlier = [j for j in range(i) if tiles[i, j]]
        later = [j for j in range(i + 1, n) if tiles[j, i]]
        # the loops run over [first, i) and (i, stop): no nonzero tile left out, none extra
        assert earlier == list(range(first[b, i], i)), (t, b, i)
        assert later == list(range(i + 1, stop[b, i])), (t, b, i)
        assert first[b, i] <= i < stop[b, i] <= n


def test_nats_document_lists_visit_exactly_the_tiles_with_visible_keys():
  rng = np.random.default_rng(1)
  b, n, h, block = 4, 9, 3, 4
  t = n * block
  seg = jnp.asarray(_random_rows(rng, t, align=block))
  gates = jnp.asarray(rng.choice([0.0, 1.0, 0.5], size=(b, n, h)), jnp.float32)

  @jax.jit
  def lists(seg, gates):
    weights = nats_xla.block_key_weights(gates, t, block)  # [B, H, Tq, Tk]
    docs = _segments.document_index(seg)
    weights = jnp.where(_segments.same_document(docs, docs)[:, None], weights, 0.0)
    lanes = jnp.moveaxis(gates, 2, 1)
    blocks = _sparse.block_documents(seg, block)
    order, before, _ = _sparse.block_lists(lanes)
    return (weights, blocks, order, before, *_sparse.document_lists(lanes, blocks))

  weights, docs, order, before, first, end = map(np.asarray, lists(seg, gates))
  dense = weights.reshape(b, h, n, block, n, block).max(axis=(3, 5)) > 0
  rows, cols = np.zeros_like(dense), np.zeros_like(dense)
  for bi in range(b):
    for hi in range(h):
      for i in range(n):  # forward / dq: order[first[i] .. before[i]), then i
        rows[bi, hi, i, list(order[bi, hi, first[bi, hi, i] : before[bi, hi, i]]) + [i]] = True
      for j in range(n):  # dk/dv: query blocks j .. end[j] - 1
        cols[bi, hi, range(j, end[bi, hi, j]), j] = True
  np.testing.assert_array_equal(rows, dense)
  np.testing.assert_array_equal(cols, dense)
  tiles = _sparse.visited_tiles(gates, jnp.asarray(docs))
  assert tiles["forward"] == tiles["dkv"] == int(dense.sum())
  # One document visits what no documents do.
  assert _sparse.visited_tiles(gates, jnp.zeros((b, n), jnp.int32)) == _sparse.visited_tiles(gates)


# --- kernels in interpret mode against the xla path -----------------------------------------


def _lucid_inputs(seed=2, t=40):
  rng = np.random.default_rng(seed)
  k, v, cot = (jnp.asarray(rng.normal(size=(3, t, 2, 16)), jnp.float32) for _ in range(3))
  return k, v, cot


def _lucid(impl, seg, **options):
  return lambda k, v: ops.lucid_values(
    k, v, block_size=16, segment_ids=seg, implementation=impl, **options
  )


@pytest.mark.parametrize(
  "impl",
  ["pallas_gpu", pytest.param("pallas_tpu", marks=pytest.mark.slow)],
  ids=["triton", "mosaic"],
)
def test_lucid_values_kernel_with_segments_matches_xla(impl):
  k, v, cot = _lucid_inputs()
  layouts = {"packed": _ids(LUCID_ROWS, 40), "one document": jnp.full((3, 40), 7, jnp.int32)}
  _compare(
    lambda seg: _lucid(impl, seg), lambda seg: _lucid("xla", seg), layouts, (k, v), cot, "kv"
  )


def _nats_inputs(t, seed=3, block=16):
  rng = np.random.default_rng(seed)
  q, k, v, cot = (jnp.asarray(rng.normal(size=(3, t, 2, 16)), jnp.float32) for _ in range(4))
  gates = rng.integers(0, 2, size=(3, -(-t // block), 2)).astype(np.float32)
  gates[0, 0, 0] = gates[0, 2, 0] = 1.0  # attention-typed blocks before a boundary
  return (q, k, v, jnp.asarray(gates)), cot


def _nats(impl, seg, **options):
  return lambda q, k, v, g: ops.block_sparse_softmax(
    q, k, v, g, block_size=16, segment_ids=seg, implementation=impl, **options
  )


@pytest.mark.parametrize(
  "impl, t",
  [("pallas_gpu", 56), pytest.param("pallas_tpu", 64, marks=pytest.mark.slow)],
  ids=["triton", "mosaic"],
)
def test_block_sparse_softmax_kernel_with_segments_matches_xla(impl, t):
  args, cot = _nats_inputs(t)
  layouts = {"packed": _ids(NATS_ROWS, t), "one document": jnp.full((3, t), 7, jnp.int32)}
  _compare(
    lambda seg: _nats(impl, seg), lambda seg: _nats("xla", seg), layouts, args, cot,
    ("q", "k", "v", "gate"),
  )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_one_document_is_no_segment_ids(impl):
  """A row of one document (any id) runs the same tiles as no segment ids: equal values
  and gradients (the other kernels' path, compiled once more)."""
  k, v, cot = _lucid_inputs(t=40)
  one = jnp.full((3, 40), 7, jnp.int32)
  run = lambda f, args, cot: jax.jit(lambda *a: _value_and_vjp(f, a, cot))(*args)
  for got, want in zip(
    jax.tree.leaves(run(_lucid(impl, one), (k, v), cot)),
    jax.tree.leaves(run(_lucid(impl, None), (k, v), cot)),
  ):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  args, cot = _nats_inputs(48)
  one = jnp.full((3, 48), 7, jnp.int32)
  for got, want in zip(
    jax.tree.leaves(run(_nats(impl, one), args, cot)),
    jax.tree.leaves(run(_nats(impl, None), args, cot)),
  ):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# --- real compilers -------------------------------------------------------------------------


def _fwd_bwd(fn, n):
  return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2), argnums=tuple(range(n)))


def _packed_kernels(cuda: bool):
  """(name, fn, args, differentiated args, kernels in fwd+bwd): bf16, T = 1000, two rows."""
  options = {"interpret": False} if cuda else {}
  impl = "pallas_gpu" if cuda else None  # None: the target's kernel, through dispatch
  b, t, h, d = 2, 1000, 4, 64
  x = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  gates = jax.ShapeDtypeStruct((b, -(-t // 64), h), jnp.float32)
  lucid = lambda k, v, s: ops.lucid_values(
    k, v, block_size=128, segment_ids=s, implementation=impl, **options
  )
  nats = lambda q, k, v, g, s: ops.block_sparse_softmax(
    q, k, v, g, block_size=64, segment_ids=s, implementation=impl, **options
  )
  return [("lucid", lucid, (x, x, seg), 2, 2), ("nats_l", nats, (x, x, x, gates, seg), 4, 3)]


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1], ids=["lucid", "nats_l"])
def test_kernels_with_segments_compile_for_tpu(which):
  name, fn, args, n, kernels = _packed_kernels(cuda=False)[which]
  compiled, _ = compile_for_tpu(_fwd_bwd(fn, n), args, "v5e:2x2")
  assert compiled.as_text().count("tpu_custom_call") >= kernels, name


def test_kernels_with_segments_lower_for_cuda():
  for name, fn, args, n, kernels in _packed_kernels(cuda=True):
    text = lower_for_cuda(_fwd_bwd(fn, n), args)
    assert text.count("__gpu$xla.gpu.triton") == kernels, name
