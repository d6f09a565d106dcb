"""Gated delta rule Pallas kernels (pallas_tpu, pallas_gpu) against the xla path and
the float64 recurrence: output, final state and the gradient of every input.

On a CPU the TPU kernels run in TPU interpret mode and the GPU kernels in
Pallas (HLO) interpret mode, which checks their math, not their lowering; the
lowering is checked by compiling for real TPU targets (slow: libtpu's compiler
on this host) and lowering for CUDA (Triton IR). Shapes are small and T ragged
(not a multiple of the chunk), with grouped value heads (GVA), an initial
state, packed segments and split value blocks spread over the cases.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnlab import ops
from attnlab.ops.chunk_state import _common as common
from attnlab.ops.gated_delta import pallas_gpu, pallas_tpu
from attnlab.ops.gated_delta import reference as gdn_reference
from tests.conftest import compile_for_tpu, lower_for_cuda

MODULES = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}
NAMES = ("q", "k", "v", "g", "beta", "initial_state")
# Max error relative to the largest reference entry. f32: the kernels and the
# xla path differ in summation order only. bf16: both round q, k, v, W, U and
# the chunk-start state to bf16 before their matmuls, so against the float64
# recurrence (fed the same bf16-rounded inputs) they sit at bf16's 2^-8 scale.
TOLERANCE = {
  jnp.float32: {"xla": 2e-5, "f64": 2e-5, "grad_xla": 1e-4, "grad_f64": 1e-4},
  jnp.bfloat16: {"xla": 3e-2, "f64": 3e-2, "grad_xla": 6e-2, "grad_f64": 6e-2},
}


def _inputs(seed, t, heads, v_heads, dk, dv, dtype, segments=False):
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # L2-normed as in GDN
  q = unit(rng.normal(size=(1, t, heads, dk)))
  k = unit(rng.normal(size=(1, t, heads, dk)))
  v = rng.normal(size=(1, t, v_heads, dv))
  g = -np.log1p(np.exp(-rng.normal(size=(1, t, v_heads)) + 1.0))  # log decay < 0
  beta = 1 / (1 + np.exp(-rng.normal(size=(1, t, v_heads))))
  s0 = 0.5 * rng.normal(size=(1, v_heads, dk, dv))
  cot_o = rng.normal(size=(1, t, v_heads, dv))
  cot_s = rng.normal(size=(1, v_heads, dk, dv))
  args = [jnp.asarray(a, dtype) for a in (q, k, v)]
  args += [jnp.asarray(a, jnp.float32) for a in (g, beta, s0)]
  seg = None
  if segments:  # three documents, one boundary inside a chunk and one on a chunk edge
    ids = np.zeros((1, t), np.int32)
    ids[:, 11:] = 1
    ids[:, 32:] = 2
    seg = jnp.asarray(ids)
  return args, (jnp.asarray(cot_o, jnp.float32), jnp.asarray(cot_s, jnp.float32)), seg


def _value_and_grads(f, cots):
  """(o, final, gradients of ⟨o, cot_o⟩ + ⟨final, cot_s⟩ w.r.t. every argument)."""

  def run(*args):
    (o, final), vjp = jax.vjp(lambda *a: tuple(x.astype(cots[0].dtype) for x in f(*a)), *args)
    return o, final, vjp(tuple(c.astype(o.dtype) for c in cots))

  return run


def _close(got, want, tol, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)), f"{what}: not finite"
  scale = max(float(np.max(np.abs(want))), 1e-30)
  err = float(np.max(np.abs(got - want))) / scale
  assert err <= tol, f"{what}: max error {err:.2e} of max |ref| {scale:.2e} > {tol:.0e}"
  return err


def _reference_f64(args, cots, seg, scale):
  """The explicit recurrence in float64 on the same (dtype-rounded) inputs."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    a64 = [jnp.asarray(np.asarray(a, np.float32), jnp.float64) for a in args]
    c64 = [jnp.asarray(np.asarray(c), jnp.float64) for c in cots]

    def f(q, k, v, g, beta, s0):
      return gdn_reference.gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=s0, chunk_size=1, segment_ids=seg
      )

    o, final, grads = _value_and_grads(f, c64)(*a64)
    return [np.asarray(x) for x in (o, final, *grads)]
  finally:
    jax.config.update("jax_enable_x64", previous)


def _check(
  module_name, dtype, *, t, heads, v_heads, dk, dv, chunk, segments, against_xla=True, **options
):
  args, cots, seg = _inputs(0, t, heads, v_heads, dk, dv, dtype, segments)
  scale = dk**-0.5

  def kernel(q, k, v, g, beta, s0):
    return MODULES[module_name].gated_delta_rule(
      q, k, v, g, beta, scale=scale, initial_state=s0, chunk_size=chunk, segment_ids=seg,
      **options,
    )  # fmt: skip

  def xla(q, k, v, g, beta, s0):
    return ops.gated_delta_rule(
      q, k, v, g, beta, scale=scale, initial_state=s0, output_final_state=True,
      chunk_size=chunk, segment_ids=seg, implementation="xla",
    )  # fmt: skip

  got = jax.jit(_value_and_grads(kernel, cots))(*args)
  got = [got[0], got[1], *got[2]]
  if against_xla:
    want = jax.jit(_value_and_grads(xla, cots))(*args)
    want = [want[0], want[1], *want[2]]
  exact = _reference_f64(args, cots, seg, scale)
  tol = TOLERANCE[dtype]
  assert got[0].shape == (1, t, v_heads, dv) and got[1].shape == (1, v_heads, dk, dv)
  for i, what in enumerate(("output", "final state", *(f"d{name}" for name in NAMES))):
    kind = "" if i < 2 else "grad_"
    if against_xla:
      _close(got[i], want[i], tol[kind + "xla"], f"{what} vs xla")
    _close(got[i], exact[i], tol[kind + "f64"], f"{what} vs float64 recurrence")


# Each case spreads the features over the two backends; T is never a multiple of the chunk.
CASES = [
  # TPU interpret mode with out-of-bounds and uninitialised-memory checks, GVA (2 -> 4 heads).
  ("pallas_tpu", jnp.float32, dict(t=45, heads=2, v_heads=4, dk=32, dv=32, chunk=16,
                                   segments=False, interpret=pltpu.InterpretParams())),
  # Packed documents and two value blocks per head.
  ("pallas_gpu", jnp.float32, dict(t=50, heads=1, v_heads=2, dk=32, dv=32, chunk=16,
                                   segments=True, block_v=16)),
  ("pallas_tpu", jnp.bfloat16, dict(t=50, heads=1, v_heads=2, dk=32, dv=32, chunk=16,
                                    segments=True, interpret=True, against_xla=False)),
  ("pallas_gpu", jnp.bfloat16, dict(t=45, heads=2, v_heads=4, dk=32, dv=64, chunk=16,
                                    segments=False, against_xla=False)),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
  "module_name,dtype,case",
  CASES,
  ids=["tpu-f32-gva", "gpu-f32-segments-vblocks", "tpu-bf16-segments", "gpu-bf16-gva"],
)
def test_kernel_matches_xla_and_recurrence(module_name, dtype, case):
  _check(module_name, dtype, **case)


def test_inverse_dtype_is_a_precision_knob():
  """inverse_dtype reaches the in-chunk inverse: bf16 moves W and U a little, float32 not."""
  args, _, _ = _inputs(1, 48, 1, 2, 32, 32, jnp.float32)
  heads = lambda x: jnp.swapaxes(x, 1, 2)
  k, v, g, beta = heads(args[1]), heads(args[2]), heads(args[3]), heads(args[4])
  run = jax.jit(
    lambda dtype: common.prepare(k, v, g, beta, None, chunk=16, inverse_dtype=dtype),
    static_argnums=0,
  )
  _, w32, u32 = run(jnp.float32)
  _, w16, u16 = run(jnp.bfloat16)
  for got, want in ((w16, w32), (u16, u32)):
    err = _close(got, want, 3e-2, "bf16 inverse")
    assert err > 1e-4, "the knob changed nothing"


def test_rejects_bad_options():
  args, _, _ = _inputs(0, 20, 1, 1, 16, 16, jnp.float32)
  with pytest.raises(ValueError, match="chunk_size"):
    pallas_tpu.gated_delta_rule(*args[:5], scale=1.0, chunk_size=12)
  with pytest.raises(ValueError, match="chunk_size"):
    pallas_gpu.gated_delta_rule(*args[:5], scale=1.0, chunk_size=48)
  with pytest.raises(ValueError, match="float32"):
    pallas_gpu.gated_delta_rule(*(a.astype(jnp.int32) for a in args[:3]), *args[3:5], scale=1.0)


# --- real compilers on this host ---------------------------------------------------------


def _shapes(t, dtype, heads=2, group=2, d=128, segments=False):
  s = jax.ShapeDtypeStruct
  hv = heads * group
  args = [s((1, t, heads, d), dtype), s((1, t, heads, d), dtype), s((1, t, hv, d), dtype)]
  args += [s((1, t, hv), jnp.float32), s((1, t, hv), jnp.float32), s((1, hv, d, d), jnp.float32)]
  if segments:
    args.append(s((1, t), jnp.int32))
  return args


def _fwd_bwd(module, **options):
  def loss(q, k, v, g, beta, s0, seg=None):
    o, final = module.gated_delta_rule(
      q, k, v, g, beta, scale=0.1, initial_state=s0, segment_ids=seg, interpret=False, **options
    )
    return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final)

  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_tpu_kernels_compile(topology):
  """Forward and backward (three Mosaic calls) built by libtpu's compiler at a ragged T (about
  20 s of CPU per target at T=200). Skips where libtpu is missing."""
  compiled, hlo = compile_for_tpu(_fwd_bwd(pallas_tpu), _shapes(200, jnp.bfloat16), topology)
  assert hlo.count("tpu_custom_call") == 3, "forward, state recompute and backward kernels"
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes > 0


def test_gpu_kernels_lower_for_cuda():
  text = lower_for_cuda(_fwd_bwd(pallas_gpu), _shapes(300, jnp.bfloat16, segments=True))
  assert text.count("xla.gpu.triton") == 3, "forward, state recompute and backward kernels"
