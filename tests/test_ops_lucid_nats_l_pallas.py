"""Kernels for LUCID's solve (`lucid_values`) and NAtS-L's block-sparse softmax.

Each kernel runs in interpret mode on the CPU and is checked against the xla
path (float32) and the float64 oracle (`reference.py`), on the output and
the gradient with respect to every input (for NAtS-L, the gates too). Then
the kernels are compiled by the real TPU compiler for a v5e chip and lowered
for CUDA (Triton), forward and backward, in bf16.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from attnlab.ops.lucid import _solve
from attnlab.ops.lucid import reference as lucid_reference
from attnlab.ops.nats_l import _sparse
from attnlab.ops.nats_l import reference as nats_reference
from attnlab.ops.nats_l import xla as nats_xla
from tests.conftest import compile_for_tpu, lower_for_cuda

# Relative to the largest reference entry. The kernels are float32 like the
# xla path and differ from it by summation order; the float64 oracle bounds
# both paths' float32 rounding.
TOL_XLA, TOL_ORACLE = 2e-5, 1e-4
GRAD_TOL_XLA, GRAD_TOL_ORACLE = 1e-4, 3e-4


@contextlib.contextmanager
def _float64():
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


def _close(got, want, tol, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)), what
  scale = max(float(np.max(np.abs(want))), 1e-30)
  err = float(np.max(np.abs(got - want))) / scale
  assert err <= tol, f"{what}: max error {err:.2e} of max |ref| {scale:.2e} > {tol:.0e}"


def _value_and_vjp(fn, args, cot):
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(cot)


def _compare(kernel, xla, oracle, args, cot, names):
  """Kernel vs xla (float32, one jit each) and vs the oracle (float64)."""
  got = jax.jit(lambda *a: _value_and_vjp(kernel, a, cot))(*args)
  want = jax.jit(lambda *a: _value_and_vjp(xla, a, cot))(*args)
  with _float64():
    wide = [jnp.asarray(np.asarray(a), jnp.float64) for a in args]
    exact = _value_and_vjp(oracle, wide, jnp.asarray(np.asarray(cot), jnp.float64))
  bounds = [("xla", want, TOL_XLA, GRAD_TOL_XLA), ("oracle", exact, TOL_ORACLE, GRAD_TOL_ORACLE)]
  if jax.default_backend() == "gpu":
    # On a real GPU, float32 products run as TF32 (the NAtS-L kernel and the xla path
    # both; measured 2e-4 on an H200): check to TF32's precision instead.
    bounds = [(label, ref, 3e-3, 3e-3) for label, ref, _, _ in bounds]
  for label, ref, tol, grad_tol in bounds:
    _close(got[0], ref[0], tol, f"output vs {label}")
    for name, g, r in zip(names, got[1], ref[1]):
      _close(g, r, grad_tol, f"d{name} vs {label}")


def _nats_inputs(seed, b, t, h, d, block):
  rng = np.random.default_rng(seed)
  n = -(-t // block)
  q, k, v, cot = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(4))
  # Hidden (0), visible (1) and fractional gates, as a soft relaxation would give.
  gates = rng.choice([0.0, 1.0, 0.7], size=(b, n, h), p=[0.4, 0.4, 0.2])
  gates[0, 0, 0], gates[0, 1, 0] = 0.0, 1.0
  return (q, k, v, jnp.asarray(gates, jnp.float32)), cot


@pytest.mark.slow
@pytest.mark.parametrize(
  "impl, block, t", [("pallas_tpu", 8, 36), ("pallas_gpu", 16, 56)], ids=["mosaic", "triton"]
)
def test_block_sparse_softmax_kernel_matches_xla_and_oracle(impl, block, t):
  args, cot = _nats_inputs(0, 2, t, 2, 16, block)  # ragged T: a partial last block
  scale = 0.3

  def path(name, module=None):
    def run(q, k, v, g):
      if module is not None:
        return module.block_sparse_softmax(q, k, v, g, block_size=block, scale=scale)
      return ops.block_sparse_softmax(
        q, k, v, g, block_size=block, scale=scale, implementation=name
      )

    return run

  _compare(path(impl), path("xla"), path(None, nats_reference), args, cot, ("q", "k", "v", "gate"))


def test_block_lists_visit_exactly_the_tiles_with_visible_keys():
  rng = np.random.default_rng(1)
  b, n, h, block = 2, 7, 3, 4
  gates = jnp.asarray(rng.choice([0.0, 1.0, 0.5], size=(b, n, h)), jnp.float32)
  weights = nats_xla.block_key_weights(gates, n * block, block)  # [B, H, Tq, Tk]
  dense = np.asarray(weights).reshape(b, h, n, block, n, block).max(axis=(3, 5)) > 0
  order, before, visible = (np.asarray(x) for x in _sparse.block_lists(jnp.moveaxis(gates, 2, 1)))
  rows, cols = np.zeros_like(dense), np.zeros_like(dense)
  for bi in range(b):
    for hi in range(h):
      for i in range(n):  # forward / dq: query block i's list
        rows[bi, hi, i, list(order[bi, hi, : before[bi, hi, i]]) + [i]] = True
      for j in range(n):  # dk/dv: key block j meets j, then every later block if visible
        cols[bi, hi, range(j, n if visible[bi, hi, j] else j + 1), j] = True
  np.testing.assert_array_equal(rows, dense)
  np.testing.assert_array_equal(cols, dense)
  # The work follows the attention-block fraction: diagonal only at 0, causal at 1.
  assert _sparse.visited_tiles(jnp.zeros((b, n, h)))["forward"] == b * h * n
  full = _sparse.visited_tiles(jnp.ones((b, n, h)))
  assert full["forward"] == full["dkv"] == full["dense_causal"] == b * h * n * (n + 1) // 2


@pytest.mark.parametrize(
  "impl, block, t", [("pallas_tpu", 8, 36), ("pallas_gpu", 16, 64)], ids=["mosaic", "triton"]
)
def test_block_gated_delta_kernel_matches_xla_and_oracle(impl, block, t):
  """The delta-rule path on the state-pass kernel, chunk = block, with the
  per-block write gate's gradient; mosaic: ragged T, triton: whole blocks
  with an initial state in and the final state out."""
  rng = np.random.default_rng(3)
  b, h, d = 1, 2, 16
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  q, k = (f32(unit(rng.normal(size=(b, t, h, d)))) for _ in range(2))
  v = f32(rng.normal(size=(b, t, h, d)))
  g = f32(-np.log1p(np.exp(-rng.normal(size=(b, t, h)) + 1.0)))
  beta = f32(1 / (1 + np.exp(-rng.normal(size=(b, t, h)))))
  gates = f32(rng.choice([0.0, 1.0, 0.6], size=(b, -(-t // block), h)))
  s0 = f32(0.5 * rng.normal(size=(b, h, d, d)))
  whole = t % block == 0
  cot_o = f32(rng.normal(size=(b, t, h, d)))
  cot = (cot_o, f32(rng.normal(size=(b, h, d, d)))) if whole else cot_o

  def path(name, module=None):
    def run(q, k, v, g, beta, gates, s0):
      if module is not None:  # the oracle: explicit recurrence
        o, final = module.block_gated_delta_rule(
          q, k, v, g, beta, gates, s0, block_size=block, scale=d**-0.5
        )
        return (o, final) if whole else o
      return ops.block_gated_delta_rule(
        q, k, v, g, beta, gates, block_size=block, initial_state=s0,
        return_final_state=whole, implementation=name,
      )  # fmt: skip

    return run

  args = (q, k, v, g, beta, gates, s0)
  names = ("q", "k", "v", "g", "beta", "gate", "initial_state")
  got = jax.jit(lambda *a: _value_and_vjp(path(impl), a, cot))(*args)
  want = jax.jit(lambda *a: _value_and_vjp(path("xla"), a, cot))(*args)
  with _float64():
    wide = [jnp.asarray(np.asarray(a), jnp.float64) for a in args]
    cot64 = jax.tree.map(lambda c: jnp.asarray(np.asarray(c), jnp.float64), cot)
    exact = _value_and_vjp(path(None, nats_reference), wide, cot64)
  for label, ref, tol, grad_tol in (("xla", want, 2e-5, 1e-4), ("oracle", exact, 2e-5, 1e-4)):
    for i, (gv, rv) in enumerate(zip(jax.tree.leaves(got[0]), jax.tree.leaves(ref[0]))):
      _close(gv, rv, tol, f"{('output', 'final state')[i]} vs {label}")
    for name, gv, rv in zip(names, got[1], ref[1], strict=True):
      _close(gv, rv, grad_tol, f"d{name} vs {label}")


def test_bf16x6_dot_is_as_accurate_as_float32():
  """Six bf16 products per matmul (the GPU solve's default) against float64: at
  float32's rounding level, where one bf16 product is ~3 digits off."""
  rng = np.random.default_rng(7)
  a = rng.normal(size=(64, 48)) * np.exp(rng.normal(size=(64, 1)))  # rows of mixed scale
  b = rng.normal(size=(32, 48))
  want = a @ b.T
  nt, nn = (((1,), (1,)), ((), ())), (((1,), (0,)), ((), ()))
  for dims, rhs in ((nt, b), (nn, b.T)):
    x, y = jnp.asarray(a, jnp.float32), jnp.asarray(rhs, jnp.float32)
    scale = np.max(np.abs(want))
    split = np.max(np.abs(np.asarray(_solve.bf16x6_dot(x, y, dims), np.float64) - want)) / scale
    ieee = np.max(np.abs(np.asarray(_solve.dot(x, y, dims), np.float64) - want)) / scale
    one = jax.lax.dot_general(
      x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), dims, preferred_element_type=jnp.float32
    )
    single = np.max(np.abs(np.asarray(one, np.float64) - want)) / scale
    assert split <= 2 * ieee + 1e-7, (split, ieee)
    assert split <= 1e-6 and single >= 1e-3, (split, single)


@pytest.mark.slow
@pytest.mark.parametrize(
  "impl, precision",
  [("pallas_tpu", None), ("pallas_gpu", "bf16x6"), ("pallas_gpu", "ieee")],
  ids=["mosaic", "triton-bf16x6", "triton-ieee"],
)
def test_lucid_values_kernel_matches_xla_and_oracle(impl, precision):
  rng = np.random.default_rng(2)
  b, t, h, d = 1, 40, 2, 16  # block 16: two full blocks and a padded one
  k, v, cot = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(3))
  options = {} if precision is None else {"precision": precision}

  def path(name, module=None):
    def run(k, v):
      if module is not None:
        return module.preconditioned_values(
          k, v, eps=1e-5, block_size=16, context_keys=None, context_values=None,
          context_length=0,
        )  # fmt: skip
      extra = options if name == impl else {}
      return ops.lucid_values(k, v, block_size=16, implementation=name, **extra)

    return run

  _compare(path(impl), path("xla"), path(None, lucid_reference), (k, v), cot, ("k", "v"))


@pytest.mark.slow
def test_lucid_values_kernel_with_a_decoding_context():
  rng = np.random.default_rng(3)
  b, c, t, h, d = 1, 9, 5, 2, 16
  normal = lambda n: jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32)
  keys, values = normal(c + t), normal(c + t)
  whole = ops.lucid_values(keys, values, block_size=8, implementation="xla")
  # A cache of 12 rows of which the first 9 are valid; the rest must be ignored.
  cache_k = jnp.concatenate([keys[:, :c], normal(3)], 1)
  cache_v = jnp.concatenate([whole[:, :c], normal(3)], 1)
  got = ops.lucid_values(
    keys[:, c:], values[:, c:], context_keys=cache_k, context_values=cache_v, context_length=c,
    block_size=8, implementation="pallas_gpu",
  )  # fmt: skip
  _close(got, whole[:, c:], TOL_ORACLE, "V' of new rows after a cache")


@pytest.mark.slow
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_block_sparse_softmax_cached_matches_the_whole_sequence(new_tokens):
  """Decoding (1 token) and a prefill chunk (3) from the block-compacted cache."""
  from attnlab.ops.nats_l.api import block_sparse_softmax_cached

  rng = np.random.default_rng(4)
  b, h, d, block, done, length = 2, 3, 8, 4, 5, 3
  t = done * block + length  # five complete blocks, the current one holds 3 tokens
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for _ in range(3))
  gates = rng.integers(0, 2, size=(b, done + 1, h)).astype(np.float32)
  gates[0, :, 0] = 0.0  # a head with no attention-typed block at all
  full = ops.block_sparse_softmax(q, k, v, jnp.asarray(gates), block_size=block)
  # Junk in unused slots and rows must not be seen.
  slots = rng.normal(size=(2, b, done + 1, block, h, d))
  counts = np.zeros((b, h), np.int32)
  for bi in range(b):
    for hi in range(h):
      kept = [j for j in range(done) if gates[bi, j, hi] > 0] + [done]
      for slot, j in enumerate(kept):
        rows = slice(j * block, min(t, (j + 1) * block))
        filled = rows.stop - rows.start
        slots[0, bi, slot, :filled, hi] = np.asarray(k[bi, rows, hi])
        slots[1, bi, slot, :filled, hi] = np.asarray(v[bi, rows, hi])
      counts[bi, hi] = len(kept) - 1
  got = block_sparse_softmax_cached(
    q[:, t - new_tokens :], jnp.asarray(slots[0], jnp.float32), jnp.asarray(slots[1], jnp.float32),
    jnp.asarray(counts), length,
  )  # fmt: skip
  _close(got, full[:, t - new_tokens :], TOL_XLA, "cached rows")


def _bf16(*shapes):
  return [jax.ShapeDtypeStruct(s, jnp.float32 if len(s) == 3 else jnp.bfloat16) for s in shapes]


def _kernels(cuda: bool):
  """(name, fn, args, number of kernels in fwd+bwd) for the compile checks."""
  options = {"interpret": False} if cuda else {}
  impl = "pallas_gpu" if cuda else None  # None: the target's kernel, through dispatch
  b, t, h, d, block = 1, 1000, 4, 64, 64
  x = (b, t, h, d)

  def nats(q, k, v, g):
    return ops.block_sparse_softmax(q, k, v, g, block_size=block, implementation=impl, **options)

  def lucid(k, v):
    return ops.lucid_values(k, v, block_size=128, implementation=impl, **options)

  def nats_delta(q, k, v, g, beta, gate):
    return ops.block_gated_delta_rule(
      q, k, v, g, beta, gate, block_size=block, implementation=impl, **options
    )

  n = (b, -(-t // block), h)
  return [
    ("nats_l", nats, _bf16(x, x, x, n), 3),
    ("lucid", lucid, _bf16(x, x), 2),
    ("nats_l_delta", nats_delta, _bf16(x, x, x, x[:3], x[:3], n), 3),
  ]


def _fwd_bwd(fn, n):
  return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2), argnums=tuple(range(n)))


@pytest.mark.parametrize("which", [0, 1, 2], ids=["nats_l", "lucid", "nats_l_delta"])
def test_kernels_compile_for_tpu_v5e(which):
  name, fn, args, kernels = _kernels(cuda=False)[which]
  compiled, _ = compile_for_tpu(_fwd_bwd(fn, len(args)), args, "v5e:2x2")
  assert compiled.as_text().count("tpu_custom_call") >= kernels, name
  assert compiled.memory_analysis() is not None


@pytest.mark.parametrize("d", [64, 68])
def test_lucid_kernel_vmem_limit_counts_lane_padding(d):
  """T = 8K, D = 64 / 68 on v5p, through implementation=None: the VMEM limit must
  count each [T, D] float32 buffer at its lane-padded width (128). Counted at D,
  the limit was half the need and the backward failed to compile (found by
  benchmarks.kernel_report, 2026-12-07)."""
  from attnlab.ops.lucid import api

  t = 8192
  assert api.pallas_tpu_vmem_bytes(t, d, d) == 2 * 4 * t * 5 * 128
  x = jax.ShapeDtypeStruct((1, t, 2, d), jnp.bfloat16)
  compiled, _ = compile_for_tpu(_fwd_bwd(lambda k, v: ops.lucid_values(k, v), 2), (x, x),
                                "v5p:2x2x1")  # fmt: skip
  assert compiled.as_text().count("tpu_custom_call") == 2


def test_kernels_lower_for_cuda():
  for name, fn, args, kernels in _kernels(cuda=True):
    text = lower_for_cuda(_fwd_bwd(fn, len(args)), args)
    assert text.count("__gpu$xla.gpu.triton") == kernels, name


def _kernel_dots(jaxpr) -> list:
  """(lhs dtype, precision) of every dot_general inside the pallas_calls of a jaxpr."""
  found = []

  def walk(jaxpr, inside):
    for eqn in jaxpr.eqns:
      if inside and eqn.primitive.name == "dot_general":
        found.append((eqn.invars[0].aval.dtype, eqn.params["precision"]))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub, inside or eqn.primitive.name == "pallas_call")

  walk(jaxpr.jaxpr, False)
  return found


@pytest.mark.parametrize("precision", ["bf16x6", "ieee"])
def test_lucid_gpu_kernels_multiply_in_the_chosen_precision(precision):
  """What the Triton lowering receives: bf16 operands only (tensor cores) for
  'bf16x6', float32 at HIGHEST (Triton's IEEE dot) for 'ieee'."""
  x = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
  fn = lambda k, v: ops.lucid_values(
    k, v, block_size=64, implementation="pallas_gpu", interpret=False, precision=precision
  )
  dots = _kernel_dots(jax.make_jaxpr(_fwd_bwd(fn, 2))(x, x))
  assert dots, "no dot inside the kernels"
  if precision == "bf16x6":
    assert {dtype for dtype, _ in dots} == {jnp.dtype(jnp.bfloat16)}, dots
  else:
    assert {dtype for dtype, _ in dots} == {jnp.dtype(jnp.float32)}, dots
    assert all(p == (jax.lax.Precision.HIGHEST,) * 2 for _, p in dots), dots
  with pytest.raises(ValueError, match="precision must be one of"):
    small = jnp.zeros((1, 16, 1, 16), jnp.float32)
    ops.lucid_values(small, small, implementation="pallas_gpu", precision="tf32")
