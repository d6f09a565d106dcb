"""LUCID and softplus attention ops against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attnlab import ops


def _rand(rng, *shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float64)


def _numpy_lucid_values(k, v, eps=1e-5):
  """Dense float64 forward substitution, per batch and head."""
  k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
  b, t, h, d = k.shape
  k_hat = k / np.sqrt(np.mean(k**2, -1, keepdims=True) + eps)
  out = np.zeros_like(v)
  for bi in range(b):
    for hi in range(h):
      kh = k_hat[bi, :, hi]
      lower = np.exp(kh @ kh.T / np.sqrt(d) - np.sqrt(d))
      for i in range(t):
        out[bi, i, hi] = v[bi, i, hi] - lower[i, :i] @ out[bi, :i, hi]
  return out


def _numpy_softmax(q, k, v):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, 2), np.repeat(v, group, 2)
  t = q.shape[1]
  logits = np.einsum("bqhd,bshd->bhqs", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqs,bshd->bqhd", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("block", [4, 64])
def test_lucid_matches_float64_forward_substitution(x64, block):
  rng = np.random.default_rng(0)
  q, k, v = _rand(rng, 2, 19, 4, 6), _rand(rng, 2, 19, 2, 6), _rand(rng, 2, 19, 2, 5)
  expected_v = _numpy_lucid_values(k, v)
  expected = _numpy_softmax(q, k, expected_v)
  for impl in ("xla", "reference"):
    got_v = ops.lucid_values(k, v, block_size=block, implementation=impl)
    np.testing.assert_allclose(got_v, expected_v, rtol=1e-10, atol=1e-11)
    out = ops.lucid_attention(q, k, v, block_size=block, implementation=impl)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-11)


@pytest.mark.slow
def test_lucid_custom_vjp_matches_autodiff_of_a_dense_solve(x64):
  rng = np.random.default_rng(1)
  k, v = _rand(rng, 2, 13, 2, 6), _rand(rng, 2, 13, 2, 5)
  cot = _rand(rng, 2, 13, 2, 5)

  def dense(k, v):
    d = k.shape[-1]
    k_hat = k * jax.lax.rsqrt(jnp.mean(k * k, -1, keepdims=True) + 1e-5)
    k_hat, vt = jnp.moveaxis(k_hat, 2, 1), jnp.moveaxis(v, 2, 1)
    lower = jnp.exp(jnp.einsum("bhtd,bhsd->bhts", k_hat, k_hat) / np.sqrt(d) - np.sqrt(d))
    lower = jnp.where(jnp.tril(jnp.ones((13, 13), bool), -1), lower, 0.0) + jnp.eye(13)
    return jnp.moveaxis(jnp.linalg.solve(lower, vt), 1, 2)

  blocked = lambda k, v: jnp.sum(ops.lucid_values(k, v, block_size=4) * cot)
  reference = lambda k, v: jnp.sum(dense(k, v) * cot)
  got = jax.jit(jax.grad(blocked, (0, 1)))(k, v)
  want = jax.grad(reference, (0, 1))(k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
  f = jax.jit(lambda q, k, v: ops.lucid_attention(q, k, v, block_size=4))
  check_grads(f, (_rand(rng, 1, 9, 2, 6), k[:1, :9], v[:1, :9]), order=1, modes=["rev"])


@pytest.mark.slow
def test_lucid_values_with_a_cache_continue_the_solve(x64):
  rng = np.random.default_rng(2)
  k, v = _rand(rng, 1, 15, 2, 6), _rand(rng, 1, 15, 2, 4)
  full = _numpy_lucid_values(k, v)
  cache_k = jnp.zeros((1, 20, 2, 6)).at[:, :7].set(k[:, :7])
  cache_v = jnp.zeros((1, 20, 2, 4)).at[:, :7].set(full[:, :7])
  for impl in ("xla", "reference"):
    rest = ops.lucid_values(
      k[:, 7:], v[:, 7:], context_keys=cache_k, context_values=cache_v, context_length=7,
      block_size=4, implementation=impl,
    )  # fmt: skip
    np.testing.assert_allclose(rest, full[:, 7:], rtol=1e-10, atol=1e-11)


def _numpy_softplus(q, k, v, power):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, 2), np.repeat(v, group, 2)
  b, t, h, d = q.shape
  out = np.zeros((b, t, h, v.shape[-1]))
  qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
  kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
  for bi in range(b):
    for hi in range(h):
      for row in range(t):
        i = row + 1
        x = np.log(d) * np.log(i) * (kn[bi, :i, hi] @ qn[bi, row, hi])
        a = np.log1p(np.exp(x))
        a /= a.sum()
        if power is not None:
          a = np.maximum(a * i - (0.0 if i <= 3 else 1.0), 0.0)
          a = a / a.max() if a.max() > 0 else a
          a = a**power
          a = a / a.sum() if a.sum() > 0 else a
        out[bi, row, hi] = a @ v[bi, :i, hi]
  return out


@pytest.mark.parametrize("power", [None, 3.0, 15.0])
def test_softplus_matches_float64_loop_and_caches(x64, power):
  rng = np.random.default_rng(3)
  q, k, v = _rand(rng, 2, 17, 4, 8), _rand(rng, 2, 17, 2, 8), _rand(rng, 2, 17, 2, 5)
  expected = _numpy_softplus(q, k, v, power)
  for impl in ("xla", "reference"):
    out = ops.softplus_attention(q, k, v, power=power, implementation=impl)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
  k_cache = jnp.zeros((2, 24, 2, 8)).at[:, :17].set(k)
  v_cache = jnp.zeros((2, 24, 2, 5)).at[:, :17].set(v)
  parts = [ops.softplus_attention_cached(q[:, :6], k_cache, v_cache, 6, power=power)]
  parts += [
    ops.softplus_attention_cached(q[:, t : t + 1], k_cache, v_cache, t + 1, power=power)
    for t in range(6, 17)
  ]
  np.testing.assert_allclose(jnp.concatenate(parts, 1), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("power", [None, 15.0])
def test_softplus_gradients(x64, power):
  rng = np.random.default_rng(4)
  q, k, v = _rand(rng, 1, 9, 2, 4), _rand(rng, 1, 9, 1, 4), _rand(rng, 1, 9, 1, 3)
  f = jax.jit(lambda q, k, v: ops.softplus_attention(q, k, v, power=power))
  check_grads(f, (q, k, v), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)
  g = jax.jit(
    lambda q, k, v: ops.softplus_attention(q, k, v, power=power, implementation="reference")
  )
  cot = _rand(rng, 1, 9, 2, 3)
  for a, b in zip(
    jax.grad(lambda *x: jnp.sum(f(*x) * cot), (0, 1, 2))(q, k, v),
    jax.grad(lambda *x: jnp.sum(g(*x) * cot), (0, 1, 2))(q, k, v),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_softplus_rows_sum_to_one_and_vanishing_rows_output_zero():
  rng = np.random.default_rng(5)
  q, k = (jnp.asarray(rng.normal(size=(1, 40, 2, 16)), jnp.float32) for _ in range(2))
  eye = jnp.broadcast_to(jnp.eye(40, dtype=jnp.float32)[None, :, None, :], (1, 40, 2, 40))
  for power in (None, 15.0):
    # With identity values the output rows are the attention rows themselves.
    rows = ops.softplus_attention(q, k, eye, power=power)
    np.testing.assert_allclose(rows.sum(-1), 1.0, rtol=1e-5)
    assert float(rows.min()) >= 0.0
  # Identical keys give uniform rows; after ReLU(A·i − 1) every row from the
  # 4th on is all zero, and must output 0, not NaN (also in the gradient).
  same = jnp.ones((1, 12, 1, 8))
  f = lambda q: ops.softplus_attention(q, same, same, power=15.0)
  out = f(jnp.ones((1, 12, 1, 8)))
  assert bool(jnp.isfinite(out).all())
  np.testing.assert_array_equal(out[:, 3:], 0.0)
  np.testing.assert_allclose(out[:, :3], 1.0, rtol=1e-6)
  grad = jax.grad(lambda q: jnp.sum(f(q)))(jnp.ones((1, 12, 1, 8)))
  assert bool(jnp.isfinite(grad).all())
