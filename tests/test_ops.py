"""attnlab.ops against independent float64 oracles: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attnlab import ops


def _rand(rng, *shape, dtype=jnp.float64):
  return jnp.asarray(rng.normal(size=shape), dtype)


def _numpy_softmax_attention(q, k, v, logit_scale=None):
  """A third, loop-free float64 reference in numpy (dense mask)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, d = q.shape
  group = h // k.shape[2]
  k, v = np.repeat(k, group, 2), np.repeat(v, group, 2)
  logits = np.einsum("bqhd,bshd->bhqs", q, k) / np.sqrt(d)
  if logit_scale is not None:
    logits = logits * np.transpose(np.asarray(logit_scale), (0, 2, 1))[..., None]
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqs,bshd->bqhd", w, v)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("with_logit_scale", [False, True])
def test_softmax_values_match_float64_references(x64, heads, kv_heads, with_logit_scale):
  rng = np.random.default_rng(0)
  q, k, v = (
    _rand(rng, 2, 19, heads, 8),
    _rand(rng, 2, 19, kv_heads, 8),
    _rand(rng, 2, 19, kv_heads, 8),
  )
  ls = jnp.asarray(rng.uniform(0.5, 3.0, (2, 19, heads))) if with_logit_scale else None
  expected = _numpy_softmax_attention(q, k, v, ls)
  for impl in ("xla", "reference"):
    out = ops.softmax_attention(q, k, v, logit_scale=ls, implementation=impl)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_softmax_gradients(x64):
  rng = np.random.default_rng(1)
  q, k, v = _rand(rng, 1, 13, 4, 8), _rand(rng, 1, 13, 2, 8), _rand(rng, 1, 13, 2, 8)
  ls = jnp.asarray(rng.uniform(0.5, 2.0, (1, 13, 4)))
  f = lambda q, k, v, ls: ops.softmax_attention(q, k, v, logit_scale=ls, implementation="xla")
  check_grads(f, (q, k, v, ls), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
  cot = _rand(rng, 1, 13, 4, 8)
  grads = {}
  for impl in ("xla", "reference"):
    loss = lambda *a, impl=impl: jnp.sum(
      ops.softmax_attention(*a[:3], logit_scale=a[3], implementation=impl) * cot
    )
    grads[impl] = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, ls)
  for a, b in zip(grads["xla"], grads["reference"]):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_softmax_cached_decoding_equals_full(x64):
  rng = np.random.default_rng(2)
  q, k, v = _rand(rng, 2, 11, 4, 8), _rand(rng, 2, 11, 2, 8), _rand(rng, 2, 11, 2, 8)
  full = ops.softmax_attention(q, k, v)
  k_cache = jnp.zeros((2, 16, 2, 8)).at[:, :11].set(k)
  v_cache = jnp.zeros((2, 16, 2, 8)).at[:, :11].set(v)
  # A 5-token prefill chunk, then one token at a time.
  parts = [ops.softmax_attention_cached(q[:, :5], k_cache, v_cache, 5)]
  parts += [
    ops.softmax_attention_cached(q[:, t : t + 1], k_cache, v_cache, t + 1) for t in range(5, 11)
  ]
  np.testing.assert_allclose(jnp.concatenate(parts, 1), full, rtol=1e-12, atol=1e-12)


def test_softmax_keeps_low_precision_dtype_and_accuracy():
  rng = np.random.default_rng(3)
  q, k, v = (_rand(rng, 1, 33, 2, 16, dtype=jnp.float32) for _ in range(3))
  out = ops.softmax_attention(
    q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  )
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), _numpy_softmax_attention(q, k, v), atol=3e-2)


def _numpy_linear_attention(q, k, v, normalize, kv0=None, z0=None):
  """Explicit float64 recurrence in numpy."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, d = q.shape
  kv = np.zeros((b, h, d, v.shape[-1])) if kv0 is None else np.array(kv0, np.float64)
  z = np.zeros((b, h, d)) if z0 is None else np.array(z0, np.float64)
  out = np.zeros(v.shape)
  for i in range(t):
    kv += np.einsum("bhd,bhe->bhde", k[:, i], v[:, i])
    z += k[:, i]
    num = np.einsum("bhd,bhde->bhe", q[:, i], kv)
    out[:, i] = (
      num / np.einsum("bhd,bhd->bh", q[:, i], z)[..., None] if normalize else num / np.sqrt(d)
    )
  return out, kv, z


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("t,chunk", [(1, 16), (37, 16), (37, 64), (48, 16)])
def test_linear_matches_recurrence_with_initial_state(x64, normalize, t, chunk):
  rng = np.random.default_rng(4)
  q, k, v = _rand(rng, 2, t, 3, 8), _rand(rng, 2, t, 3, 8), _rand(rng, 2, t, 3, 6)
  if normalize:  # a positive feature map keeps the normaliser away from 0
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
  kv0 = _rand(rng, 2, 3, 8, 6)
  z0 = jnp.abs(_rand(rng, 2, 3, 8))
  init = (kv0, z0) if normalize else kv0
  expected, kv, z = _numpy_linear_attention(q, k, v, normalize, kv0, z0 if normalize else None)
  for impl in ("xla", "reference"):
    o, final = ops.linear_attention(
      q,
      k,
      v,
      normalize=normalize,
      initial_state=init,
      output_final_state=True,
      chunk_size=chunk,
      implementation=impl,
    )
    np.testing.assert_allclose(o, expected, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(final[0] if normalize else final, kv, rtol=1e-11, atol=1e-11)
    if normalize:
      np.testing.assert_allclose(final[1], z, rtol=1e-11, atol=1e-11)


@pytest.mark.slow
@pytest.mark.parametrize("normalize", [False, True])
def test_linear_gradients(x64, normalize):
  rng = np.random.default_rng(5)
  q, k, v = _rand(rng, 1, 21, 2, 4), _rand(rng, 1, 21, 2, 4), _rand(rng, 1, 21, 2, 4)
  if normalize:
    q, k = jnp.abs(q) + 0.5, jnp.abs(k) + 0.5
  kv0 = _rand(rng, 1, 2, 4, 4)
  init = (kv0, jnp.abs(_rand(rng, 1, 2, 4))) if normalize else kv0

  def f(q, k, v, init, impl="xla"):
    o, s = ops.linear_attention(
      q,
      k,
      v,
      normalize=normalize,
      initial_state=init,
      output_final_state=True,
      chunk_size=8,
      implementation=impl,
    )
    return o, s

  check_grads(f, (q, k, v, init), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
  cot = _rand(rng, 1, 21, 2, 4)
  g = [
    jax.grad(lambda *a, impl=impl: jnp.sum(f(*a, impl=impl)[0] * cot), argnums=(0, 1, 2, 3))(
      q, k, v, init
    )
    for impl in ("xla", "reference")
  ]
  for a, b in zip(jax.tree.leaves(g[0]), jax.tree.leaves(g[1])):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_linear_recurrent_split_equals_parallel():
  """A 10-token prefix, then one token at a time with the carried state, equals
  one parallel pass (outputs and final state)."""
  rng = np.random.default_rng(6)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 29, 2, 8)), jnp.float32) for _ in range(3))
  whole, final = ops.linear_attention(q, k, v, output_final_state=True, chunk_size=8)
  first, state = ops.linear_attention(
    q[:, :10], k[:, :10], v[:, :10], output_final_state=True, chunk_size=8
  )
  steps = [first]
  for t in range(10, 29):
    o, state = ops.linear_attention(
      q[:, t : t + 1],
      k[:, t : t + 1],
      v[:, t : t + 1],
      initial_state=state,
      output_final_state=True,
    )
    steps.append(o)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), whole, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state, final, rtol=1e-5, atol=1e-5)


def test_bad_inputs_give_clear_errors():
  x = jnp.zeros((1, 4, 3, 8))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    ops.softmax_attention(x, jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)))
  with pytest.raises(ValueError, match="batch, time, heads, head_dim"):
    ops.softmax_attention(x[0], x[0], x[0])
  with pytest.raises(ValueError, match="unknown implementation"):
    ops.softmax_attention(x, x, x, implementation="triton")
  with pytest.raises(ValueError, match="logit_scale"):
    ops.softmax_attention(x, x, x, logit_scale=jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="linear_attention expects"):
    ops.linear_attention(x, jnp.zeros((1, 5, 3, 8)), x)
