"""Packed documents (`segment_ids`) in the flash kernels and in splash attention.

The oracle: every document run alone through the existing op without
segments (`implementation='xla'` on the document's slice; a padding run counts
as a document of its own), the outputs put back in place. The kernels must
match it in the forward pass and in every gradient (q, k, v and SSA's
logit_scale), for softmax, SSA, LSSA and LSSAR (power 3 and 15; their log i,
offset and sharpening use the position within the document).

The TPU kernels run in TPU interpret mode (HLO interpret, and once in the
simulated TPU of `pltpu.InterpretParams`), the GPU kernels in Pallas interpret
mode, both on this CPU. Layouts: 3 rows (four or five documents of uneven
lengths, one of them a single token; one document; two documents and a
padding run of id 0), ragged T and several blocks, so that documents cross
block boundaries, off-diagonal tiles are partly hidden and whole tiles are
skipped. The skipping rules themselves are checked tile by tile against brute
force on random layouts (no kernel runs there). TPU and CUDA compiles with
segments live in tests/test_compile_targets.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnlab import ops
from attnlab.ops.flash import _common
from attnlab.ops.flash import pallas_gpu as flash_gpu
from attnlab.ops.flash import pallas_tpu as flash_tpu
from attnlab.ops.softmax import pallas_gpu as softmax_gpu
from attnlab.ops.softmax import pallas_tpu as softmax_tpu
from attnlab.ops.softmax import splash
from attnlab.ops.softplus import pallas_gpu as softplus_gpu
from attnlab.ops.softplus import pallas_tpu as softplus_tpu

H, HKV, D = 4, 2, 16
TPU_BLOCKS = dict(block_q=128, block_k=128)  # TPU tiles are multiples of 128
GPU_BLOCKS = flash_gpu.BlockSizes(32, 16, 16, 32, 32, 16)  # unequal q/kv tiles in every kernel

# Rows of (id, length) runs. T = 300 (TPU, splash): 3 blocks of 128, padded to 384;
# row 0's last q block starts inside a document that begins at 141, so its first kv
# block is skipped (row 2 likewise, 130). T = 72 (GPU): padded to 96, blocks of 16 and 32.
LAYOUTS = {
  300: [[(3, 40), (7, 100), (8, 1), (1, 119), (4, 40)], [(5, 300)], [(2, 130), (6, 140), (0, 30)]],
  72: [[(3, 10), (7, 25), (8, 1), (1, 29), (4, 7)], [(5, 72)], [(2, 20), (6, 41), (0, 11)]],
}

# Relative to the largest reference entry. Float32 everywhere: kernel and oracle
# differ by summation order (tiles vs one dense row) and by where the factors
# are applied (α·β on the logits vs q̂, k̂ in the xla path), a few ulps per
# entry. Gradients sum those over a row or column and cancel large terms (dq of
# softmax subtracts δ; LSSAR's chain multiplies rounding by p through y^(p-1)
# and the ε term), hence the looser bounds; seen: ≤ 2e-6 values, ≤ 5e-6 gradients.
TOLERANCE, GRAD_TOLERANCE = 1e-5, 5e-5
KINDS = {  # name: (softmax or softplus, power, logit_scale)
  "softmax": ("softmax", None, False),
  "ssa": ("softmax", None, True),
  "lssa": ("softplus", None, False),
  "lssar3": ("softplus", 3.0, False),
  "lssar15": ("softplus", 15.0, False),
}


def _segments(t):
  """(segment_ids [3, t] int32, [(row, start, end)] documents)."""
  ids, docs = [], []
  for b, row in enumerate(LAYOUTS[t]):
    ids.append(np.concatenate([np.full(n, i) for i, n in row]))
    ends = np.cumsum([n for _, n in row])
    docs += [(b, int(e - n), int(e)) for (_, n), e in zip(row, ends)]
  return jnp.asarray(np.stack(ids), jnp.int32), docs


def _inputs(t, seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k, v = f32(3, t, H, D), f32(3, t, HKV, D), f32(3, t, HKV, D)
  ls = jnp.asarray(rng.uniform(0.5, 2.0, size=(3, t, H)), jnp.float32)
  return q, k, v, ls, f32(3, t, H, D)


def _op(kind, backend, segment_ids=None):
  """f(q, k, v, ls) of one kind: a kernel backend with segment_ids, or 'xla' without."""
  family, power, ssa = KINDS[kind]
  options = {
    "pallas_tpu": dict(interpret=True, **TPU_BLOCKS),
    "pallas_gpu": dict(interpret=True, blocks=GPU_BLOCKS),
    "splash": {},
  }.get(backend, {})
  if family == "softmax":
    module = {"pallas_tpu": softmax_tpu, "pallas_gpu": softmax_gpu, "splash": splash}.get(backend)

    def f(q, k, v, ls):
      ls = ls if ssa else None
      if module is None:
        return ops.softmax_attention(q, k, v, logit_scale=ls, implementation="xla")
      return module.softmax_attention(q, k, v, logit_scale=ls, segment_ids=segment_ids, **options)

    return f
  module = {"pallas_tpu": softplus_tpu, "pallas_gpu": softplus_gpu}.get(backend)

  def g(q, k, v, ls):
    if module is None:
      return ops.softplus_attention(q, k, v, power=power, implementation="xla")
    return module.softplus_attention(q, k, v, power=power, segment_ids=segment_ids, **options)

  return g


def _per_document(kind, docs):
  """The oracle: each document through the xla op alone, put back in place."""
  f = _op(kind, "xla")

  def run(q, k, v, ls):
    rows = {}
    for b, s, e in docs:
      rows.setdefault(b, []).append(f(*(x[b : b + 1, s:e] for x in (q, k, v, ls))))
    return jnp.concatenate([jnp.concatenate(rows[b], axis=1) for b in sorted(rows)], axis=0)

  return run


def _value_and_grads(f, args, cot, argnums):
  @jax.jit
  def run(*args):
    out, vjp = jax.vjp(lambda *a: f(*a), *args)
    grads = vjp(cot)
    return out, [grads[i] for i in argnums]

  return run(*args)


def _error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got))
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _check_against_documents(kind, backend, t, ids_dtype=jnp.int32):
  q, k, v, ls, cot = _inputs(t)
  segment_ids, docs = _segments(t)
  segment_ids = segment_ids.astype(ids_dtype)
  argnums = (0, 1, 2, 3) if KINDS[kind][2] else (0, 1, 2)
  args = (q, k, v, ls)
  out, grads = _value_and_grads(_op(kind, backend, segment_ids), args, cot, argnums)
  want, want_grads = _value_and_grads(_per_document(kind, docs), args, cot, argnums)
  errors = {"out": _error(out, want)}
  errors.update({n: _error(g, w) for n, g, w in zip(("dq", "dk", "dv", "dls"), grads, want_grads)})
  print(kind, backend, {n: f"{e:.1e}" for n, e in errors.items()})
  assert errors.pop("out") <= TOLERANCE, errors
  assert max(errors.values()) <= GRAD_TOLERANCE, errors


# --- helpers and skipping rules (no kernels) -------------------------------------------------


def test_document_starts_and_positions():
  ids = jnp.asarray([[4, 4, 1, 1, 1, 9, 0, 0], [2, 2, 2, 2, 2, 2, 2, 2], [5, 3, 5, 5, 0, 0, 0, 1]])
  np.testing.assert_array_equal(
    _common.document_starts(ids),
    [[0, 0, 2, 2, 2, 5, 6, 6], [0] * 8, [0, 1, 2, 2, 4, 4, 4, 7]],
  )
  np.testing.assert_array_equal(
    _common.document_positions(ids),
    [[1, 2, 1, 2, 3, 1, 1, 2], list(range(1, 9)), [1, 1, 1, 2, 1, 2, 3, 1]],
  )
  # Padding continues the last document.
  np.testing.assert_array_equal(
    _common.padded_starts(ids[:1, :7], 9), [[0, 0, 2, 2, 2, 5, 6, 6, 6]]
  )
  # α uses the position within the document: log 1 = 0 at every document's first token.
  q = jnp.ones((3, 8, 1, 4))
  alpha, _ = _common.softplus_factors(q, q, _common.document_positions(ids))
  np.testing.assert_allclose(alpha[..., 0], np.log(4) * np.log(_common.document_positions(ids)) / 2)


def _random_starts(rng, t):
  cuts = rng.random(t) < rng.choice([0.02, 0.1, 0.4])
  cuts[0] = True
  return np.maximum.accumulate(np.where(cuts, np.arange(t), 0))


def _tiles(starts, bq, bk):
  """Brute force over [num_q, num_k] tiles: (any entry visible, all visible), start_i ≤ j ≤ i."""
  t = len(starts)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  visible = ((j <= i) & (j >= starts[:, None])).reshape(t // bq, bq, t // bk, bk)
  return visible.any(axis=(1, 3)), visible.all(axis=(1, 3))


def _check_ranges(ranges, expected_any, expected_all, what):
  """Ranges visit exactly the blocks with a visible entry, once each, and drop
  the mask only on wholly visible ones."""
  seen = np.zeros(len(expected_any), int)
  for lo, hi, masked in ranges:
    seen[int(lo) : max(int(lo), int(hi))] += 1
    assert masked or expected_all[int(lo) : int(hi)].all(), f"{what}: unmasked partial block"
  np.testing.assert_array_equal(seen, expected_any.astype(int), err_msg=what)


def test_tile_skipping_rules_match_brute_force():
  """Every rule that skips a tile or drops its mask, on random layouts: GPU
  forward/dq (kv ranges of a q block) and dk/dv (q ranges of a kv block), TPU's
  scalar-prefetched predicates. A tile runs iff it holds a visible entry. The
  causal-only rules (no documents) go through the same check."""
  rng = np.random.default_rng(0)
  for trial in range(20):
    bq, bk = [(16, 32), (32, 16), (32, 32), (128, 128), (128, 256)][trial % 5]
    t = int(rng.integers(2, 7)) * max(bq, bk)
    starts = _random_starts(rng, t)
    num_q, num_k = t // bq, t // bk
    any_, all_ = _tiles(starts, bq, bk)
    js = jnp.asarray(starts, jnp.int32)
    for i in range(num_q):  # GPU forward / dq
      ranges = flash_gpu._kv_ranges(jnp.int32(i * bq), bq, bk, js[i * bq : (i + 1) * bq])
      _check_ranges(ranges, any_[i], all_[i], f"kv ranges of q block {i}")
    q_first = flash_gpu._block_starts(js[None], bq)[0]
    for j in range(num_k):  # GPU dk/dv
      ranges = flash_gpu._q_ranges(jnp.int32(j * bk), bq, bk, num_q, q_first)
      _check_ranges(ranges, any_[:, j], all_[:, j], f"q ranges of kv block {j}")
    if trial < 5:  # without documents: one document per row
      causal_any, causal_all = _tiles(np.zeros(t, int), bq, bk)
      for i in range(num_q):
        ranges = flash_gpu._kv_ranges(jnp.int32(i * bq), bq, bk)
        _check_ranges(ranges, causal_any[i], causal_all[i], f"causal kv ranges of {i}")
      for j in range(num_k):
        ranges = flash_gpu._q_ranges(jnp.int32(j * bk), bq, bk, num_q)
        _check_ranges(ranges, causal_any[:, j], causal_all[:, j], f"causal q ranges of {j}")
    # TPU: forward / dq skip unless kv_end >= doc_first[q block]; dk/dv unless q block < q_end.
    cfg = flash_tpu._Config("softmax", None, 1.0, bq, bk, False)
    docs = flash_tpu._documents(js[None], cfg, num_k)
    k_end = np.arange(num_k) * bk + bk - 1
    causal = (np.arange(num_k)[None, :] * bk) <= (np.arange(num_q)[:, None] * bq + bq - 1)
    row_rule = causal & (k_end[None, :] >= np.asarray(docs["doc_first"])[:, None])
    col_rule = causal & (np.arange(num_q)[:, None] < np.asarray(docs["q_end"])[None, :])
    np.testing.assert_array_equal(row_rule, any_)
    np.testing.assert_array_equal(col_rule, any_)


def _pallas_calls(jaxpr):
  """Every pallas_call equation in a jaxpr and its sub-jaxprs (custom VJPs, pjit)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _pallas_calls(sub)


def test_no_segments_traces_no_document_inputs():
  """segment_ids=None traces the kernels as before (no integer operands, no
  scalar prefetch); with segment_ids every kernel, forward and backward, gets
  them (TPU: one SMEM vector and the starts; GPU: the starts, dk/dv also the
  per-q-block starts)."""
  q, k, v, ls, _ = _inputs(72)
  seg, _ = _segments(72)
  for backend, packed in (("pallas_tpu", [(1, 2)] * 5), ("pallas_gpu", [(0, 1), (0, 1), (0, 2)])):
    for ids, expected in ((None, [(0, 0)] * len(packed)), (seg, packed)):
      f = _op("lssar15", backend, ids)
      jaxpr = jax.make_jaxpr(jax.grad(lambda *a, f=f: f(*a).sum(), (0, 1, 2)))(q, k, v, ls)
      found = [
        (
          eqn.params["grid_mapping"].num_index_operands,
          sum(jnp.issubdtype(x.aval.dtype, jnp.integer) for x in eqn.invars),
        )
        for eqn in _pallas_calls(jaxpr.jaxpr)
      ]
      assert found == expected, (backend, ids is None, found)


# --- kernels against the documents run alone -------------------------------------------------


@pytest.mark.parametrize(
  "backend,kind",
  [
    # Fast tier: LSSAR p = 15 runs every kernel and reads positions within documents.
    ("pallas_tpu", "lssar15"),
    ("pallas_gpu", "lssar15"),
    pytest.param("pallas_gpu", "ssa", marks=pytest.mark.slow),
    pytest.param("pallas_tpu", "softmax", marks=pytest.mark.slow),
    pytest.param("pallas_tpu", "ssa", marks=pytest.mark.slow),
    pytest.param("pallas_tpu", "lssa", marks=pytest.mark.slow),
    pytest.param("pallas_tpu", "lssar3", marks=pytest.mark.slow),
    pytest.param("pallas_gpu", "softmax", marks=pytest.mark.slow),
    pytest.param("pallas_gpu", "lssar3", marks=pytest.mark.slow),
    pytest.param("pallas_gpu", "lssa", marks=pytest.mark.slow),
    pytest.param("splash", "softmax", marks=pytest.mark.slow),
    ("splash", "ssa"),
  ],
)
def test_kernel_matches_documents_run_alone(backend, kind):
  _check_against_documents(kind, backend, 72 if backend == "pallas_gpu" else 300)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
def test_int64_segment_ids_under_x64(x64, backend):
  _check_against_documents("lssar15", backend, 72, ids_dtype=jnp.int64)


@pytest.mark.slow
def test_tpu_kernel_in_simulated_tpu_interpret_mode():
  """pltpu.InterpretParams: scalar prefetch through simulated SMEM, DMAs and
  NaN-filled uninitialised VMEM (a skipped tile that left scratch unset shows)."""
  q, k, v, ls, cot = _inputs(300)
  segment_ids, docs = _segments(300)
  f = lambda q, k, v, ls: softmax_tpu.softmax_attention(
    q, k, v, logit_scale=ls, segment_ids=segment_ids, interpret=pltpu.InterpretParams(),
    **TPU_BLOCKS,
  )  # fmt: skip
  out, grads = _value_and_grads(f, (q, k, v, ls), cot, (0, 1, 2, 3))
  want, want_grads = _value_and_grads(_per_document("ssa", docs), (q, k, v, ls), cot, (0, 1, 2, 3))
  assert _error(out, want) <= TOLERANCE
  for g, w in zip(grads, want_grads):
    assert _error(g, w) <= GRAD_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu", "splash"])
def test_one_document_equals_no_segments(backend):
  """Forward and gradients, to float32 rounding (≤ 1e-6 of the largest entry).

  The flash kernels get the same α and β both ways (LSSAR p = 15): the softplus
  ops compute log i from positions at run time with segments but from a
  constant XLA folds without, and the two logs can differ in the last bit (up
  to 5e-6 relative after p = 15, seen). The kernels then agree bit for bit,
  except the interpreted GPU dk/dv, whose masked loop body XLA compiles with
  the extra document term (a few entries 1 ulp apart, seen)."""
  t = 72 if backend == "pallas_gpu" else 300
  q, k, v, ls, cot = _inputs(t, seed=1)

  def f(ids):
    if backend == "splash":
      return _op("ssa", backend, ids)
    module, options = {
      "pallas_tpu": (flash_tpu, dict(interpret=True, **TPU_BLOCKS)),
      "pallas_gpu": (flash_gpu, dict(interpret=True, blocks=GPU_BLOCKS)),
    }[backend]
    return lambda q, k, v, ls: module.flash_attention(
      q, k, v, ls, _common.softplus_factors(q, k)[1], kind="lssar", power=15.0,
      segment_ids=ids, **options,
    )  # fmt: skip

  one = jnp.full((3, t), 7, jnp.int32)
  out, grads = _value_and_grads(f(one), (q, k, v, ls), cot, (0, 1, 2, 3))
  want, want_grads = _value_and_grads(f(None), (q, k, v, ls), cot, (0, 1, 2, 3))
  assert _error(out, want) <= 1e-6
  for g, w in zip(grads, want_grads):
    assert _error(g, w) <= 1e-6
