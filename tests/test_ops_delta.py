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


def _numpy_gated_delta(q, k, v, g, beta, state, scale, segment_ids=None):
  """An independent float64 loop over time, batch and heads (state zeroed where the
  segment id changes)."""
  q, k, v, g, beta, s = (np.array(a, np.float64) for a in (q, k, v, g, beta, state))
  b, t, h, _ = q.shape
  hv = v.shape[2]
  seg = np.zeros((b, t), int) if segment_ids is None else np.asarray(segment_ids)
  out = np.zeros((b, t, hv, v.shape[-1]))
  for bi in range(b):
    for hi in range(hv):
      qk_head = hi // (hv // h)
      st = s[bi, hi]
      for ti in range(t):
        if ti and seg[bi, ti] != seg[bi, ti - 1]:
          st = np.zeros_like(st)
        st = np.exp(g[bi, ti, hi]) * st
        kt = k[bi, ti, qk_head]
        u = beta[bi, ti, hi] * (v[bi, ti, hi] - st.T @ kt)
        st = st + np.outer(kt, u)
        out[bi, ti, hi] = st.T @ (scale * q[bi, ti, qk_head])
      s[bi, hi] = st
  return out, s


def _segments(b, t, seed):
  """[b, t] int32 document ids: row 0 several documents (some shorter than a chunk,
  one boundary exactly on a chunk edge), row 1 one document."""
  seg = np.zeros((b, t), np.int32)
  cuts = sorted({3, 8, 9, 17} | set(np.random.default_rng(seed).integers(1, t, 2).tolist()))
  for c in cuts:
    if c < t:
      seg[0, c:] += 1
  return jnp.asarray(seg)


@pytest.mark.parametrize("hv,packed", [(None, False), (4, False), (4, True), (None, True)])
def test_gated_delta_matches_float64_loop(x64, hv, packed):
  q, k, v, g, beta, state = _inputs(0, t=21, hv=hv, dtype=jnp.float64)
  seg = _segments(2, 21, 0) if packed else None
  expected_o, expected_s = _numpy_gated_delta(q, k, v, g, beta, state, 8**-0.5, seg)
  for impl in ("xla", "reference"):
    o, s = ops.gated_delta_rule(
      q, k, v, g, beta, initial_state=state, output_final_state=True,
      chunk_size=8, segment_ids=seg, implementation=impl,
    )  # fmt: skip
    assert o.dtype == jnp.float64
    np.testing.assert_allclose(o, expected_o, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(s, expected_s, rtol=1e-11, atol=1e-11)


@pytest.mark.slow
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


@pytest.mark.slow
def test_gated_delta_gradients_match_finite_differences(x64):
  q, k, v, g, beta, state = _inputs(4, b=1, t=11, h=1, dk=4, dv=3, dtype=jnp.float64)
  f = lambda *a: ops.gated_delta_rule(
    *a[:5], initial_state=a[5], output_final_state=True, chunk_size=4
  )
  check_grads(jax.jit(f), (q, k, v, g, beta, state), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
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


@pytest.mark.parametrize("hv,packed,t,chunk", [(4, True, 29, 8), (2, False, 13, 4)])
def test_gated_delta_every_gradient_matches_float64_recurrence(x64, hv, packed, t, chunk):
  """xla vs the recurrence in float64: o, final state and the gradients of q, k, v,
  g, beta and initial_state, with GVA, ragged T and packed documents."""
  q, k, v, g, beta, state = _inputs(11, t=t, dk=8, dv=4, hv=hv, dtype=jnp.float64)
  seg = _segments(2, t, 1) if packed else None
  rng = np.random.default_rng(12)
  cot_o = jnp.asarray(rng.normal(size=v.shape))
  cot_s = jnp.asarray(rng.normal(size=state.shape))

  def loss(impl, *args):
    o, s = ops.gated_delta_rule(
      *args[:5], initial_state=args[5], output_final_state=True, chunk_size=chunk,
      segment_ids=seg, implementation=impl,
    )  # fmt: skip
    return jnp.sum(o * cot_o) + jnp.sum(s * cot_s)

  args = (q, k, v, g, beta, state)
  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=range(1, 7)), static_argnums=0)
  value_x, grads_x = grad_fn("xla", *args)
  value_r, grads_r = grad_fn("reference", *args)
  np.testing.assert_allclose(value_x, value_r, rtol=1e-11)
  for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), grads_x, grads_r):
    assert float(jnp.max(jnp.abs(b))) > 1e-3, name  # a gradient that is really there
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11, err_msg=name)


@pytest.mark.slow
def test_gated_delta_packed_row_equals_separate_documents(x64):
  """A packed row gives each document the outputs and gradients it gets alone;
  the initial state reaches only the first document, the final state is the last's."""
  lengths = (5, 10, 1)
  t = sum(lengths)
  q, k, v, g, beta, state = _inputs(13, b=1, t=t, h=1, dk=4, dv=3, hv=2, dtype=jnp.float64)
  seg = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None], jnp.int32)
  cot = jnp.asarray(np.random.default_rng(14).normal(size=v.shape))
  bounds = np.cumsum((0,) + lengths)

  def packed(q, k, v, g, beta):
    o, s = ops.gated_delta_rule(
      q, k, v, g, beta, initial_state=state, output_final_state=True, chunk_size=8,
      segment_ids=seg,
    )  # fmt: skip
    return jnp.sum(o * cot) + jnp.sum(s), (o, s)

  def separate(q, k, v, g, beta):
    outs, s = [], None
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
      o, s = ops.gated_delta_rule(
        *(a[:, lo:hi] for a in (q, k, v, g, beta)), initial_state=state if i == 0 else None,
        output_final_state=True, chunk_size=8,
      )  # fmt: skip
      outs.append(o)
    o = jnp.concatenate(outs, axis=1)
    return jnp.sum(o * cot) + jnp.sum(s), (o, s)

  args = (q, k, v, g, beta)
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=range(5), has_aux=True))
  (_, (o_p, s_p)), grads_p = grad(packed)(*args)
  (_, (o_s, s_s)), grads_s = grad(separate)(*args)
  np.testing.assert_allclose(o_p, o_s, rtol=1e-11, atol=1e-12)
  np.testing.assert_allclose(s_p, s_s, rtol=1e-11, atol=1e-12)
  for name, a, b in zip("q k v g beta".split(), grads_p, grads_s):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)


def test_gated_delta_step_matches_float64_loop(x64):
  """Three decoding steps with GVA against the float64 loop, and the f32 dtypes."""
  q, k, v, g, beta, state = _inputs(15, t=3, hv=4, dtype=jnp.float64)
  expected_o, expected_s = _numpy_gated_delta(q, k, v, g, beta, state, 0.3)
  s = state
  step = jax.jit(lambda *a: ops.gated_delta_rule_step(*a, scale=0.3))
  for t in range(3):
    o, s = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], s)
    np.testing.assert_allclose(o, expected_o[:, t], rtol=1e-12, atol=1e-13)
  np.testing.assert_allclose(s, expected_s, rtol=1e-12, atol=1e-13)
  o16, s32 = ops.gated_delta_rule_step(
    *(a[:, 0].astype(jnp.bfloat16) for a in (q, k, v)), g[:, 0], beta[:, 0],
    state.astype(jnp.float32),
  )  # fmt: skip
  assert o16.dtype == jnp.bfloat16 and s32.dtype == jnp.float32
  with pytest.raises(ValueError, match="gated_delta_rule_step"):
    ops.gated_delta_rule_step(q, k, v[:, 0], g[:, 0], beta[:, 0], state)


@pytest.mark.slow
def test_gated_delta_bf16_inputs_and_inverse_dtype():
  """bf16 q/k/v (f32 accumulation) against the float64 loop, with the default
  float32 inverse and with inverse_dtype='bfloat16'; GVA and packed rows."""
  q, k, v, g, beta, state = _inputs(16, t=45, hv=4, dv=8)
  seg = _segments(2, 45, 2)
  q16, k16, v16 = (a.astype(jnp.bfloat16) for a in (q, k, v))
  expected, expected_s = _numpy_gated_delta(q16, k16, v16, g, beta, state, 8**-0.5, seg)
  scale = float(np.max(np.abs(expected)))
  for inverse_dtype, tol in ((None, 2e-2), ("bfloat16", 4e-2)):
    run = jax.jit(
      lambda *a, inverse_dtype=inverse_dtype: ops.gated_delta_rule(
        *a, initial_state=state, output_final_state=True, chunk_size=16, segment_ids=seg,
        inverse_dtype=inverse_dtype,
      )
    )  # fmt: skip
    o, s = run(q16, k16, v16, g, beta)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    np.testing.assert_allclose(o.astype(np.float64) / scale, expected / scale, atol=tol)
    np.testing.assert_allclose(s, expected_s, atol=tol * np.max(np.abs(expected_s)))


def _numpy_linear(q, k, v, scale, normalize, segment_ids):
  q, k, v = (np.array(a, np.float64) for a in (q, k, v))
  b, t, h, d = q.shape
  out = np.zeros(v.shape)
  kv = np.zeros((b, h, d, v.shape[-1]))
  z = np.zeros((b, h, d))
  for bi in range(b):
    for ti in range(t):
      if ti and segment_ids[bi, ti] != segment_ids[bi, ti - 1]:
        kv[bi], z[bi] = 0.0, 0.0
      kv[bi] += np.einsum("hd,he->hde", k[bi, ti], v[bi, ti])
      z[bi] += k[bi, ti]
      num = np.einsum("hd,hde->he", q[bi, ti], kv[bi])
      out[bi, ti] = (
        num / np.einsum("hd,hd->h", q[bi, ti], z[bi])[:, None] if normalize else (scale * num)
      )
  return out, kv, z


@pytest.mark.slow
@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attention_packed_segments(x64, normalize):
  """Packed linear attention (xla and reference) against a float64 loop that zeroes
  the state at boundaries, values and final state; gradients xla vs reference."""
  t = 27
  rng = np.random.default_rng(17)
  q, k, v = (jnp.asarray(rng.uniform(0.1, 1.0, (2, t, 2, 4))) for _ in range(3))
  seg = _segments(2, t, 3)
  expected, kv, z = _numpy_linear(q, k, v, 0.5, normalize, np.asarray(seg))
  final = {}
  for impl in ("xla", "reference"):
    o, final[impl] = ops.linear_attention(
      q, k, v, normalize=normalize, scale=0.5, chunk_size=8, segment_ids=seg,
      output_final_state=True, implementation=impl,
    )  # fmt: skip
    np.testing.assert_allclose(o, expected, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(final[impl][0] if normalize else final[impl], kv, rtol=1e-11)
    if normalize:
      np.testing.assert_allclose(final[impl][1], z, rtol=1e-11)

  def loss(impl, q, k, v):
    o, _ = ops.linear_attention(
      q, k, v, normalize=normalize, chunk_size=8, segment_ids=seg, implementation=impl
    )
    return jnp.sum(o * jnp.cos(jnp.arange(o.size).reshape(o.shape)))

  grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
  grads = [grad(impl, q, k, v) for impl in ("xla", "reference")]
  for name, a, b in zip("qkv", *grads):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.parametrize("n", [64, 48])
@pytest.mark.parametrize("form", ["sliced", "masked", "masked_with_barrier"])
def test_unit_lower_inverse_forms_match_float64(n, form):
  """Both forms of the in-chunk inverse (I + A)⁻¹ (sliced recursion on CPUs, masked
  levels on accelerators and in kernels) against numpy's float64 inverse, values and
  the gradient of a weighted sum, in float32, on an A whose inverse grows to 10¹-10³
  (negative entries, as anti-aligned keys give): the products cancel, so a wrong
  block or level would show far above float32 rounding."""
  from jax import lax

  from attnlab.ops import _linalg

  rng = np.random.default_rng(0)
  k = rng.normal(size=(1, 8)) + rng.normal(size=(2, n, 8))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  a = np.tril(-0.3 * np.abs(k @ np.swapaxes(k, -1, -2)), -1)  # [2, n, n]
  w = rng.normal(size=a.shape)
  inverse = {
    "sliced": _linalg._sliced_inverse,
    "masked": lambda x: _linalg._masked_inverse(x, _linalg._matmul),
    "masked_with_barrier": lambda x: _linalg._masked_inverse(
      x, _linalg._matmul, settle=lax.optimization_barrier
    ),
  }[form]
  exact = np.linalg.inv(np.eye(n) + a)
  # d/dA Σ w ⊙ (I + A)⁻¹ = −X⁻ᵀ w X⁻ᵀ, restricted to the strictly lower part A lives on.
  exact_grad = np.tril(-np.swapaxes(exact, -1, -2) @ w @ np.swapaxes(exact, -1, -2), -1)
  a32 = jnp.asarray(a, jnp.float32)
  got = jax.jit(inverse)(a32)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(inverse(jnp.tril(x, -1)) * w)))(a32)
  scale = np.abs(exact).max()
  assert scale > 10  # the entries grow: a real test of the cancellation
  # Measured: 0.6-2.3e-7 of the largest entry for either form.
  np.testing.assert_allclose(got, exact, atol=2e-6 * scale)
  np.testing.assert_allclose(grad, exact_grad, atol=2e-6 * np.abs(exact_grad).max())


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_nats_l_block_delta_continues_from_a_state_in_chunks_of_whole_blocks(impl):
  """Two chunks of whole blocks, the second from the first's final state, equal one call."""
  q, k, v, g, beta, _ = _inputs(11, t=24, dv=8)
  write = jnp.asarray(np.random.default_rng(12).integers(0, 2, (2, 6, 2)), jnp.float32)
  run = lambda sl, w, state: ops.block_gated_delta_rule(
    q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], w,
    block_size=4, initial_state=state, return_final_state=True, implementation=impl,
  )  # fmt: skip
  whole, final = run(slice(None), write, None)
  first, mid = run(slice(0, 12), write[:, :3], None)
  second, end = run(slice(12, 24), write[:, 3:], mid)
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(end, final, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(  # and the plain call (zero state, outputs only) agrees
    ops.block_gated_delta_rule(q, k, v, g, beta, write, block_size=4, implementation=impl),
    whole, rtol=1e-6, atol=1e-6,
  )  # fmt: skip
  with pytest.raises(ValueError, match="whole blocks"):
    run(slice(0, 10), write[:, :3], None)
  with pytest.raises(ValueError, match="initial_state must be"):
    run(slice(0, 12), write[:, :3], jnp.zeros((2, 2, 8, 6)))


def test_nats_l_block_delta_final_states_of_xla_and_reference_agree(x64):
  q, k, v, g, beta, state = _inputs(13, t=16, dv=6, dtype=jnp.float64)
  write, _ = _block_gates(14, 2, 16, 2, 4)
  got = [
    ops.block_gated_delta_rule(
      q, k, v, g, beta, write, block_size=4, initial_state=state, return_final_state=True,
      implementation=impl,
    )
    for impl in ("xla", "reference")
  ]  # fmt: skip
  for a, b in zip(*got):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11)


def _compacted_cache(k, v, gates, done, block, spare):
  """Each head's attention-typed blocks among the first `done`, in order, in
  slots 0 .. n−1 of a cache with `spare` more slots of junk."""
  rng = np.random.default_rng(15)
  b, _, h, _ = k.shape
  slots = [rng.normal(size=(b, done + spare, block, h, a.shape[-1])) for a in (k, v)]
  counts = np.zeros((b, h), np.int32)
  for bi in range(b):
    for hi in range(h):
      kept = [j for j in range(done) if gates[bi, j, hi] > 0]
      for slot, j in enumerate(kept):
        for cache, a in zip(slots, (k, v)):
          cache[bi, slot, :, hi] = np.asarray(a[bi, j * block : (j + 1) * block, hi])
      counts[bi, hi] = len(kept)
  return [jnp.asarray(s, k.dtype) for s in slots], jnp.asarray(counts)


@pytest.mark.parametrize("t_chunk", [8, 11])
def test_nats_l_prefill_softmax_matches_the_whole_sequence(t_chunk):
  """A chunk of whole blocks (8) or ending in a partial block (11) after 3 cached blocks."""
  rng = np.random.default_rng(16)
  b, h, d, dv, block, done = 2, 3, 8, 6, 4, 3
  t = done * block + t_chunk
  n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  q, k, v = n(b, t, h, d), n(b, t, h, d), n(b, t, h, dv)
  gates = rng.integers(0, 2, size=(b, -(-t // block), h)).astype(np.float32)
  gates[0, :, 0] = 0.0  # a head with no attention-typed block at all
  full = ops.block_sparse_softmax(q, k, v, jnp.asarray(gates), block_size=block)
  (k_slots, v_slots), counts = _compacted_cache(k, v, gates, done, block, spare=2)
  chunk = slice(done * block, t)
  results = [
    ops.block_sparse_softmax_prefill(
      q[:, chunk], k[:, chunk], v[:, chunk], jnp.asarray(gates[:, done:]), k_slots, v_slots,
      counts, implementation=impl,
    )
    for impl in ("xla", "reference")
  ]  # fmt: skip
  for got in results:
    np.testing.assert_allclose(got, full[:, chunk], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="num_blocks must be"):
    ops.block_sparse_softmax_prefill(
      q[:, chunk], k[:, chunk], v[:, chunk], jnp.asarray(gates[:, done:]), k_slots, v_slots,
      counts[:, :2],
    )  # fmt: skip
