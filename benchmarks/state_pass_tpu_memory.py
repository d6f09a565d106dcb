"""Compiled TPU footprint of the chunked state-pass kernels against the xla paths.

    python -m benchmarks.state_pass_tpu_memory [--seq_lens=2048,8192] [--topologies=...]

For the gated delta rule (GVA: H q/k heads, 2H value heads) and linear
attention, forward + backward in bf16, this compiles each path with libtpu's
real compiler for one chip of each TPU generation (compile only, on this
host) and reports the compiled temporaries, arguments and compile seconds.
No TPU is needed; results go to
benchmarks/results/state_pass_tpu_memory_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from attnlab import ops  # noqa: E402
from benchmarks import _timing  # noqa: E402


def _programs(b: int, t: int, h: int, d: int, sharding):
  spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  hv = 2 * h
  gdn_args = (spec(b, t, h, d), spec(b, t, h, d), spec(b, t, hv, d),
              spec(b, t, hv, dtype=jnp.float32), spec(b, t, hv, dtype=jnp.float32))  # fmt: skip
  lin_args = (spec(b, t, h, d),) * 3

  def gdn(impl):
    def loss(q, k, v, g, beta):
      o, _ = ops.gated_delta_rule(q, k, v, g, beta, implementation=impl)
      return jnp.sum(o.astype(jnp.float32) ** 2)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4)), gdn_args

  def linear(impl):
    def loss(q, k, v):
      o, _ = ops.linear_attention(q, k, v, implementation=impl)
      return jnp.sum(o.astype(jnp.float32) ** 2)

    return jax.grad(loss, argnums=(0, 1, 2)), lin_args

  return {"gated_delta_rule": gdn, "linear_attention": linear}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_lens", default="2048,8192")
  parser.add_argument("--topologies", default="v5e:2x2,v5p:2x2x1,v6e:2x2")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head_dim", type=int, default=128)
  args = parser.parse_args()
  from jax.experimental import topologies  # noqa: PLC0415

  rows = []
  for topology in args.topologies.split(","):
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    mesh = jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    for t in map(int, args.seq_lens.split(",")):
      programs = _programs(args.batch, t, args.heads, args.head_dim, sharding)
      for op, make in programs.items():
        row = dict(topology=topology, op=op, t=t)
        for impl in ("pallas_tpu", "xla"):
          fn, shapes = make(impl)
          start = time.perf_counter()
          lowered = jax.jit(fn).lower(*shapes)
          compiled = lowered.compile()
          memory = compiled.memory_analysis()
          kernels = lowered.as_text().count("tpu_custom_call")
          row[f"{impl}_temp_mib"] = memory.temp_size_in_bytes / 2**20
          row[f"{impl}_compile_s"] = time.perf_counter() - start
          row[f"{impl}_kernels"] = kernels
        row["arg_mib"] = memory.argument_size_in_bytes / 2**20
        rows.append(row)
        print(row, flush=True)
  env = _timing.environment()
  header = ["topology", "op", "T", "kernel temp MiB", "xla temp MiB", "xla/kernel",
            "kernel compile s", "xla compile s", "args MiB"]  # fmt: skip
  table = [
    [r["topology"], r["op"], r["t"], r["pallas_tpu_temp_mib"], r["xla_temp_mib"],
     r["xla_temp_mib"] / r["pallas_tpu_temp_mib"] if r["pallas_tpu_temp_mib"] else None,
     r["pallas_tpu_compile_s"],
     r["xla_compile_s"], r["arg_mib"]]
    for r in rows
  ]  # fmt: skip
  title = (
    f"# Chunked state-pass kernels vs xla paths: compiled TPU memory, fwd+bwd, bf16\n\n"
    f"B={args.batch}, H={args.heads} q/k heads (gated delta rule: {2 * args.heads} value "
    f"heads), D={args.head_dim}, one chip per topology, libtpu's compiler on a CPU host "
    f"(compile only). This libtpu reports 0 temporaries for some programs on v5e and v6e "
    f"(seen before for other ops), so a 0 means 'not reported'. Command: `python -m benchmarks.state_pass_tpu_memory "
    f"--seq_lens={args.seq_lens} --topologies={args.topologies}`.\n\n"
  )
  paths = _timing.write_results(
    "state_pass_tpu_memory", env, {"rows": rows}, title + _timing.markdown_table(header, table)
  )
  print("\n".join(map(str, paths)))


if __name__ == "__main__":
  main()
