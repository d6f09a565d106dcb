"""Linear attention on the chunked state-pass kernels (pallas_tpu, pallas_gpu)
against the xla path and the float64 recurrence: output, final state and the
gradient of every input, with and without the normaliser.

On a CPU the kernels run in interpret mode (their math); their lowering is
checked by compiling for a real TPU target and lowering for CUDA. T is ragged
(not a multiple of the chunk); packed segments, an initial state and split
value blocks are spread over the cases.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnlab import ops
from attnlab.ops.linear import pallas_gpu, pallas_tpu
from attnlab.ops.linear import reference as linear_reference
from tests.conftest import compile_for_tpu, lower_for_cuda, tpu_mesh

MODULES = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}
# Max error relative to the largest reference entry. f32: summation order only.
# bf16: q, k, v and the chunk-start state are rounded to bf16 before the
# matmuls (the f64 recurrence gets the same rounded inputs), so errors sit at
# bf16's 2^-8 scale.
TOLERANCE = {jnp.float32: (2e-5, 1e-4), jnp.bfloat16: (3e-2, 6e-2)}


def _inputs(seed, t, heads, dk, dv, dtype, normalize, segments):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(1, t, heads, dk))
  k = rng.normal(size=(1, t, heads, dk))
  if normalize:  # positive feature maps, as the normalised form assumes
    q, k = np.abs(q) + 0.1, np.abs(k) + 0.1
  v = rng.normal(size=(1, t, heads, dv))
  kv0 = 0.5 * rng.normal(size=(1, heads, dk, dv))
  state = (
    (
      jnp.asarray(kv0, jnp.float32),
      jnp.asarray(np.abs(rng.normal(size=(1, heads, dk))), jnp.float32),
    )
    if normalize
    else jnp.asarray(kv0, jnp.float32)
  )
  args = [jnp.asarray(a, dtype) for a in (q, k, v)] + [state]
  cot_o = jnp.asarray(rng.normal(size=(1, t, heads, dv)), jnp.float32)
  cot_s = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), state)
  seg = None
  if segments:  # three documents, one boundary inside a chunk and one on a chunk edge
    ids = np.zeros((1, t), np.int32)
    ids[:, 11:] = 1
    ids[:, 32:] = 2
    seg = jnp.asarray(ids)
  return args, (cot_o, cot_s), seg


def _value_and_grads(f, cots):
  """(o, final, gradients of ⟨o, cot_o⟩ + ⟨final, cot_s⟩ w.r.t. q, k, v and the state)."""

  def run(*args):
    cast = lambda tree, like: jax.tree.map(lambda x, c: x.astype(c.dtype), tree, like)
    (o, final), vjp = jax.vjp(lambda *a: cast(f(*a), cots), *args)
    return o, final, vjp(cots)

  return run


def _close(got, want, tol, what):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.all(np.isfinite(g)), f"{what}: not finite"
    scale = max(float(np.max(np.abs(w))), 1e-30)
    err = float(np.max(np.abs(g - w))) / scale
    assert err <= tol, f"{what}: max error {err:.2e} of max |ref| {scale:.2e} > {tol:.0e}"


def _f64(args, cots, fn):
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    to64 = lambda x: jnp.asarray(np.asarray(x, np.float32), jnp.float64)
    out = _value_and_grads(fn, jax.tree.map(to64, cots))(*jax.tree.map(to64, args))
    return jax.tree.map(np.asarray, out)
  finally:
    jax.config.update("jax_enable_x64", previous)


CASES = [
  # TPU interpret mode with out-of-bounds and uninitialised-memory checks.
  ("pallas_tpu", jnp.float32, False, dict(t=45, heads=2, dk=32, dv=32, chunk=16, segments=False,
                                          interpret=pltpu.InterpretParams())),
  ("pallas_tpu", jnp.float32, True, dict(t=50, heads=1, dk=32, dv=24, chunk=16, segments=True)),
  # Packed documents and two value blocks per head.
  ("pallas_gpu", jnp.float32, False, dict(t=50, heads=1, dk=32, dv=32, chunk=16, segments=True,
                                          block_v=16)),
  ("pallas_gpu", jnp.float32, True, dict(t=45, heads=2, dk=16, dv=32, chunk=16, segments=False)),
  ("pallas_tpu", jnp.bfloat16, False, dict(t=50, heads=1, dk=32, dv=32, chunk=16, segments=True)),
  ("pallas_gpu", jnp.bfloat16, True, dict(t=45, heads=2, dk=32, dv=32, chunk=16, segments=False)),
]  # fmt: skip
IDS = ["tpu-f32", "tpu-f32-norm-segments", "gpu-f32-segments-vblocks", "gpu-f32-norm",
       "tpu-bf16-segments", "gpu-bf16-norm"]  # fmt: skip


@pytest.mark.parametrize("module_name,dtype,normalize,case", CASES, ids=IDS)
def test_kernel_matches_xla_and_recurrence(module_name, dtype, normalize, case):
  case = dict(case)
  t, heads, dk, dv, chunk = (case.pop(n) for n in ("t", "heads", "dk", "dv", "chunk"))
  args, cots, seg = _inputs(0, t, heads, dk, dv, dtype, normalize, case.pop("segments"))
  common = dict(normalize=normalize, output_final_state=True, segment_ids=seg)

  def kernel(q, k, v, s0):
    module = MODULES[module_name]
    return module.linear_attention(q, k, v, initial_state=s0, chunk_size=chunk, **common, **case)

  def xla(q, k, v, s0):
    return ops.linear_attention(
      q, k, v, initial_state=s0, chunk_size=chunk, implementation="xla", **common
    )

  def recurrence(q, k, v, s0):
    return linear_reference.linear_attention(q, k, v, initial_state=s0, **common)

  got = jax.jit(_value_and_grads(kernel, cots))(*args)
  exact = _f64(args, cots, recurrence)
  tol, grad_tol = TOLERANCE[dtype]
  assert got[0].shape == (1, t, heads, dv)
  if dtype == jnp.float32:  # bf16: the xla path on a CPU widens to f32, so f64 is the check
    want = jax.jit(_value_and_grads(xla, cots))(*args)
    _close(got[:2], want[:2], tol, "output and final state vs xla")
    _close(got[2], want[2], grad_tol, "gradients vs xla")
  _close(got[:2], exact[:2], tol, "output and final state vs float64 recurrence")
  _close(got[2], exact[2], grad_tol, "gradients vs float64 recurrence")


@pytest.mark.slow
def test_tpu_kernels_compile():
  """Forward and backward built by libtpu's compiler for v5e at a ragged T, bf16, normalised."""
  s = jax.ShapeDtypeStruct
  shapes = [s((1, 200, 2, 128), jnp.bfloat16)] * 3

  def loss(q, k, v):
    o, _ = pallas_tpu.linear_attention(q, k, v, normalize=True, interpret=False)
    return jnp.sum(o.astype(jnp.float32) ** 2)

  compiled, hlo = compile_for_tpu(jax.grad(loss, argnums=(0, 1, 2)), shapes, "v5e:2x2")
  assert hlo.count("tpu_custom_call") == 3, "forward, state recompute and backward kernels"
  assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_dispatch_picks_the_tpu_kernel_for_a_tpu_target():
  """implementation=None follows the platform compiled for: the kernel for a TPU
  target, the xla path on the CPU. Skips where libtpu is missing."""
  sharding = jax.sharding.NamedSharding(tpu_mesh("v5e:2x2"), jax.sharding.PartitionSpec())
  shapes = [jax.ShapeDtypeStruct((1, 64, 2, 128), jnp.bfloat16, sharding=sharding)] * 3
  fn = lambda q, k, v: ops.linear_attention(q, k, v)[0]
  assert jax.jit(fn).lower(*shapes).as_text().count("tpu_custom_call") == 1
  on_cpu = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in shapes]
  assert "tpu_custom_call" not in jax.jit(fn).lower(*on_cpu).as_text()


def test_output_dtype_follows_the_inputs():
  args, _, _ = _inputs(0, 20, 1, 16, 16, jnp.bfloat16, True, False)
  o, (kv, z) = pallas_gpu.linear_attention(*args[:3], normalize=True, output_final_state=True)
  assert o.dtype == jnp.bfloat16 and kv.dtype == z.dtype == jnp.float32


def test_gpu_kernels_lower_for_cuda():
  shapes = [jax.ShapeDtypeStruct((1, 300, 2, 64), jnp.bfloat16)] * 3 + [
    jax.ShapeDtypeStruct((1, 300), jnp.int32)
  ]

  def loss(q, k, v, seg):
    o, _ = pallas_gpu.linear_attention(q, k, v, segment_ids=seg, interpret=False)
    return jnp.sum(o.astype(jnp.float32) ** 2)

  text = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), shapes)
  assert text.count("xla.gpu.triton") == 3, "forward, state recompute and backward kernels"
