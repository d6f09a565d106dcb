"""The flash kernels built by the real accelerator compilers, on this CPU host.

* TPU: every `pallas_tpu` kernel, forward and backward in one program, compiled
  by libtpu's compiler (compile-only devices from `jax.experimental.topologies`)
  for v5e, v5p and v6e; the cases rotate dtype and head dim (64, 128 and 68,
  lucid_1b's) over the generations so that every kernel meets each of them.
  Skips with the reason where libtpu is missing.
* GPU: every `pallas_gpu` kernel, forward and backward, lowered for CUDA
  (Triton IR; PTX compilation needs a GPU).
* Dispatch: `implementation=None` follows the compile target, not the host.
* x64: the kernels run with jax_enable_x64 on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import hardware, ops
from attnlab.ops import _dispatch
from tests.conftest import compile_for_tpu, lower_for_cuda, tpu_mesh, value_and_grads

T = 1000  # not a multiple of any block: padding and masking are compiled too
# Kernels in one forward and backward program: the forward (LSSAR's two
# passes), then dq and dk/dv. Fewer means part of it ran on the XLA path.
KERNELS = {"softmax": 3, "splash": 3, "lssa": 3, "lssar": 5}


def _args(t, heads, kv_heads, d, dtype, batch=1):
  q = jax.ShapeDtypeStruct((batch, t, heads, d), dtype)
  k = jax.ShapeDtypeStruct((batch, t, kv_heads, d), dtype)
  ls = jax.ShapeDtypeStruct((batch, t, heads), jnp.float32)
  return q, k, k, ls


def _op(kind, implementation):
  """(f(q, k, v, ls), argnums) of the public op for a kernel kind ('splash':
  softmax, which None sends to splash attention on TPU)."""
  if kind in ("softmax", "splash"):  # GQA and SSA's per-query logit_scale (None: without)
    f = lambda q, k, v, ls: ops.softmax_attention(
      q, k, v, logit_scale=ls, implementation=implementation
    )
    return f, (0, 1, 2, 3)
  power = {"lssa": None, "lssar": 15.0}[kind]
  f = lambda q, k, v, ls: ops.softplus_attention(
    q, k, v, power=power, implementation=implementation
  )
  return f, (0, 1, 2)


# (topology, kind, dtype, head_dim): each kernel meets every dtype and head dim.
TPU_CASES = [
  ("v5e:2x2", "softmax", jnp.bfloat16, 128),
  ("v5e:2x2", "lssa", jnp.float32, 68),
  ("v5e:2x2", "lssar", jnp.bfloat16, 64),
  ("v5p:2x2x1", "softmax", jnp.float32, 68),
  ("v5p:2x2x1", "lssa", jnp.bfloat16, 64),
  ("v5p:2x2x1", "lssar", jnp.bfloat16, 128),
  ("v6e:2x2", "softmax", jnp.bfloat16, 64),
  ("v6e:2x2", "lssa", jnp.bfloat16, 128),
  ("v6e:2x2", "lssar", jnp.float32, 68),
  ("v5e:2x2", "splash", jnp.float32, 68),
  ("v5p:2x2x1", "splash", jnp.bfloat16, 64),
  ("v6e:2x2", "splash", jnp.bfloat16, 128),
]


@pytest.mark.slow
@pytest.mark.parametrize("topology,kind,dtype,d", TPU_CASES)
def test_tpu_kernel_compiles(topology, kind, dtype, d):
  # implementation=None: the op must pick the TPU kernel because the program is
  # compiled for a TPU, although this process's backend is the CPU. Softmax's
  # None is splash attention ('splash' cases); our flash kernel is named.
  f, argnums = _op(kind, "pallas_tpu" if kind == "softmax" else None)
  compiled, hlo = compile_for_tpu(value_and_grads(f, argnums), _args(T, 8, 2, d, dtype), topology)
  assert hlo.count("tpu_custom_call") == KERNELS[kind], "XLA compiled instead of a Mosaic kernel"
  memory = compiled.memory_analysis()
  chip = hardware.chip(tpu_mesh(topology).devices.flat[0].device_kind)
  used = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
  assert 0 < used < chip.hbm_bytes


def _packed(kind):
  """(f(q, k, v, ls, segment_ids), argnums): a kernel backend's op on packed documents."""
  from attnlab.ops.softmax import pallas_tpu as softmax_tpu
  from attnlab.ops.softmax import splash
  from attnlab.ops.softplus import pallas_tpu as softplus_tpu

  if kind in ("softmax", "splash"):
    module = splash if kind == "splash" else softmax_tpu
    return (
      lambda q, k, v, ls, seg: module.softmax_attention(q, k, v, logit_scale=ls, segment_ids=seg),
      (0, 1, 2, 3),
    )
  power = {"lssa": None, "lssar": 15.0}[kind]
  f = lambda q, k, v, ls, seg: softplus_tpu.softplus_attention(
    q, k, v, power=power, segment_ids=seg
  )
  return f, (0, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize(
  "topology,kind,dtype,d",
  [("v5e:2x2", "lssar", jnp.bfloat16, 128), ("v6e:2x2", "softmax", jnp.float32, 68),
   ("v5p:2x2x1", "splash", jnp.bfloat16, 64)],
)  # fmt: skip
def test_tpu_kernel_compiles_with_segments(topology, kind, dtype, d):
  # Packed documents: int32 segment ids [B, T] beside the operands; the flash
  # kernels scalar-prefetch per-block document starts, splash maps over the batch.
  f, argnums = _packed(kind)
  args = (*_args(T, 8, 2, d, dtype, batch=2), jax.ShapeDtypeStruct((2, T), jnp.int32))
  _, hlo = compile_for_tpu(value_and_grads(f, argnums), args, topology)
  assert hlo.count("tpu_custom_call") == KERNELS[kind], "XLA compiled instead of a Mosaic kernel"


@pytest.mark.parametrize("kind", ["softmax", "lssa", "lssar"])
def test_gpu_kernel_lowers_for_cuda(kind):
  f, argnums = _op(kind, None)

  def kernel(q, k, v, ls):  # interpret=False: the real Triton lowering
    if kind == "softmax":
      from attnlab.ops.softmax import pallas_gpu

      return pallas_gpu.softmax_attention(q, k, v, logit_scale=ls, interpret=False)
    from attnlab.ops.softplus import pallas_gpu

    return pallas_gpu.softplus_attention(
      q, k, v, power=None if kind == "lssa" else 15.0, interpret=False
    )

  text = lower_for_cuda(value_and_grads(kernel, argnums), _args(300, 4, 2, 68, jnp.bfloat16))
  # Forward (on a GPU LSSAR's two passes are one kernel), dq and dk/dv.
  assert text.count("__gpu$xla.gpu.triton") == 3, "part of it ran on the XLA path"


@pytest.mark.parametrize("kind", ["softmax", "lssar"])
def test_gpu_kernel_lowers_for_cuda_with_segments(kind):
  from attnlab.ops.softmax import pallas_gpu as softmax_gpu
  from attnlab.ops.softplus import pallas_gpu as softplus_gpu

  def kernel(q, k, v, ls, seg):  # packed documents, the real Triton lowering
    if kind == "softmax":
      return softmax_gpu.softmax_attention(
        q, k, v, logit_scale=ls, segment_ids=seg, interpret=False
      )
    return softplus_gpu.softplus_attention(q, k, v, power=15.0, segment_ids=seg, interpret=False)

  argnums = (0, 1, 2, 3) if kind == "softmax" else (0, 1, 2)
  args = (*_args(300, 4, 2, 68, jnp.bfloat16, batch=2), jax.ShapeDtypeStruct((2, 300), jnp.int32))
  text = lower_for_cuda(value_and_grads(kernel, argnums), args)
  assert text.count("__gpu$xla.gpu.triton") == 3, "part of it ran on the XLA path"


def test_dispatch_follows_the_compile_target():
  q, k, v, ls = _args(256, 4, 2, 64, jnp.bfloat16)
  picked = {}

  def spy(x):
    picked["target"] = _dispatch.target_platform(x)
    picked["softmax"] = ops.softmax_attention.__globals__["_DISPATCH"].best(x, x, x)
    return x

  jax.jit(spy).lower(q)  # no mesh: the host's backend
  assert picked == {"target": "cpu", "softmax": "xla"}
  mesh = tpu_mesh("v5e:2x2")
  picked.clear()
  with jax.set_mesh(mesh):  # a TPU mesh in context
    jax.jit(spy).lower(q)
  assert picked == {"target": "tpu", "softmax": "splash"}
  picked.clear()  # else the mesh case's answer would pass for this one
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jax.jit(spy).lower(jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=sharding))  # in_shardings
  assert picked == {"target": "tpu", "softmax": "splash"}
  assert _dispatch.interpret_default("tpu", jnp.zeros(3)) is True  # host arrays: interpret
  assert _dispatch.interpret_default("cpu", jnp.zeros(3)) is False


def _gpu_mesh() -> jax.sharding.AbstractMesh:
  """A one-device CUDA mesh without a GPU: what a trace for an H200 sees."""
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
  return jax.sharding.AbstractMesh((1,), ("data",), abstract_device=device)


def test_none_picks_the_gpu_kernel_of_every_op_for_a_gpu_target():
  """Under a CUDA mesh `implementation=None` reaches each op's GPU kernel: the
  CUDA lowering of forward + backward holds the kernel's Triton calls (on this
  CPU host, outside the mesh, the same calls take the xla path: no Triton)."""
  b, t, h, d, block = 1, 256, 2, 64, 64
  x = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  per_token = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
  blocks = jax.ShapeDtypeStruct((b, t // block, h), jnp.float32)
  cases = {  # op -> (fn, args, Triton calls in forward + backward)
    "lucid_values": (lambda k, v: ops.lucid_values(k, v, block_size=block), (x, x), 2),
    "softplus_attention": (lambda q, k, v: ops.softplus_attention(q, k, v), (x, x, x), 3),
    "linear_attention": (lambda q, k, v: ops.linear_attention(q, k, v)[0], (x, x, x), 3),
    "gated_delta_rule": (
      lambda q, k, v, g, beta: ops.gated_delta_rule(q, k, v, g, beta)[0],
      (x, x, x, per_token, per_token),
      3,
    ),
    "block_sparse_softmax": (
      lambda q, k, v, gate: ops.block_sparse_softmax(q, k, v, gate, block_size=block),
      (x, x, x, blocks),
      3,
    ),
  }
  for name, (fn, args, kernels) in cases.items():
    grads = jax.grad(
      lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32) ** 2), argnums=tuple(range(len(args)))
    )
    with jax.sharding.use_abstract_mesh(_gpu_mesh()):
      text = lower_for_cuda(grads, args)
    assert text.count("__gpu$xla.gpu.triton") == kernels, name
    assert lower_for_cuda(grads, args).count("__gpu$xla.gpu.triton") == 0, f"{name} on the host"


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("kind", ["softmax", "lssar"])
def test_kernels_run_under_x64(x64, impl, kind):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 40, 2, 32)), jnp.float32) for _ in range(3))
  f, _ = _op(kind, impl)
  g = lambda *a: f(*a, None).sum()
  out, grads = jax.value_and_grad(g, (0, 1, 2))(q, k, v)
  want, want_grads = jax.value_and_grad(lambda *a: _op(kind, "xla")[0](*a, None).sum(), (0, 1, 2))(
    q, k, v
  )
  np.testing.assert_allclose(out, want, rtol=1e-4)
  for got, ref in zip(grads, want_grads):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * float(np.max(np.abs(ref))))
  # float64 inputs never reach a kernel: None picks the xla path.
  q64 = q.astype(jnp.float64)
  assert ops.softmax_attention.__globals__["_DISPATCH"].best(q64, q64, q64) == "xla"
