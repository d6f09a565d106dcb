"""Accelerator compilers on a CPU host: what a kernel costs, read without the hardware.

* **H100** (deviceless CUDA): XLA's CUDA plugin compiles for the target
  description in `gpu_targets/h100_sxm.txtpb` (a `GpuTargetConfigProto`:
  published H100 SXM figures). Pallas → Triton → PTX (`sm_90a`) → cubin, no
  GPU or driver. `ptxas -v` then gives each kernel's registers, spills and
  stack, and its C75xx warnings (wgmma serialised); XLA's dump gives grid,
  threads and shared memory per launch; `cuobjdump -sass` the instruction mix.
  Needs `jax[cuda12-local]` and `nvidia-cuda-nvcc-cu12` (the test extra), and
  `JAX_PLATFORMS=cpu` set before jax is imported, else the plugin fails its
  device check and the cuda topology is never registered.
* **TPU** (libtpu compile-only topologies): the program's temporaries and its
  Mosaic calls from the real compiler; each kernel's grid and the HBM bytes it
  moves per grid step from its BlockSpecs (read off the traced `pallas_call`).

Only jax, numpy and the standard library: this runs wherever `benchmarks/` does.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

H100_TARGET = pathlib.Path(__file__).resolve().parent / "gpu_targets" / "h100_sxm.txtpb"
# cuobjdump and nvdisasm (SASS) go into a directory of their own: installed into
# the jax environment, their `nvidia/cu13` namespace hides ptxas from jax.
CUDA_TOOLS = pathlib.Path(
  os.environ.get("ATTNLAB_CUDA_TOOLS", pathlib.Path.home() / ".cache" / "attnlab" / "cuda_tools")
)
CUDA_TOOL_WHEELS = ("nvidia-cuda-cuobjdump==13.5.37", "nvidia-cuda-nvdisasm==13.5.37")
KERNEL_PREFIX = "attnlab_"  # every attnlab Pallas kernel's name starts with it


class CompilerUnavailable(RuntimeError):
  """The compile-only target cannot be set up on this host (the message says why)."""


# --- targets --------------------------------------------------------------------------------


@functools.cache
def cuda_mesh() -> jax.sharding.Mesh:
  """A one-device mesh on a deviceless H100, or on this host's GPU where it has one
  (`gpu_check.sh` cross-checks the deviceless figures with the device's own compile)."""
  from jax.experimental import topologies

  if jax.default_backend() == "gpu":
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  if os.environ.get("JAX_PLATFORMS", "") != "cpu":
    raise CompilerUnavailable(
      "the deviceless CUDA compiler needs JAX_PLATFORMS=cpu set before jax is imported"
    )
  try:
    topo = topologies.get_topology_desc(
      platform="cuda", topology_name="", target_config=H100_TARGET.read_text(), topology="1x1x1"
    )
  except Exception as error:  # noqa: BLE001 - plugin missing or refusing: say so
    raise CompilerUnavailable(
      "no deviceless CUDA compiler here (pip install 'jax[cuda12-local]==0.10.2' "
      f"nvidia-cuda-nvcc-cu12): {type(error).__name__}: {error}"
    ) from error
  return jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))


@functools.cache
def tpu_mesh(topology: str) -> jax.sharding.Mesh:
  """A one-device mesh on a compile-only TPU of `topology`, e.g. 'v5e:2x2'."""
  from jax.experimental import topologies

  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as error:  # noqa: BLE001
    raise CompilerUnavailable(
      f"no TPU compiler here (pip install 'jax[tpu]'): {type(error).__name__}: {error}"
    ) from error
  return jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))


def placed(args: Sequence[jax.ShapeDtypeStruct], mesh: jax.sharding.Mesh) -> list:
  """The arguments, replicated on `mesh` (so the ops dispatch for its platform)."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]


# --- the traced kernels -----------------------------------------------------------------------


def _subjaxprs(value):
  from jax.extend import core as jcore

  for item in value if isinstance(value, list | tuple) else (value,):
    if isinstance(item, jcore.ClosedJaxpr):
      yield item.jaxpr
    elif isinstance(item, jcore.Jaxpr):
      yield item


def _pallas_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn
    for value in eqn.params.values():
      for sub in _subjaxprs(value):
        yield from _pallas_eqns(sub)


def _block_elements(block_shape) -> int:
  """Elements of one block: Squeezed dims count 1, Blocked(n) and ints count n."""
  n = 1
  for dim in block_shape:
    size = getattr(dim, "block_size", dim)
    n *= 1 if size is None or not isinstance(size, int | np.integer) else int(size)
  return n


def _block_indices(mapping, grid: tuple[int, ...]) -> np.ndarray | None:
  """[steps, ndim] block index of `mapping` at every grid step, in grid order
  (last axis fastest); None where the index map reads scalar-prefetch operands."""
  from jax.extend import core as jcore

  closed = mapping.index_map_jaxpr
  if len(closed.jaxpr.invars) != len(grid):
    return None
  points = np.indices(grid).reshape(len(grid), -1).astype(np.int32)
  run = jax.vmap(lambda *i: jcore.jaxpr_as_fun(closed)(*i))
  with jax.default_device(jax.devices("cpu")[0]):
    out = run(*[jax.numpy.asarray(p) for p in points])
  return np.stack([np.asarray(o) for o in out], axis=1)


def pallas_calls(fn: Callable, args: Sequence, *, traffic: bool = False) -> list[dict]:
  """Every `pallas_call` traced by `fn(*args)`: name, grid and per-step block bytes.

  With `traffic`, also the HBM bytes moved over the whole grid when a block whose
  index does not change between consecutive steps is not fetched (or written)
  again, as the TPU pipeline does (`hbm_bytes_refetch_skipped`; None where an
  index map reads scalar-prefetch operands).
  """
  jaxpr = jax.make_jaxpr(fn)(*args)
  calls = []
  for eqn in _pallas_eqns(jaxpr.jaxpr):
    gm = eqn.params["grid_mapping"]
    grid = tuple(int(g) for g in gm.grid)
    blocks = []
    for mapping in gm.block_mappings:
      aval = mapping.array_aval
      nbytes = _block_elements(mapping.block_shape) * aval.dtype.itemsize
      blocks.append({"origin": str(mapping.origin), "dtype": str(aval.dtype), "bytes": nbytes})
    steps = int(np.prod(grid)) if grid else 1
    arrays = (var.aval for var in (*eqn.invars, *eqn.outvars))
    call = {
      "name": str(eqn.params.get("name") or "pallas_call"),
      "grid": list(grid),
      "grid_steps": steps,
      "hbm_bytes_per_step": sum(b["bytes"] for b in blocks),
      "blocks": blocks,
      # Whole operands and results, for the XLA part's share of the program's bytes.
      "array_bytes": sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays),
    }
    if traffic:
      total = 0
      for mapping, block in zip(gm.block_mappings, blocks):
        idx = _block_indices(mapping, grid) if grid else np.zeros((1, 1), np.int32)
        if idx is None:
          total = None
          break
        changes = 1 + int(np.count_nonzero(np.any(idx[1:] != idx[:-1], axis=1)))
        total += changes * block["bytes"]
      call["hbm_bytes_refetch_skipped"] = total
    calls.append(call)
  return calls


# --- GPU: deviceless compile, ptxas, SASS ---------------------------------------------------


def ptxas_path() -> pathlib.Path:
  from jax._src.lib import cuda_path  # the nvcc wheel jax itself compiles with

  if cuda_path is None or not (pathlib.Path(cuda_path) / "bin" / "ptxas").exists():
    raise CompilerUnavailable("no ptxas (pip install nvidia-cuda-nvcc-cu12)")
  return pathlib.Path(cuda_path) / "bin" / "ptxas"


def cuobjdump_path(install: bool = True) -> pathlib.Path | None:
  """cuobjdump (with nvdisasm beside it), installed once into CUDA_TOOLS if missing."""
  found = shutil.which("cuobjdump")
  if found and shutil.which("nvdisasm"):
    return pathlib.Path(found)
  tool = CUDA_TOOLS / "nvidia" / "cu13" / "bin" / "cuobjdump"
  if not tool.exists() and install:
    subprocess.run(
      [sys.executable, "-m", "pip", "install", "-q", "--target", str(CUDA_TOOLS),
       *CUDA_TOOL_WHEELS],
      check=False, capture_output=True,
    )  # fmt: skip
  return tool if tool.exists() else None


_PTXAS_RE = {
  "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
  "spill_stores": re.compile(r"(\d+) bytes spill stores"),
  "spill_loads": re.compile(r"(\d+) bytes spill loads"),
  "registers": re.compile(r"Used (\d+) registers"),
}
_WGMMA_WARNING = re.compile(r"\((C75\d\d)\) Potential Performance Loss: wgmma.mma_async "
                            r"instructions are serialized due to ([^.]*?) (?:in|for) the function")  # fmt: skip


def ptxas_info(ptx: pathlib.Path, cubin: pathlib.Path) -> dict:
  """Registers, spill bytes, stack and wgmma serialisation of the one kernel in `ptx`."""
  result = subprocess.run(
    [str(ptxas_path()), "-v", "-arch=sm_90a", str(ptx), "-o", str(cubin)],
    capture_output=True, text=True, check=True,
  )  # fmt: skip
  text = result.stdout + result.stderr
  info = {}
  for key, pattern in _PTXAS_RE.items():
    match = pattern.search(text)
    info[key] = int(match.group(1)) if match else 0
  warnings = [f"{code}: {why}" for code, why in _WGMMA_WARNING.findall(text)]
  info["serialized_wgmma"] = "; ".join(warnings) or None
  source = ptx.read_text()
  # Float divides left in the PTX (div.rn / div.full / div.approx); a per-row
  # reciprocal would show as rcp instead.
  info["divides"] = len(re.findall(r"^\s*div\.(?:rn|full|approx)\.f32", source, re.M))
  return info


_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)", re.M)


def sass_stats(cubin: pathlib.Path, cuobjdump: pathlib.Path | None) -> dict:
  """SASS instruction count and mix; None figures without cuobjdump."""
  keys = ("sass_instructions", "hgmma", "hmma", "mufu")
  if cuobjdump is None:
    return dict.fromkeys(keys)
  env = {**os.environ, "PATH": f"{cuobjdump.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
  text = subprocess.run(
    [str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True, env=env, check=False
  ).stdout
  ops = _SASS_LINE.findall(text)
  if not ops:
    return dict.fromkeys(keys)
  count = lambda name: sum(op == name for op in ops)
  return {
    "sass_instructions": len(ops),
    "hgmma": count("HGMMA"),
    "hmma": count("HMMA"),
    "mufu": count("MUFU"),
  }


_THUNK = re.compile(
  r"(\S+) grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]\s+"
  r"shared_memory: (\d+) bytes"
)


def _launches(dump: pathlib.Path) -> list[dict]:
  """Every kernel launch of the compiled program, in order, from XLA's thunk dump."""
  files = sorted(dump.glob("*thunk_sequence.txt"))
  launches = []
  for line in files[0].read_text().splitlines() if files else ():
    match = _THUNK.search(line)
    if match:
      name = match.group(1)
      g = [int(x) for x in match.group(2, 3, 4)]
      th = [int(x) for x in match.group(5, 6, 7)]
      launches.append({"name": name, "grid": g, "threads": int(np.prod(th)),
                       "shared_memory_bytes": int(match.group(8))})  # fmt: skip
  return launches


def _xla_cost(lowered) -> dict:
  """HLO cost analysis (FLOPs, bytes) of the lowered program, by the CPU client's analyser
  (the deviceless GPU compiler returns none of its own)."""
  from jax._src import xla_bridge
  from jax._src.lib import xla_client

  try:
    module = lowered.compiler_ir("hlo").as_hlo_module()
    cost = xla_client._xla.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
  except Exception:  # noqa: BLE001 - a jax without this hook: no figures
    return {"flops": None, "bytes": None}
  return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


def compile_cuda(fn: Callable, args: Sequence, *, sass: bool = True) -> dict:
  """Compiles `fn(*args)` (ShapeDtypeStructs) for an H100 and reads every attnlab kernel.

  Returns {"compile_s", "kernels": [per-kernel dict], "xla": {...}}: per kernel its
  registers, spills, stack, wgmma serialisation, PTX divides, grid, threads and
  shared memory, and (with `sass`) the SASS instruction mix; "xla" is the work
  outside the kernels: its launches and the HLO cost analysis of the program
  less the kernels' operand and result bytes.
  """
  mesh = cuda_mesh()
  args = placed(args, mesh)
  cuobjdump = cuobjdump_path() if sass else None
  with tempfile.TemporaryDirectory(prefix="attnlab-cuda-") as tmp:
    dump = pathlib.Path(tmp)
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    lowered.compile(compiler_options={"xla_dump_to": str(dump)})
    compile_s = time.perf_counter() - start
    launches = _launches(dump)
    ptx_of = {}
    for ptx in dump.glob("*.ptx"):
      match = re.search(r"\.entry\s+(\w+)\(", ptx.read_text())
      if match:
        ptx_of[match.group(1)] = ptx
    device = mesh.devices.flat[0].device_kind
    kernels, seen = [], set()
    for launch in launches:
      name = launch["name"]
      if not name.startswith(KERNEL_PREFIX) or name in seen:
        continue
      seen.add(name)
      if name not in ptx_of:
        raise RuntimeError(f"{name}: launched but no PTX in XLA's dump")
      cubin = dump / f"{name}.cubin"
      row = {"kernel": name, "device": device, **ptxas_info(ptx_of[name], cubin)}
      row.update(sass_stats(cubin, cuobjdump))
      row.update(grid=launch["grid"], threads=launch["threads"],
                 shared_memory_bytes=launch["shared_memory_bytes"])  # fmt: skip
      kernels.append(row)
  others = [launch for launch in launches if not launch["name"].startswith(KERNEL_PREFIX)]
  cost = _xla_cost(lowered)
  if cost["bytes"] is not None:
    kernel_bytes = sum(c["array_bytes"] for c in pallas_calls(fn, args))
    cost["bytes"] = max(0.0, cost["bytes"] - kernel_bytes)
  xla = {
    "launches": len(others),
    "gemm_launches": sum("gemm" in launch["name"] for launch in others),
    **cost,
  }
  return {"compile_s": compile_s, "kernels": kernels, "xla": xla}


# --- TPU --------------------------------------------------------------------------------------


def compile_tpu(fn: Callable, args: Sequence, topology: str) -> dict:
  """Compiles `fn(*args)` for one chip of `topology`; the program's figures and,
  per kernel, its grid and HBM bytes per step (from the BlockSpecs)."""
  mesh = tpu_mesh(topology)
  args = placed(args, mesh)
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  calls = pallas_calls(fn, args, traffic=True)  # placed args: the TPU kernels are traced
  program = {
    "compile_s": compile_s,
    "temporaries_bytes": int(memory.temp_size_in_bytes),
    "mosaic_calls": compiled.as_text().count("tpu_custom_call"),
    "flops": float(cost.get("flops", 0.0)),
    "bytes": max(
      0.0, float(cost.get("bytes accessed", 0.0)) - sum(c["array_bytes"] for c in calls)
    ),
  }
  return {"program": program, "kernels": calls}
