"""Property-based tests of every public op in `attnlab.ops` (hypothesis).

Each example draws shapes (T = 1, primes, chunk/block sizes that do and do not
divide T, GQA/GVA ratios, head dims that are not powers of two), a dtype
(bfloat16, float32, float64) and the optional inputs (initial state, logit
scale, power, normaliser), runs the public op on its default path, and checks
it against the op's float64 oracle (`implementation='reference'`, the
recurrence or per-query loop) on the very same input values: the output dtype,
finiteness, forward values, and the gradient of a random projection of the
outputs with respect to every floating input.

Profiles: 'ci' (the default: a few derandomised examples per op, so CI stays
fast and repeatable) and 'dev' (many random examples):

    HYPOTHESIS_PROFILE=dev python -m pytest -q tests/test_properties.py
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnlab import ops

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
  "ci", max_examples=2, deadline=None, derandomize=True, database=None,
  suppress_health_check=_SLOW_OK,
)  # fmt: skip
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module", autouse=True)
def _x64():
  """float64 oracles need x64; low-precision inputs keep their own dtype."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


# Errors are measured as max |actual − oracle| / max(max |oracle|, floor): the
# low-precision paths compute in float32 and round their result once, so the
# bound is a few output ulps of the largest entry.
_TOL = {  # dtype: (forward, gradient)
  "bfloat16": (1.5e-2, 4e-2),
  "float32": (2e-4, 5e-4),
  "float64": (1e-9, 1e-9),
}

lengths = st.one_of(st.just(1), st.sampled_from([2, 3, 5, 7, 11, 13, 17, 19, 23]))
head_dims = st.sampled_from([1, 3, 5, 6, 7, 8, 12])
dtypes = st.sampled_from(["bfloat16", "float32", "float64"])
batches = st.integers(1, 2)
seeds = st.integers(0, 2**31 - 1)


def _flat(out):
  return [a for a in jax.tree.leaves(out) if a is not None]


def _close(actual, expected, tol, what):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  if actual.size == 0:
    return
  err = np.max(np.abs(actual - expected))
  bound = tol * max(np.max(np.abs(expected)), 1e-2)
  assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _dense_softmax(q, k, v, length=None, logit_scale=None):
  """A loop-free float64 causal softmax oracle (GQA; the last Tq of `length`
  cache rows are the queries). The shipped 'reference' runs one query and head
  at a time, which XLA takes ~10 s to compile, too slow for many shapes."""
  b, tq, h, d = q.shape
  length = k.shape[1] if length is None else length
  k, v = (jnp.repeat(a, h // k.shape[2], axis=2) for a in (k, v))
  logits = jnp.einsum("bqhd,bshd->bhqs", q, k) / np.sqrt(d)
  if logit_scale is not None:
    logits = logits * jnp.moveaxis(logit_scale, 1, 2)[..., None]
  visible = jnp.arange(k.shape[1])[None, :] <= (length - tq + jnp.arange(tq))[:, None]
  logits = jnp.where(visible, logits, -jnp.inf)
  return jnp.einsum("bhqs,bshe->bqhe", jax.nn.softmax(logits, axis=-1), v)


def _values_and_grads(fn, xs, cots):
  """One jitted program: the outputs and the gradient of Σ cot·out."""

  def run(*xs):
    out, vjp = jax.vjp(lambda *xs: _flat(fn(*xs)), *xs)
    casts = [c.astype(o.dtype) for o, c in zip(out, cots, strict=True)]
    return out, vjp(casts)

  return jax.jit(run)(*xs)


def _check_against_oracle(fn, arrays, dtype, seed, *, oracle=None, out_dtype=None):
  """fn(*arrays, implementation=...) -> an array or a pytree of arrays.

  The default path (`implementation=None`) sees `arrays` in `dtype`; the
  oracle (`oracle(*arrays)`, by default `fn(..., implementation='reference')`)
  sees the same values in float64. Checks the first output's dtype (q's, or
  `out_dtype`), finiteness, values and the gradient of Σ cot·out with respect
  to every array, for a random cotangent.
  """
  fwd_tol, grad_tol = _TOL[dtype]
  low = [jnp.asarray(a, dtype) for a in arrays]
  high = [x.astype(jnp.float64) for x in low]
  oracle = oracle or (lambda *xs: fn(*xs, implementation="reference"))
  shapes = jax.eval_shape(lambda *xs: _flat(oracle(*xs)), *high)
  rng = np.random.default_rng(seed)
  # Cotangents representable in `dtype`, so both paths see the same ones (a
  # bfloat16 output rounds its cotangent, and GQA sums then cancel).
  cots = [jnp.asarray(rng.normal(size=s.shape), dtype).astype(jnp.float64) for s in shapes]
  out, grads = _values_and_grads(lambda *xs: fn(*xs, implementation=None), low, cots)
  ref, expected = _values_and_grads(oracle, high, cots)
  assert out[0].dtype == jnp.dtype(out_dtype or dtype), (out[0].dtype, dtype)
  for i, (o, r) in enumerate(zip(out, ref, strict=True)):
    _close(o, r, fwd_tol, f"output {i} ({dtype})")
  for i, (g, e) in enumerate(zip(grads, expected, strict=True)):
    assert g.dtype == low[i].dtype
    _close(g, e, grad_tol, f"gradient of input {i} ({dtype})")


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# Softmax family -------------------------------------------------------------


@pytest.mark.slow
@given(
  b=batches, t=lengths, kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 3]),
  d=head_dims, dv=head_dims, with_logit_scale=st.booleans(), dtype=dtypes, seed=seeds,
)  # fmt: skip
def test_softmax_attention(b, t, kv_heads, group, d, dv, with_logit_scale, dtype, seed):
  rng = np.random.default_rng(seed)
  h = kv_heads * group
  arrays = [rng.normal(size=(b, t, h, d)), rng.normal(size=(b, t, kv_heads, d))]
  arrays.append(rng.normal(size=(b, t, kv_heads, dv)))
  if with_logit_scale:
    arrays.append(rng.uniform(0.5, 3.0, (b, t, h)))
  fn = lambda q, k, v, *ls, implementation: ops.softmax_attention(
    q, k, v, logit_scale=ls[0] if ls else None, implementation=implementation
  )
  oracle = lambda q, k, v, *ls: _dense_softmax(q, k, v, logit_scale=ls[0] if ls else None)
  _check_against_oracle(fn, arrays, dtype, seed, oracle=oracle)


@given(
  b=batches, tq=st.integers(1, 5), extra=st.integers(0, 7), pad=st.integers(0, 4),
  group=st.sampled_from([1, 2, 3]), d=head_dims, dtype=dtypes, seed=seeds,
)  # fmt: skip
def test_softmax_attention_cached(b, tq, extra, pad, group, d, dtype, seed):
  """Queries against a cache whose rows past cache_length hold garbage."""
  rng = np.random.default_rng(seed)
  length = tq + extra
  arrays = [rng.normal(size=(b, tq, 2 * group, d))]
  arrays += [rng.normal(size=(b, length + pad, 2, d)) for _ in range(2)]
  fn = lambda q, k, v, implementation: ops.softmax_attention_cached(
    q, k, v, length, implementation=implementation
  )
  oracle = lambda q, k, v: _dense_softmax(q, k, v, length)
  _check_against_oracle(fn, arrays, dtype, seed, oracle=oracle)


@pytest.mark.slow
@given(
  b=batches, t=lengths, group=st.sampled_from([1, 2, 3]), d=head_dims,
  power=st.sampled_from([None, 3, 15]), dtype=dtypes, seed=seeds,
)  # fmt: skip
def test_softplus_attention(b, t, group, d, power, dtype, seed):
  rng = np.random.default_rng(seed)
  arrays = [rng.normal(size=(b, t, 2 * group, d)), rng.normal(size=(b, t, 2, d))]
  arrays.append(rng.normal(size=(b, t, 2, d + 1)))
  fn = lambda q, k, v, implementation: ops.softplus_attention(
    q, k, v, power=power, implementation=implementation
  )
  _check_against_oracle(fn, arrays, dtype, seed)


@pytest.mark.slow
@given(
  b=batches, tq=st.integers(1, 4), extra=st.integers(0, 6), pad=st.integers(0, 3),
  d=head_dims, power=st.sampled_from([None, 15]), dtype=dtypes, seed=seeds,
)  # fmt: skip
def test_softplus_attention_cached(b, tq, extra, pad, d, power, dtype, seed):
  rng = np.random.default_rng(seed)
  length = tq + extra
  arrays = [rng.normal(size=(b, tq, 2, d))]
  arrays += [rng.normal(size=(b, length + pad, 1, d)) for _ in range(2)]
  fn = lambda q, k, v, implementation: ops.softplus_attention_cached(
    q, k, v, length, power=power, implementation=implementation
  )
  _check_against_oracle(fn, arrays, dtype, seed)


@pytest.mark.slow
@given(
  b=batches, t=lengths, group=st.sampled_from([1, 2]), d=head_dims, dv=head_dims,
  block=st.sampled_from([1, 2, 3, 4, 8, 64]), dtype=dtypes, seed=seeds,
)  # fmt: skip
def test_lucid_attention(b, t, group, d, dv, block, dtype, seed):
  rng = np.random.default_rng(seed)
  arrays = [rng.normal(size=(b, t, 2 * group, d)), rng.normal(size=(b, t, 2, d))]
  arrays.append(rng.normal(size=(b, t, 2, dv)))
  fn = lambda q, k, v, implementation: ops.lucid_attention(
    q, k, v, block_size=block, implementation=implementation
  )
  # The oracle: the token-recurrence solve, then the float64 softmax.
  oracle = lambda q, k, v: _dense_softmax(q, k, ops.lucid_values(k, v, implementation="reference"))
  _check_against_oracle(fn, arrays, dtype, seed, oracle=oracle)


@pytest.mark.slow
@given(
  b=batches, t=lengths, cached=st.integers(0, 6), pad=st.integers(0, 3), d=head_dims,
  block=st.sampled_from([1, 3, 4, 64]), dtype=dtypes, seed=seeds,
)  # fmt: skip
def test_lucid_values_with_and_without_a_cache(b, t, cached, pad, d, block, dtype, seed):
  """With a cache (the decoding path's 'initial state'), the new rows continue
  the solve: they equal the last rows of the solve over the whole sequence."""
  rng = np.random.default_rng(seed)
  k, v = rng.normal(size=(b, cached + t, 2, d)), rng.normal(size=(b, cached + t, 2, 3))

  def fn(k, v, implementation):
    if not cached:
      return lucid_values(k, v, implementation)
    head = lucid_values(k[:, :cached], v[:, :cached], implementation)
    # The cache has `pad` garbage rows past its valid length.
    junk = jnp.full((b, pad, 2, d), 7.0, k.dtype)
    context_keys = jnp.concatenate([k[:, :cached], junk], 1)
    context_values = jnp.concatenate([head, jnp.full((b, pad, 2, 3), 7.0, head.dtype)], 1)
    return ops.lucid_values(
      k[:, cached:], v[:, cached:], context_keys=context_keys, context_values=context_values,
      context_length=cached, block_size=block, implementation=implementation,
    )  # fmt: skip

  def lucid_values(k, v, implementation):
    return ops.lucid_values(k, v, block_size=block, implementation=implementation)

  # V′ comes back in the compute dtype (at least float32).
  out_dtype = "float64" if dtype == "float64" else "float32"
  _check_against_oracle(fn, [k, v], dtype, seed, out_dtype=out_dtype)


# Linear family --------------------------------------------------------------


@given(
  b=batches, t=lengths, h=st.integers(1, 3), d=head_dims, dv=head_dims,
  normalize=st.booleans(), with_state=st.booleans(),
  chunk=st.sampled_from([1, 2, 3, 4, 8, 64]), dtype=dtypes, seed=seeds,
)  # fmt: skip
def test_linear_attention(b, t, h, d, dv, normalize, with_state, chunk, dtype, seed):
  rng = np.random.default_rng(seed)
  if normalize:  # positive feature maps (as elu + 1 gives) keep the normaliser away from 0
    q, k = (rng.uniform(0.1, 1.5, (b, t, h, d)) for _ in range(2))
  else:
    q, k = (rng.normal(size=(b, t, h, d)) for _ in range(2))
  arrays = [q, k, rng.normal(size=(b, t, h, dv))]
  if with_state:
    arrays.append(rng.normal(size=(b, h, d, dv)))
    if normalize:
      arrays.append(rng.uniform(0.5, 2.0, (b, h, d)))

  def fn(q, k, v, *state, implementation):
    initial = None if not state else (tuple(state) if normalize else state[0])
    return ops.linear_attention(
      q, k, v, normalize=normalize, initial_state=initial, output_final_state=True,
      chunk_size=chunk, implementation=implementation,
    )  # fmt: skip

  _check_against_oracle(fn, arrays, dtype, seed)


def _delta_inputs(rng, b, t, h, hv, dk, dv):
  q, k = _unit(rng.normal(size=(b, t, h, dk))), _unit(rng.normal(size=(b, t, h, dk)))
  v = rng.normal(size=(b, t, hv, dv))
  g = -np.log1p(np.exp(-rng.normal(size=(b, t, hv)) - 2.0))  # log-sigmoid: decay near 1
  beta = 1 / (1 + np.exp(-rng.normal(size=(b, t, hv))))
  return [q, k, v, g, beta]


@pytest.mark.slow
@given(
  b=batches, t=lengths, h=st.integers(1, 2), group=st.sampled_from([1, 2, 3]), dk=head_dims,
  dv=head_dims, with_state=st.booleans(), chunk=st.sampled_from([1, 2, 3, 4, 8, 64]),
  dtype=dtypes, seed=seeds,
)  # fmt: skip
def test_gated_delta_rule(b, t, h, group, dk, dv, with_state, chunk, dtype, seed):
  rng = np.random.default_rng(seed)
  hv = h * group
  arrays = _delta_inputs(rng, b, t, h, hv, dk, dv)
  if with_state:
    arrays.append(0.5 * rng.normal(size=(b, hv, dk, dv)))

  def fn(q, k, v, g, beta, *state, implementation):
    return ops.gated_delta_rule(
      q, k, v, g, beta, initial_state=state[0] if state else None, output_final_state=True,
      chunk_size=chunk, implementation=implementation,
    )  # fmt: skip

  _check_against_oracle(fn, arrays, dtype, seed)


@pytest.mark.slow
@given(
  b=batches, t=lengths, h=st.integers(1, 2), dk=head_dims, dv=head_dims,
  block=st.sampled_from([1, 2, 3, 4, 8]), dtype=dtypes, seed=seeds,
)  # fmt: skip
def test_nats_l_block_ops(b, t, h, dk, dv, block, dtype, seed):
  """Both block-routed ops, with random 0/1 block types (gradients reach the gates)."""
  rng = np.random.default_rng(seed)
  n = -(-t // block)
  q, k, v, g, beta = _delta_inputs(rng, b, t, h, h, dk, dv)
  write, visible = (rng.integers(0, 2, (b, n, h)).astype(np.float64) for _ in range(2))
  delta = lambda q, k, v, g, beta, write, implementation: ops.block_gated_delta_rule(
    q, k, v, g, beta, write, block_size=block, implementation=implementation
  )
  _check_against_oracle(delta, [q, k, v, g, beta, write], dtype, seed)
  softmax = lambda q, k, v, visible, implementation: ops.block_sparse_softmax(
    q, k, v, visible, block_size=block, implementation=implementation
  )
  _check_against_oracle(softmax, [q, k, v, visible], dtype, seed)


# SOFT -----------------------------------------------------------------------


@pytest.mark.slow
@given(
  b=batches, t=lengths, split=st.integers(0, 6), h=st.integers(1, 2),
  d=st.sampled_from([3, 5, 6, 7, 8]), dv=head_dims, m=st.integers(1, 7),
  normalize=st.booleans(), chunk=st.sampled_from([1, 3, 4, 64]), dtype=dtypes, seed=seeds,
)  # fmt: skip
def test_soft_attention(b, t, split, h, d, dv, m, normalize, chunk, dtype, seed):
  """split > 0 runs the first `split` tokens, then the rest from their state
  (initial_state on); the oracle is the explicit T×T Nyström matrix."""
  rng = np.random.default_rng(seed)
  total = split + t
  q, v = 0.6 * rng.normal(size=(b, total, h, d)), rng.normal(size=(b, total, h, dv))
  landmarks = rng.normal(size=(h, m, d))
  kw = dict(normalize=normalize, chunk_size=chunk)

  def fn(q, v, landmarks, implementation):
    if implementation == "reference" or not split:
      out, _ = ops.soft_attention(q, v, landmarks, implementation=implementation, **kw)
      return out[:, split:]
    _, state = ops.soft_attention(
      q[:, :split], v[:, :split], landmarks, output_final_state=True, **kw
    )
    out, _ = ops.soft_attention(q[:, split:], v[:, split:], landmarks, initial_state=state, **kw)
    return out

  _check_against_oracle(fn, [q, v, landmarks], dtype, seed)


@given(
  batch=st.integers(1, 3), m=st.integers(1, 9), cond=st.floats(1.0, 10.0),
  dtype=dtypes, seed=seeds,
)  # fmt: skip
def test_newton_inverse(batch, m, cond, dtype, seed):
  """(A + ridge·I)⁻¹ of SPD matrices against a float64 direct inverse; the
  gradient is the exact inverse's −Xᵀ G Xᵀ."""
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.normal(size=(batch, m, m)))
  a = np.einsum("bij,j,bkj->bik", basis, np.geomspace(1.0, 1.0 / cond, m), basis)

  def fn(a, implementation):
    if implementation == "reference":
      return jnp.linalg.inv(a + 0.01 * jnp.eye(m, dtype=a.dtype))
    return ops.newton_inverse(a, iters=30, ridge=0.01)

  out_dtype = "float64" if dtype == "float64" else "float32"
  _check_against_oracle(fn, [a], dtype, seed, out_dtype=out_dtype)
