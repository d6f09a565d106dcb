"""Gated delta rule and NAtS-L block ops against recurrences and float64 loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attnlab import ops


def _inputs(seed, b=2, t=37, h=2, dk=8, dv=6, hv=None, dtype=jnp.float32):
  """Random gated-delta inputs with L2-normalised q, k as Gated DeltaNet feeds them."""
  rng = np.random.default_rng(seed)
  hv = hv or h
  n = lambda *s: rng.normal(size=s)
  q, k = n(b, t, h, dk), n(b, t, h, dk)
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = n(b, t, hv, dv)
  g = np.log(1 / (1 + np.exp(-n(b, t, hv) - 2.0)))  # log-sigmoid: decays near 1
  beta = 1 / (1 + np.exp(-n(b, t, hv)))
  state = 0.5 * n(b, hv, dk, dv)
  return tuple(jnp.asarray(a, dtype) for a in (q, k, v, g, beta, state))


def _numpy_gated_delta(q, k, v, g, beta, state, scale):
  """An independent float64 loop over time, batch and heads."""
  q, k, v, g, beta, s = (np.array(a, np.float64) for a in (q, k, v, g, beta, state))
  b, t, h, _ = q.shape
  hv = v.shape[2]
  out = np.zeros((b, t, hv, v.shape[-1]))
  for bi in range(b):
    for hi in range(hv):
      qk_head = hi // (hv // h)
      st = s[bi, hi]
      for ti in range(t):
        st = np.exp(g[bi, ti, hi]) * st
        kt = k[bi, ti, qk_head]
        u = beta[bi, ti, hi] * (v[bi, ti, hi] - st.T @ kt)
        st = st + np.outer(kt, u)
        out[bi, ti, hi] = st.T @ (scale * q[bi, ti, qk_head])
      s[bi, hi] = st
  return out, s


@pytest.mark.parametrize("hv", [None, 4])
def test_gated_delta_matches_float64_loop(x64, hv):
  q, k, v, g, beta, state = _inputs(0, t=21, hv=hv, dtype=jnp.float64)
  expected_o, expected_s = _numpy_gated_delta(q, k, v, g, beta, state, 8**-0.5)
  for impl in ("xla", "reference"):
    o, s = ops.gated_delta_rule(
      q, k, v, g, beta, initial_state=state, output_final_state=True,
      chunk_size=8, implementation=impl,
    )  # fmt: skip
    assert o.dtype == jnp.float64
    np.testing.assert_allclose(o, expected_o, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(s, expected_s, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("t,chunk", [(37, 16), (64, 64), (5, 64), (70, 32)])
def test_chunked_equals_recurrence_float32_values_and_gradients(t, chunk):
  q, k, v, g, beta, state = _inputs(1, t=t)
  cot_o = jnp.asarray(np.random.default_rng(2).normal(size=v.shape), jnp.float32)
  cot_s = jnp.asarray(np.random.default_rng(3).normal(size=state.shape), jnp.float32)

  def loss(impl, *args):
    o, s = ops.gated_delta_rule(
      *args[:5], initial_state=args[5], output_final_state=True, chunk_size=chunk,
      implementation=impl,
    )  # fmt: skip
    return jnp.sum(o * cot_o) + jnp.sum(s * cot_s), (o, s)

  args = (q, k, v, g, beta, state)
  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=range(1, 7), has_aux=True), static_argnums=0)
  (_, (o_c, s_c)), grads_c = grad_fn("xla", *args)
  (_, (o_r, s_r)), grads_r = grad_fn("reference", *args)
  np.testing.assert_allclose(o_c, o_r, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(s_c, s_r, atol=1e-5, rtol=1e-5)
  for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), grads_c, grads_r):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=name)


def test_gated_delta_gradients_match_finite_differences(x64):
  q, k, v, g, beta, state = _inputs(4, b=1, t=11, h=1, dk=4, dv=3, dtype=jnp.float64)
  f = lambda *a: ops.gated_delta_rule(
    *a[:5], initial_state=a[5], output_final_state=True, chunk_size=4
  )
  check_grads(jax.jit(f), (q, k, v, g, beta, state), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_gated_delta_low_precision_and_errors():
  q, k, v, g, beta, _ = _inputs(5, t=19)
  o16, _ = ops.gated_delta_rule(*(a.astype(jnp.bfloat16) for a in (q, k, v)), g, beta)
  o32, _ = ops.gated_delta_rule(q, k, v, g, beta)
  assert o16.dtype == jnp.bfloat16
  np.testing.assert_allclose(o16.astype(jnp.float32), o32, atol=3e-2)
  with pytest.raises(ValueError, match="multiple of q/k heads"):
    ops.gated_delta_rule(
      q, k, v[:, :, :1].repeat(3, 2), g.repeat(2, 2)[:, :, :3], beta[:, :, :1].repeat(3, 2)
    )
  with pytest.raises(ValueError, match="initial_state"):
    ops.gated_delta_rule(q, k, v, g, beta, initial_state=jnp.zeros((2, 2, 8, 8)))
  with pytest.raises(ValueError, match="unknown implementation"):
    ops.gated_delta_rule(q, k, v, g, beta, implementation="pallas_tpu_typo")


def _numpy_block_ops(q, k, v, g, beta, write, visible, block):
  """float64 loops: NAtS-L's delta path (block-start snapshot) and block-masked softmax."""
  q, k, v, g, beta, write, visible = (
    np.array(a, np.float64) for a in (q, k, v, g, beta, write, visible)
  )
  b, t, h, dk = q.shape
  delta = np.zeros((b, t, h, v.shape[-1]))
  attn = np.zeros_like(delta)
  for bi in range(b):
    for hi in range(h):
      start = np.zeros((dk, v.shape[-1]))
      for blk in range(-(-t // block)):
        st = start.copy()
        rows = range(blk * block, min(t, (blk + 1) * block))
        for ti in rows:
          st = np.exp(g[bi, ti, hi]) * st
          u = beta[bi, ti, hi] * (v[bi, ti, hi] - st.T @ k[bi, ti, hi])
          st = st + np.outer(k[bi, ti, hi], u)
          delta[bi, ti, hi] = st.T @ (q[bi, ti, hi] / np.sqrt(dk))
        if len(rows) == block:
          decayed = np.exp(g[bi, list(rows), hi].sum()) * start
          start = decayed + write[bi, blk, hi] * (st - decayed)
      for ti in range(t):
        keys = np.arange(ti + 1)
        w = np.where(keys // block == ti // block, 1.0, visible[bi, keys // block, hi])
        logits = k[bi, keys, hi] @ q[bi, ti, hi] / np.sqrt(dk)
        p = w * np.exp(logits - logits.max())
        attn[bi, ti, hi] = (p / p.sum()) @ v[bi, keys, hi]
  return delta, attn


def _block_gates(seed, b, t, h, block):
  rng = np.random.default_rng(seed)
  n = -(-t // block)
  return (jnp.asarray(rng.integers(0, 2, (b, n, h)), jnp.float64) for _ in range(2))


@pytest.mark.parametrize("t,block", [(23, 4), (16, 8), (3, 4)])
def test_nats_l_block_ops_match_float64_loops(x64, t, block):
  q, k, v, g, beta, _ = _inputs(6, t=t, dv=8, dtype=jnp.float64)
  write, visible = _block_gates(7, 2, t, 2, block)
  expected_delta, expected_attn = _numpy_block_ops(q, k, v, g, beta, write, visible, block)
  for impl in ("xla", "reference"):
    delta = ops.block_gated_delta_rule(
      q, k, v, g, beta, write, block_size=block, implementation=impl
    )
    attn = ops.block_sparse_softmax(q, k, v, visible, block_size=block, implementation=impl)
    np.testing.assert_allclose(delta, expected_delta, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(attn, expected_attn, rtol=1e-10, atol=1e-11)


def test_nats_l_block_ops_reduce_to_plain_ops_when_every_block_is_one_type(x64):
  q, k, v, g, beta, _ = _inputs(8, t=19, dv=8, dtype=jnp.float64)
  ones = jnp.ones((2, 5, 2), jnp.float64)
  np.testing.assert_allclose(
    ops.block_gated_delta_rule(q, k, v, g, beta, ones, block_size=4),
    ops.gated_delta_rule(q, k, v, g, beta)[0],
    rtol=1e-12, atol=1e-12,
  )  # fmt: skip
  np.testing.assert_allclose(
    ops.block_sparse_softmax(q, k, v, ones, block_size=4),
    ops.softmax_attention(q, k, v),
    rtol=1e-12, atol=1e-12,
  )  # fmt: skip


def test_nats_l_block_ops_gradients_including_gates(x64):
  q, k, v, g, beta, _ = _inputs(9, b=1, t=10, h=1, dk=4, dv=4, dtype=jnp.float64)
  # Gates strictly inside (0, 1) so finite differences see a smooth function.
  write = jnp.asarray([[[0.3], [0.8], [0.6]]])
  visible = jnp.asarray([[[0.7], [0.2], [0.9]]])
  for impl in ("xla", "reference"):
    f = lambda q, k, v, g, beta, m, impl=impl: ops.block_gated_delta_rule(
      q, k, v, g, beta, m, block_size=4, implementation=impl
    )
    check_grads(jax.jit(f), (q, k, v, g, beta, write), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    f = lambda q, k, v, m, impl=impl: ops.block_sparse_softmax(
      q, k, v, m, block_size=4, implementation=impl
    )
    check_grads(jax.jit(f), (q, k, v, visible), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_nats_l_block_ops_reject_wrong_gate_shapes():
  q, k, v, g, beta, _ = _inputs(10, t=9)
  with pytest.raises(ValueError, match="num_blocks"):
    ops.block_sparse_softmax(q, k, q, jnp.ones((2, 2, 2)), block_size=4)
  with pytest.raises(ValueError, match="block_size must be positive"):
    ops.block_gated_delta_rule(q, k, v, g, beta, jnp.ones((2, 3, 2)), block_size=0)
