"""Splash attention (`implementation='splash'`, jax's TPU kernel) against the xla
path: forward and every gradient, in TPU interpret mode on this CPU.

Splash serves softmax and the variants that reduce to it: SSA (its per-query
temperature folded into q) and LUCID (softmax over V′). T is ragged (padded
to the tile inside), heads are grouped (GQA), and dense float64 attention closes
the loop for the f32 case. TPU compiles of splash are in
tests/test_compile_targets.py; `implementation=None` choosing it there too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from attnlab.ops.softmax import splash


def _inputs(seed, t, heads, kv_heads, d, dtype):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(2, t, heads, d)), dtype)
  k = jnp.asarray(rng.normal(size=(2, t, kv_heads, d)), dtype)
  v = jnp.asarray(rng.normal(size=(2, t, kv_heads, d)), dtype)
  ls = jnp.asarray(rng.uniform(0.5, 2.0, size=(2, t, heads)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(2, t, heads, d)), jnp.float32)
  return q, k, v, ls, cot


def _value_and_grads(f, q, k, v, ls, cot):
  """f's output and the gradients of <f, cot>, in one jitted program (eager TPU
  interpret mode can stall on its runtime tokens under 8 simulated devices)."""

  @jax.jit
  def run(q, k, v, ls, cot):
    loss = lambda q, k, v, ls: jnp.sum(f(q, k, v, ls).astype(jnp.float32) * cot)
    return f(q, k, v, ls), jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, ls)

  return run(q, k, v, ls, cot)


def _assert_close(got, want, tol, name):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# Relative to the largest reference entry: f32 differs by summation order only;
# bf16 rounds q·scale and the softmax weights to bf16 before the MXU.
CASES = [  # (name, T, heads, kv heads, D, dtype, fwd tol, grad tol)
  ("f32 GQA ragged T", 200, 4, 2, 64, jnp.float32, 2e-5, 1e-4),
  ("f32 MHA D=68", 130, 2, 2, 68, jnp.float32, 2e-5, 1e-4),
  ("bf16 GQA", 256, 4, 1, 128, jnp.bfloat16, 2e-2, 4e-2),
]


@pytest.mark.parametrize("name,t,h,hk,d,dtype,tol,gtol", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("ssa", [False, True], ids=["softmax", "ssa"])
def test_splash_matches_xla(name, t, h, hk, d, dtype, tol, gtol, ssa):
  q, k, v, ls, cot = _inputs(0, t, h, hk, d, dtype)

  def f(impl):
    return lambda q, k, v, ls: ops.softmax_attention(
      q, k, v, logit_scale=ls if ssa else None, implementation=impl
    )

  got, got_grads = _value_and_grads(f("splash"), q, k, v, ls, cot)
  want, want_grads = _value_and_grads(f("xla"), q, k, v, ls, cot)
  assert got.shape == want.shape and got.dtype == q.dtype
  _assert_close(got, want, tol, "output")
  names = ("dq", "dk", "dv", "dlogit_scale")
  for gname, g, w in zip(names, got_grads, want_grads):
    if gname == "dlogit_scale" and not ssa:
      continue
    _assert_close(g, w, gtol, gname)


def test_splash_matches_float64_dense_attention():
  """f32 splash against dense softmax attention computed in float64 (x64 is
  switched on for the reference only: splash's index math does not run under it).
  The dense float64 jnp path, not the per-query oracle: jitted with its
  gradients, the oracle's per-query loop takes minutes to compile."""
  q, k, v, ls, cot = _inputs(1, 150, 4, 2, 32, jnp.float32)
  f = lambda impl: (
    lambda q, k, v, ls: ops.softmax_attention(q, k, v, logit_scale=ls, implementation=impl)
  )
  got, got_grads = _value_and_grads(f("splash"), q, k, v, ls, cot)
  jax.config.update("jax_enable_x64", True)
  try:
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    want, want_grads = _value_and_grads(f("xla"), up(q), up(k), up(v), up(ls), up(cot))
    assert want.dtype == jnp.float64
    _assert_close(got, want, 1e-5, "output")
    for gname, g, w in zip(("dq", "dk", "dv", "dlogit_scale"), got_grads, want_grads):
      _assert_close(g, w, 1e-4, gname)
  finally:
    jax.config.update("jax_enable_x64", False)


def test_splash_under_x64_is_refused_and_none_avoids_it(x64):
  q = jnp.zeros((1, 16, 2, 32), jnp.float32)
  with pytest.raises(ValueError, match="jax_enable_x64"):
    ops.softmax_attention(q, q, q, implementation="splash")
  dispatch = ops.softmax_attention.__globals__["_DISPATCH"]
  tpu = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=None, platform="tpu")
  picked = {}

  def spy(x):  # traced for a TPU: what None picks there
    picked["impl"] = dispatch.best(x, x, x)
    return x

  mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=tpu)
  with jax.sharding.use_abstract_mesh(mesh):
    jax.jit(spy).trace(jax.ShapeDtypeStruct(q.shape, q.dtype))
  assert picked["impl"] == "pallas_tpu"


def test_lucid_softmax_part_on_splash():
  """LUCID with implementation='splash': V′ on the solve path None picks, the
  softmax over V′ on splash; equal to the xla path, gradients included."""
  q, k, v, ls, cot = _inputs(2, 100, 4, 2, 32, jnp.float32)
  f = lambda impl: lambda q, k, v, ls: ops.lucid_attention(q, k, v, block_size=16,
                                                           implementation=impl)  # fmt: skip
  got, got_grads = _value_and_grads(f("splash"), q, k, v, ls, cot)
  want, want_grads = _value_and_grads(f("xla"), q, k, v, ls, cot)
  _assert_close(got, want, 2e-5, "output")
  for gname, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
    _assert_close(g, w, 1e-4, gname)
  jaxpr = str(jax.make_jaxpr(f("splash"))(q, k, v, ls))
  assert "splash_mha_fwd" in jaxpr, "LUCID's softmax did not run splash"


def test_block_sizes_divide_the_padded_length():
  assert splash.block_sizes(8192).block_q == 512
  assert splash.block_sizes(768).block_q == 256
  assert splash.block_sizes(128).block_kv == 128
  for t in (128, 384, 640, 1024, 8192):
    b = splash.block_sizes(t)
    assert t % b.block_q == 0 and t % b.block_kv_dkv == 0
