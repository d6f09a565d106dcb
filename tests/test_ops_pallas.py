"""Flash kernels (attnlab.ops.flash) against the xla path: forward and every gradient.

On a CPU the TPU kernels run in TPU interpret mode and the GPU kernels in
Pallas (HLO) interpret mode, which checks their semantics, not their lowering.
Tests marked `gpu` run the real GPU lowering and skip without a GPU (see
conftest.py). Shapes are small because interpret mode is slow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnlab import ops
from attnlab.ops.flash import pallas_gpu as flash_gpu
from attnlab.ops.softmax import pallas_gpu as softmax_gpu
from attnlab.ops.softmax import pallas_tpu as softmax_tpu
from attnlab.ops.softplus import pallas_gpu as softplus_gpu
from attnlab.ops.softplus import pallas_tpu as softplus_tpu

# Relative to the largest reference entry: f32 kernels differ from the xla path
# by summation order only; bf16 kernels round weights to bf16 before the MXU.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
GRAD_TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 4e-2}
TPU_BLOCKS = dict(block_q=128, block_k=128)
# Unequal q/kv tiles in every kernel exercise the partial-diagonal logic.
GPU_BLOCKS = flash_gpu.BlockSizes(64, 32, 32, 64, 64, 32)


def _inputs(seed, t, heads, kv_heads, dim, dtype, batch=1, spread=1.0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, t, heads, dim)) * spread
  k = rng.normal(size=(batch, t, kv_heads, dim))
  v = rng.normal(size=(batch, t, kv_heads, dim))
  logit_scale = rng.uniform(0.5, 2.0, size=(batch, t, heads))
  cot = rng.normal(size=(batch, t, heads, dim))
  cast = lambda a: jnp.asarray(a, dtype)
  return cast(q), cast(k), cast(v), jnp.asarray(logit_scale, jnp.float32), cast(cot)


def _close(got, want, tol, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got)), what
  scale = max(float(np.max(np.abs(want))), 1e-30)
  err = float(np.max(np.abs(got - want))) / scale
  assert err <= tol, f"{what}: max error {err:.2e} of max |ref| {scale:.2e} > {tol:.0e}"


def _check(kernel, xla, args, cot, dtype, grad_tolerance=None, tolerance=None):
  """Forward and gradients (w.r.t. every argument) of kernel vs xla, one compile each."""

  def value_and_grads(f):
    def run(*a):
      out, vjp = jax.vjp(lambda *x: f(*x).astype(jnp.float32), *a)
      return out, vjp(cot.astype(jnp.float32))

    return run

  out, got = jax.jit(value_and_grads(kernel))(*args)
  ref, want = value_and_grads(xla)(*args)
  _close(out, ref, tolerance or TOLERANCE[dtype], "forward")
  for i, (g, w) in enumerate(zip(got, want)):
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(jnp.isfinite(w))), f"gradient {i}"
    _close(g, w, grad_tolerance or GRAD_TOLERANCE[dtype], f"gradient {i}")


def _softmax(module, **options):
  kernel = lambda q, k, v, ls: module.softmax_attention(q, k, v, logit_scale=ls, **options)
  xla = lambda q, k, v, ls: ops.softmax_attention(q, k, v, logit_scale=ls, implementation="xla")
  return kernel, xla


def _softplus(module, power, **options):
  kernel = lambda q, k, v: module.softplus_attention(q, k, v, power=power, **options)
  xla = lambda q, k, v: ops.softplus_attention(q, k, v, power=power, implementation="xla")
  return kernel, xla


# --- TPU kernels, interpreted ----------------------------------------------------------------
# Most cases use plain HLO interpret mode (interpret=True) for speed; the race
# test and the public-API test run the default TPU interpret mode
# (pltpu.InterpretParams), which also simulates VMEM and NaN-fills
# uninitialised memory.


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_softmax_gqa_logit_scale_ragged_t(dtype):
  # T = 300: three 128-blocks, the last one mostly padding; 4 query heads on 2 kv heads.
  q, k, v, ls, cot = _inputs(0, 300, 4, 2, 64, dtype)
  _check(*_softmax(softmax_tpu, interpret=True, **TPU_BLOCKS), (q, k, v, ls), cot, dtype)


@pytest.mark.slow
@pytest.mark.parametrize(
  "power,dtype",
  [(None, jnp.float32), (15.0, jnp.float32), (15.0, jnp.bfloat16)],
)
def test_tpu_softplus_gqa_ragged_t(power, dtype):
  q, k, v, _, cot = _inputs(1, 300, 4, 2, 64, dtype)
  _check(*_softplus(softplus_tpu, power, interpret=True, **TPU_BLOCKS), (q, k, v), cot, dtype)


@pytest.mark.slow
def test_tpu_softmax_long_rows_with_extreme_logits():
  # Key norms grow along the sequence and logits reach ~400, so the running max
  # jumps by more than 104 between kv blocks: exp(m_old - m_new) underflows to
  # 0 and only a correct online rescale reproduces the dense softmax.
  t = 640
  q, k, v, ls, cot = _inputs(2, t, 2, 1, 64, jnp.float32)
  k = k * jnp.linspace(0.1, 4.0, t)[None, :, None, None]
  ls = ls * 20.0
  logits = jnp.einsum("bqhd,bkd->bhqk", q, k[:, :, 0]) * jnp.moveaxis(ls, 1, 2)[..., None] / 8
  assert float(jnp.max(jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, 0))) > 300
  # d/d logit_scale sums logit-sized terms (|u|/ls ~ 20) that cancel: in float32
  # both paths carry ~1e-7·|u| rounding per term, hence the looser tolerance.
  # Forward too: exp of logits ~400 carries float32 rounding of ~400·6e-8 ≈ 2.4e-5.
  kernel, xla = _softmax(softmax_tpu, interpret=True, **TPU_BLOCKS)
  _check(kernel, xla, (q, k, v, ls), cot, jnp.float32, grad_tolerance=2e-3, tolerance=5e-5)


@pytest.mark.slow
def test_tpu_lssar_long_rows_and_vanishing_rows():
  # Long rows: Z and the row max accumulate over five kv blocks before the
  # second pass. Zero queries give uniform rows, which LSSAR sends to exactly 0
  # from row 4 on, with finite gradients (a zero vector normalises to 0).
  t = 640
  q, k, v, _, cot = _inputs(3, t, 1, 1, 64, jnp.float32, spread=3.0)
  zero_rows = jnp.arange(t) % 7 == 5
  q = jnp.where(zero_rows[None, :, None, None], 0.0, q)
  kernel, xla = _softplus(softplus_tpu, 15.0, interpret=True, **TPU_BLOCKS)
  out = jax.jit(kernel)(q, k, v)
  np.testing.assert_array_equal(np.asarray(out)[0, 5::7], 0.0)
  _check(kernel, xla, (q, k, v), cot, jnp.float32)


@pytest.mark.slow
def test_tpu_race_detector_finds_no_races_on_two_cores():
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  # Two simulated cores split the "parallel" grid axes between them.
  q, k, v, ls, cot = _inputs(4, 200, 1, 1, 32, jnp.float32)
  kernel, xla = _softmax(softmax_tpu, interpret=params, **TPU_BLOCKS)
  _check(kernel, xla, (q, k, v, ls), cot, jnp.float32)
  assert tpu_interpret.races is not None and not tpu_interpret.races.races_found


@pytest.mark.slow
def test_public_ops_dispatch_to_the_tpu_kernels():
  # Default block sizes and interpret mode, through the public API (and LUCID's softmax part).
  q, k, v, ls, _ = _inputs(5, 130, 2, 1, 32, jnp.float32)
  calls = {  # name: (f(q, k, v, ls, implementation), whether 'pallas_tpu' runs a kernel)
    "softmax": (lambda q, k, v, ls, impl: ops.softmax_attention(
      q, k, v, logit_scale=ls, implementation=impl), True),
    "lssa": (lambda q, k, v, ls, impl: ops.softplus_attention(q, k, v, implementation=impl), True),
    "lucid": (lambda q, k, v, ls, impl: ops.lucid_attention(q, k, v, implementation=impl), True),
    # Decoding against a cache keeps working: kernel names run xla there.
    "cached": (lambda q, k, v, ls, impl: ops.softmax_attention_cached(
      q[:, -1:], k, v, 130, implementation=impl), False),
  }  # fmt: skip

  @jax.jit
  def both(q, k, v, ls):
    return {
      impl: [f(q, k, v, ls, impl) for f, _ in calls.values()] for impl in ("pallas_tpu", "xla")
    }

  out = both(q, k, v, ls)
  for name, got, want in zip(calls, out["pallas_tpu"], out["xla"]):
    _close(got, want, 2e-5, name)
  # Equal values would also come from a silent fallback to xla: the kernel
  # paths must trace to a Pallas call, and the xla path (and decoding) to none.
  for name, (f, has_kernel) in calls.items():
    for impl, expected in (("pallas_tpu", has_kernel), ("xla", False)):
      jaxpr = str(jax.make_jaxpr(functools.partial(f, impl=impl))(q, k, v, ls))
      assert ("pallas_call" in jaxpr) == expected, (name, impl)


def test_defaults_and_dtype_errors():
  q = jnp.zeros((1, 8, 2, 16), jnp.float32)
  if jax.default_backend() == "cpu":
    # None means the xla path on a CPU: the very same program as implementation='xla'
    # (values alone would not tell: zero inputs give 0 on every path).
    default = jax.make_jaxpr(lambda q: ops.softmax_attention(q, q, q))(q)
    xla = jax.make_jaxpr(lambda q: ops.softmax_attention(q, q, q, implementation="xla"))(q)
    reference = jax.make_jaxpr(
      lambda q: ops.softmax_attention(q, q, q, implementation="reference")
    )(q)
    assert str(default) == str(xla) != str(reference)
  with pytest.raises(ValueError, match="unknown implementation"):
    ops.softplus_attention(q, q, q, implementation="cudnn")
  with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
    softmax_tpu.softmax_attention(*(q.astype(jnp.int32),) * 3)


# --- GPU kernels, Pallas (HLO) interpret mode on a CPU ---------------------------------------


@pytest.mark.slow
def test_gpu_kernel_interpreted_softmax():
  q, k, v, ls, cot = _inputs(6, 150, 4, 2, 64, jnp.bfloat16)
  kernel, xla = _softmax(softmax_gpu, blocks=GPU_BLOCKS, interpret=True)
  _check(kernel, xla, (q, k, v, ls), cot, jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("power", [None, 15.0])
def test_gpu_kernel_interpreted_softplus(power):
  q, k, v, _, cot = _inputs(7, 100, 2, 1, 48, jnp.float32)  # head_dim padded to 64
  kernel, xla = _softplus(softplus_gpu, power, blocks=GPU_BLOCKS, interpret=True)
  _check(kernel, xla, (q, k, v), cot, jnp.float32)


# --- real GPU --------------------------------------------------------------------------------


def _gpu_case(seed, t=1000, heads=8, kv_heads=2, dim=128):
  return _inputs(seed, t, heads, kv_heads, dim, jnp.bfloat16, batch=2)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pallas_gpu", "cudnn"])
def test_gpu_softmax_on_device(impl):
  q, k, v, ls, cot = _gpu_case(10)
  kernel = lambda q, k, v, ls: ops.softmax_attention(q, k, v, logit_scale=ls, implementation=impl)
  _, xla = _softmax(softmax_gpu)
  _check(kernel, xla, (q, k, v, ls), cot, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("power", [None, 3.0, 15.0])
def test_gpu_softplus_on_device(power):
  q, k, v, _, cot = _gpu_case(11)
  kernel = functools.partial(ops.softplus_attention, power=power, implementation="pallas_gpu")
  _, xla = _softplus(softplus_gpu, power)
  _check(kernel, xla, (q, k, v), cot, jnp.bfloat16)


@pytest.mark.gpu
def test_gpu_none_picks_a_kernel():
  q, k, v, _, _ = _gpu_case(12, t=256)
  from attnlab.ops.softmax import api

  assert api._DISPATCH.best(q, k, v) in ("cudnn", "pallas_gpu")
  out = ops.softmax_attention(q, k, v)
  _close(out, ops.softmax_attention(q, k, v, implementation="xla"), 2e-2, "default")
