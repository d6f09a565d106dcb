"""Test setup: 8 simulated CPU devices, shared helpers and fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (compile-only TPU targets) takes a lock per process unless told that
# several processes (pytest-xdist workers) may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import functools  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "shakespeare"


@pytest.fixture
def x64():
  """float64 for the duration of one test (gradient checks)."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  for item in items:
    for marker in ("gpu", "tpu"):
      if marker in item.keywords and backend != marker:
        item.add_marker(pytest.mark.skip(reason=f"needs a {marker.upper()}"))


# --- real accelerator compilers on this CPU host -------------------------------------------

TPU_TARGETS = ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")


@functools.cache
def tpu_mesh(topology: str) -> jax.sharding.Mesh:
  """A one-device mesh on a compile-only TPU of `topology` (needs libtpu)."""
  from jax.experimental import topologies

  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as error:  # noqa: BLE001 - libtpu missing or refusing: skip with the reason
    pytest.skip(f"no TPU compiler here (pip install 'jax[tpu]'): {type(error).__name__}: {error}")
  return jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))


def compile_for_tpu(fn, args, topology: str):
  """Compiles `fn(*args)` (ShapeDtypeStructs) for one chip of `topology` with
  the real TPU compiler; returns (compiled, lowered HLO text)."""
  mesh = tpu_mesh(topology)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  placed = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
  lowered = jax.jit(fn).lower(*placed)
  return lowered.compile(), lowered.as_text()


def lower_for_cuda(fn, args) -> str:
  """Lowers `fn(*args)` for CUDA on this host (Pallas GPU kernels go to Triton
  IR; only the PTX compilation is left out); returns the lowered text."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def value_and_grads(fn, argnums):
  """Forward and backward of `fn` in one program: sum of its float32 output, and gradients."""
  return jax.value_and_grad(lambda *a: fn(*a).astype(np.float32).sum(), argnums=argnums)
