"""The one dispatch convention of `attnlab.ops` (jax and numpy only).

Every public op lives in `attnlab/ops/<op>/api.py` and names its
implementations after the backend modules beside it (`xla.py`,
`reference.py`, `pallas_tpu.py`, `pallas_gpu.py`, ...). An op declares one
`Dispatch`; `Dispatch.module(implementation, *arrays)` validates the name,
picks the best path when it is None, and imports the backend module lazily, so
importing `attnlab.ops` never imports a kernel.

The best path follows the platform the computation is *compiled for*, not
the process's default backend: compiling a model for a TPU topology from a
CPU host (`python -m attnlab.plan`) must select the TPU kernels, and a kernel
must run in interpret mode only where the target lacks its hardware. The
target is read, in order, from the inputs' shardings (jit's in_shardings and
concrete arrays carry their mesh's platform into the trace), the mesh in
context (`jax.set_mesh`), and the legacy `with mesh:` context; otherwise it
is the default backend.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType

import jax
import jax.numpy as jnp

# Inputs the Pallas kernels accept (the one definition every kernel checks
# against); anything else (float64 under x64) takes 'xla'.
_KERNEL_DTYPE_NAMES = ("bfloat16", "float16", "float32")
KERNEL_DTYPES = frozenset(map(jnp.dtype, _KERNEL_DTYPE_NAMES))

_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def _platform_of_mesh(mesh) -> str | None:
  if isinstance(mesh, jax.sharding.AbstractMesh):
    device = mesh.abstract_device
    return None if device is None else device.platform
  if isinstance(mesh, jax.sharding.Mesh) and not mesh.empty:
    return mesh.devices.flat[0].platform
  return None


def _legacy_mesh():
  """The mesh of a `with mesh:` block (jax keeps it outside the public API)."""
  try:
    from jax._src import mesh as mesh_lib  # noqa: PLC0415 - optional private hook
  except ImportError:  # pragma: no cover - a future jax without it
    return None
  return mesh_lib.thread_resources.env.physical_mesh


def target_platform(*arrays: jax.Array | None) -> str:
  """'tpu', 'gpu', 'cpu', ...: the platform these arrays are computed on."""
  for array in arrays:
    if array is None:
      continue
    try:
      sharding = jax.typeof(array).sharding
    except (TypeError, AttributeError):
      continue
    platform = _platform_of_mesh(getattr(sharding, "mesh", None))
    if platform is None and isinstance(array, jax.Array) and not isinstance(array, jax.core.Tracer):
      platform = next(iter(array.devices())).platform  # a concrete array's own devices
    if platform:
      return _PLATFORM_ALIASES.get(platform, platform)
  for mesh in (jax.sharding.get_abstract_mesh(), _legacy_mesh()):
    platform = _platform_of_mesh(mesh) if mesh is not None else None
    if platform:
      return _PLATFORM_ALIASES.get(platform, platform)
  backend = jax.default_backend()
  return _PLATFORM_ALIASES.get(backend, backend)


def kernel_dtype(op_name: str, *arrays: jax.Array) -> jnp.dtype:
  """The arrays' common dtype, which a Pallas kernel takes; ValueError if none does."""
  dtype = jnp.dtype(jnp.result_type(*arrays))
  if dtype not in KERNEL_DTYPES:
    names = ", ".join(_KERNEL_DTYPE_NAMES[:-1]) + " or " + _KERNEL_DTYPE_NAMES[-1]
    raise ValueError(
      f"{op_name}: the Pallas kernels take {names} inputs, got {dtype}; "
      "use implementation='xla' for other dtypes"
    )
  return dtype


def interpret_default(kernel_platform: str, *arrays: jax.Array | None) -> bool:
  """A kernel for `kernel_platform` runs in interpret mode iff the target lacks it."""
  return target_platform(*arrays) != kernel_platform


@dataclasses.dataclass(frozen=True)
class Dispatch:
  """How one op picks and loads its implementation.

  Attributes:
    op: the public name, for error messages.
    package: the op's package, e.g. 'attnlab.ops.softmax'.
    implementations: every accepted `implementation=` name (= module names).
    preferred: platform -> kernels to try in order when `implementation=None`.
    eligible: optional (implementation, arrays) -> bool for shape or dtype
      limits of one kernel beyond KERNEL_DTYPES (e.g. cuDNN's head dims).
  """

  op: str
  package: str
  implementations: tuple[str, ...]
  preferred: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  eligible: Callable[[str, Sequence[jax.Array]], bool] | None = None

  def best(self, *arrays: jax.Array | None) -> str:
    """The fastest path for the compile target and these inputs."""
    present = [a for a in arrays if a is not None]
    # Integer inputs (segment ids) are bookkeeping, not operands.
    operands = [a for a in present if not jnp.issubdtype(a.dtype, jnp.integer)]
    if not all(jnp.dtype(a.dtype) in KERNEL_DTYPES for a in operands):
      return "xla"
    for kernel in self.preferred.get(target_platform(*present), ()):
      if self.eligible is None or self.eligible(kernel, present):
        return kernel
    return "xla"

  def choose(self, implementation: str | None, *arrays: jax.Array | None) -> str:
    if implementation is None:
      return self.best(*arrays)
    if implementation not in self.implementations:
      raise ValueError(
        f"{self.op}: unknown implementation {implementation!r}; choose one of "
        f"{self.implementations} or None."
      )
    return implementation

  def module(self, implementation: str | None, *arrays: jax.Array | None) -> ModuleType:
    return importlib.import_module(f"{self.package}.{self.choose(implementation, *arrays)}")


def per_shard(fn: Callable, *arrays: jax.Array | None):
  """`fn(*arrays)` run once per shard of the batch axis (axis 0 of every array).

  XLA cannot partition a Pallas kernel, so under a multi-device mesh (the
  trainer's `jax.set_mesh`) a kernel call is wrapped in `jax.shard_map` that
  splits the batch over every mesh axis it divides, in mesh order, and keeps
  the other axes whole. Without such a mesh, or inside a shard_map already,
  `fn` runs as it is. The outputs (any pytree) are batch-major too.
  """
  mesh = jax.sharding.get_abstract_mesh()
  present = [a for a in arrays if a is not None]
  if mesh.empty or mesh.size == 1 or not present:
    return fn(*arrays)
  manual = set(getattr(mesh, "manual_axes", ()))
  batch, axes, size = present[0].shape[0], [], 1
  for name, n in mesh.shape.items():
    if n > 1 and name not in manual and batch % (size * n) == 0:
      axes.append(name)
      size *= n
  if not axes:
    return fn(*arrays)
  spec = jax.sharding.PartitionSpec(tuple(axes))
  in_specs = tuple(jax.sharding.PartitionSpec() if a is None else spec for a in arrays)
  # Every axis manual (the others replicate): interpret mode's callbacks need
  # a fully manual computation. check_vma=False: pallas_call outputs carry no
  # varying-axes annotation.
  names = set(mesh.axis_names) - manual
  run = jax.shard_map(fn, in_specs=in_specs, out_specs=spec, axis_names=names, check_vma=False)
  return run(*arrays)
