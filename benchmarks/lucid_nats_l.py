"""LUCID and NAtS-L against softmax attention, and NAtS-L against its routing.

    python -m benchmarks.lucid_nats_l --mode=cpu   # xla-path ratios, fraction sweep, TPU memory
    python -m benchmarks.lucid_nats_l --mode=gpu   # H200, < 2 min; JSON lines to $OUT if set

CPU mode (one process, side by side, on the shared CPU):
  1. forward+backward time of LUCID (V′ solve + softmax) and NAtS-L (block
     delta rule + block-sparse softmax at attention fraction 0.5) over our
     softmax, all on the xla path, across T;
  2. NAtS-L's block-sparse softmax as the attention-block fraction goes
     0 → 1: the xla path's time and compiled temporary memory (dense, so flat
     in the fraction), and the tiles the kernels visit (counted from the
     block lists the kernels index with; interpret mode on a CPU says nothing
     about kernel speed);
  3. with a TPU compiler (libtpu), for one v5e, v5p and v6e chip: compiled
     temporaries, compile time and Mosaic calls of the xla path against the
     pallas_tpu kernels (LUCID's solve, NAtS-L's block-sparse softmax and its
     block-gated delta rule), forward+backward, bf16.
GPU mode: kernel vs xla errors at bf16, then forward+backward time of our
softmax kernel, LUCID (xla solve or solve kernel, plus the softmax kernel),
NAtS-L's block-sparse kernel at fractions 0, 0.5, 1 (and its xla path), and
the whole NAtS-L op (delta-rule kernel + block-sparse kernel) at fraction 0.5.
LUCID's solve kernel runs in both GPU precisions ('bf16x6', the default, and
'ieee'); each row records its compile time (`compile_s`) as well.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import ops
from attnlab.ops.nats_l import _sparse
from benchmarks import _timing

ALL_SECTIONS = "ratios,sweep,tpu_memory"


def _normal(rng, shape, dtype):
  return jnp.asarray(rng.normal(size=shape), dtype)


def _gates(rng, b, n, h, fraction):
  """[B, N, H] hard gates with the given fraction of attention-typed blocks."""
  return jnp.asarray(rng.uniform(size=(b, n, h)) < fraction, jnp.float32)


def _fwd_bwd(fn, n_args):
  """Sum-of-squares loss and the gradient w.r.t. the first n_args inputs, jitted."""
  loss = lambda *a: jnp.sum(jnp.square(fn(*a).astype(jnp.float32)))
  return jax.jit(jax.grad(loss, argnums=tuple(range(n_args))))


def _programs(
  b, t, h, d, block, dtype, fraction, rng, impl="xla", values_impl=None, values_options=None
):
  """name -> (fwd+bwd program, args) for softmax, LUCID and NAtS-L.

  values_options: kernel options of LUCID's solve (e.g. the GPU's `precision`).
  """
  q, k, v = (_normal(rng, (b, t, h, d), dtype) for _ in range(3))
  n = -(-t // block)
  vis = _gates(rng, b, n, h, fraction)
  g = -jnp.asarray(rng.uniform(0.01, 0.1, size=(b, t, h)), jnp.float32)
  beta = jnp.asarray(rng.uniform(0.1, 0.9, size=(b, t, h)), jnp.float32)
  unit = lambda x: x / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True).astype(dtype)
  softmax = lambda q, k, v: ops.softmax_attention(q, k, v, implementation=impl)

  def lucid(q, k, v):
    v_prime = ops.lucid_values(
      k, v, block_size=block, implementation=values_impl or impl, **(values_options or {})
    )
    return ops.softmax_attention(q, k, v_prime.astype(q.dtype), implementation=impl)

  def nats(q, k, v):
    # The delta rule runs the state-pass kernel of the same backend as the softmax part.
    o_delta = ops.block_gated_delta_rule(
      unit(q), unit(k), v, g, beta, 1.0 - vis, block_size=block, implementation=impl
    )
    o_attn = ops.block_sparse_softmax(q, k, v, vis, block_size=block, implementation=impl)
    return o_delta + o_attn

  sparse = lambda q, k, v: ops.block_sparse_softmax(
    q, k, v, vis, block_size=block, implementation=impl
  )
  args = (q, k, v)
  return {
    "softmax": (_fwd_bwd(softmax, 3), args),
    "lucid": (_fwd_bwd(lucid, 3), args),
    "nats_l": (_fwd_bwd(nats, 3), args),
    "block_sparse_softmax": (_fwd_bwd(sparse, 3), args),
  }, vis


def cpu(args) -> None:
  env = _timing.environment()
  rng = np.random.default_rng(0)
  b, h, d, block = 1, 4, 64, 64
  rows = []
  for t in args.lengths if "ratios" in args.sections else ():
    programs, _ = _programs(b, t, h, d, block, jnp.float32, 0.5, rng)
    times = {}
    for _repeat in range(args.repeats):  # interleaved repeats: the CPU is shared
      for name in ("softmax", "lucid", "nats_l"):
        fn, a = programs[name]
        s = _timing.time_fn(fn, a, min_runs=3, min_seconds=args.min_seconds)["seconds"]
        times.setdefault(name, []).append(s)
    best = {name: min(s) for name, s in times.items()}
    rows.append(dict(t=t, **{f"{n}_s": s for n, s in best.items()},
                     lucid_ratio=best["lucid"] / best["softmax"],
                     nats_l_ratio=best["nats_l"] / best["softmax"]))  # fmt: skip
    print(rows[-1], flush=True)

  sweep = []
  t = args.sweep_length
  n = t // block
  for fraction in (0.0, 0.25, 0.5, 0.75, 1.0) if "sweep" in args.sections else ():
    programs, vis = _programs(b, t, h, d, block, jnp.float32, fraction, rng)
    fn, a = programs["block_sparse_softmax"]
    timing = _timing.time_fn(fn, a, min_runs=3, min_seconds=args.min_seconds)
    memory = fn.lower(*a).compile().memory_analysis()
    tiles = _sparse.visited_tiles(vis)
    sweep.append(dict(
      fraction=fraction, measured_fraction=float(vis[:, :-1].mean()) if n > 1 else 0.0,
      xla_s=timing["seconds"], xla_temp_mib=memory.temp_size_in_bytes / 2**20,
      kernel_tiles_fwd=tiles["forward"], kernel_tiles_dkv=tiles["dkv"],
      dense_causal_tiles=tiles["dense_causal"],
      kernel_tile_share=(2 * tiles["forward"] + tiles["dkv"]) / (3 * tiles["dense_causal"]),
    ))  # fmt: skip
    print(sweep[-1], flush=True)

  tpu = _tpu_memory(args) if "tpu_memory" in args.sections else []
  md = []
  if rows:
    md += [
      f"# LUCID and NAtS-L vs softmax, xla path, fwd+bwd (B={b}, H={h}, D={d}, block {block})\n",
      _timing.markdown_table(
        ["T", "softmax s", "LUCID s", "NAtS-L s", "LUCID/softmax", "NAtS-L/softmax"],
        [
          [r["t"], r["softmax_s"], r["lucid_s"], r["nats_l_s"], r["lucid_ratio"], r["nats_l_ratio"]]
          for r in rows
        ],
      ),  # fmt: skip
    ]
  if sweep:
    md += [
      f"\n\n# NAtS-L block-sparse softmax vs attention-block fraction (T={t}, fwd+bwd)\n",
      _timing.markdown_table(
        [
          "fraction",
          "xla s",
          "xla temp MiB",
          "kernel tiles fwd/dq",
          "kernel tiles dkv",
          "causal tiles",
          "kernel tile share",
        ],
        [
          [
            r["fraction"],
            r["xla_s"],
            r["xla_temp_mib"],
            r["kernel_tiles_fwd"],
            r["kernel_tiles_dkv"],
            r["dense_causal_tiles"],
            r["kernel_tile_share"],
          ]
          for r in sweep
        ],
      ),  # fmt: skip
    ]
  if tpu:
    md += [
      "\n\n# Compiled for one TPU chip, fwd+bwd, bf16: temporaries and compile time"
      " (0 MiB: this libtpu reported none)\n",
      _timing.markdown_table(
        [
          "topology",
          "op",
          "T",
          "B·H",
          "xla temp MiB",
          "kernel temp MiB",
          "Mosaic calls",
          "xla compile s",
          "kernel compile s",
        ],
        [
          [
            r["topology"],
            r["op"],
            r["t"],
            r["bh"],
            r["xla_temp_mib"],
            r["pallas_tpu_temp_mib"],
            r["pallas_tpu_mosaic_calls"],
            r["xla_compile_s"],
            r["pallas_tpu_compile_s"],
          ]
          for r in tpu
        ],
      ),  # fmt: skip
    ]
  stem = "lucid_nats_l_cpu" + (
    "" if args.sections == ALL_SECTIONS else "_" + args.sections.replace(",", "_")
  )
  paths = _timing.write_results(
    stem, env, {"ratios": rows, "fraction_sweep": sweep, "tpu_memory": tpu},
    "".join(md),
  )  # fmt: skip
  print("\n".join(map(str, paths)))


TPU_TOPOLOGIES = ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")


def _tpu_memory(args) -> list[dict]:
  """Compiled temporaries and compile time of xla vs pallas_tpu, fwd+bwd, bf16, one chip
  of each TPU generation (compile only): LUCID's solve and NAtS-L's two parts."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  out = []
  b, h, d, block = 1, 12, 64, 64
  for name in TPU_TOPOLOGIES:
    try:
      topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as error:  # noqa: BLE001 - no libtpu: skip this section
      print("no TPU compiler:", error)
      return out
    mesh = jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = lambda shape, dtype, sharding=sharding: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding
    )
    for t in (1024, 4096):
      x = spec((b, t, h, d), jnp.bfloat16)
      per_token = spec((b, t, h), jnp.float32)
      gates = spec((b, t // block, h), jnp.float32)
      cases = {
        "block_sparse_softmax": (
          lambda impl: (
            lambda q, k, v, g: ops.block_sparse_softmax(
              q, k, v, g, block_size=block, implementation=impl
            )
          ),
          (x, x, x, gates),
        ),
        "lucid_values": (
          lambda impl: lambda k, v: ops.lucid_values(k, v, block_size=128, implementation=impl),
          (x, x),
        ),
        "block_gated_delta_rule": (
          lambda impl: (
            lambda q, k, v, g, beta, w: ops.block_gated_delta_rule(
              q, k, v, g, beta, w, block_size=block, implementation=impl
            )
          ),
          (x, x, x, per_token, per_token, gates),
        ),
      }
      for op, (make, a) in cases.items():
        row = dict(topology=name, op=op, t=t, bh=b * h)
        for impl in ("xla", "pallas_tpu"):
          start = time.perf_counter()
          compiled = _fwd_bwd(make(impl), len(a)).lower(*a).compile()
          row[f"{impl}_compile_s"] = time.perf_counter() - start
          row[f"{impl}_temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
          row[f"{impl}_mosaic_calls"] = compiled.as_text().count("tpu_custom_call")
        out.append(row)
        print(row, flush=True)
  return out


def gpu(args) -> None:
  env = _timing.environment()
  recorder = _timing.Recorder("lucid_nats_l_gpu", env)
  budget = _timing.Budget(args.time_budget)
  rng = np.random.default_rng(0)
  b, h, d, block = 4, 16, 64, 64

  # Correctness at bf16 (NAtS-L) and f32 inside (LUCID) against the xla path, at every
  # length that is timed below, before it is timed.
  for t in args.gpu_lengths:
    q, k, v = (_normal(rng, (b, t, h, d), jnp.bfloat16) for _ in range(3))
    vis = _gates(rng, b, t // block, h, 0.5)
    for op, fn, a in (
      ("block_sparse_softmax", lambda impl, q, k, v, g: ops.block_sparse_softmax(
        q, k, v, g, block_size=block, implementation=impl), (q, k, v, vis)),
      ("lucid_values", lambda impl, k, v: ops.lucid_values(
        k, v, block_size=block, implementation=impl), (k, v)),
      ("lucid_values_ieee", lambda impl, k, v: ops.lucid_values(
        k, v, block_size=block, implementation=impl,
        **({"precision": "ieee"} if impl == "pallas_gpu" else {})), (k, v)),
    ):  # fmt: skip
      if budget.over():
        print(recorder.add(dict(kind="skipped", op=op, t=t)), flush=True)
        continue
      try:
        got, want = (
          (
            jax.jit(functools.partial(fn, impl))(*a),
            *_fwd_bwd(functools.partial(fn, impl), len(a))(*a),
          )
          for impl in ("pallas_gpu", "xla")
        )
        errors = [
          float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
          / max(float(jnp.max(jnp.abs(y.astype(jnp.float32)))), 1e-30)
          for x, y in zip(got, want)
        ]
        row = dict(kind="check", op=op, t=t, out_rel_error=errors[0], grad_rel_errors=errors[1:])
        print(recorder.add(row), flush=True)
      except Exception as error:  # noqa: BLE001 - record and go on
        print(recorder.add(dict(kind="check", op=op, error=repr(error)[:500])), flush=True)

  for t in args.gpu_lengths:
    bf16x6, ieee = {"precision": "bf16x6"}, {"precision": "ieee"}
    cases = [("softmax", "pallas_gpu", None, 0.5, None), ("lucid", "pallas_gpu", "xla", 0.5, None),
             ("lucid", "pallas_gpu", "pallas_gpu", 0.5, bf16x6)]  # fmt: skip
    cases += [("block_sparse_softmax", "pallas_gpu", None, f, None) for f in (0.0, 0.5, 1.0)]
    cases.append(("nats_l", "pallas_gpu", None, 0.5, None))  # delta kernel + sparse softmax
    if t <= 4096:
      cases.append(("block_sparse_softmax", "xla", None, 0.5, None))
    cases.append(("lucid", "pallas_gpu", "pallas_gpu", 0.5, ieee))  # last: slow to compile
    for name, impl, values_impl, fraction, values_options in cases:
      if budget.over():
        print(recorder.add(dict(kind="skipped", t=t, op=name, impl=impl)), flush=True)
        continue
      try:
        programs, _ = _programs(
          b, t, h, d, block, jnp.bfloat16, fraction, rng, impl=impl, values_impl=values_impl,
          values_options=values_options,
        )  # fmt: skip
        fn, a = programs[name]
        timing = _timing.time_fn(fn, a, min_runs=5, min_seconds=args.min_seconds)
        row = dict(kind="time", op=name, impl=impl, values_impl=values_impl, t=t, b=b, h=h, d=d,
                   fraction=fraction, values_options=values_options, **timing)  # fmt: skip
      except Exception as error:  # noqa: BLE001 - record and go on
        row = dict(kind="error", op=name, impl=impl, t=t, error=repr(error)[:500])
      print(recorder.add(row), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
  parser.add_argument("--sweep_length", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--min_seconds", type=float, default=0.5)
  parser.add_argument("--sections", default=ALL_SECTIONS)
  parser.add_argument("--gpu_lengths", type=int, nargs="+", default=[1024, 4096])
  parser.add_argument("--time_budget", type=float, default=90.0)
  args = parser.parse_args()
  (cpu if args.mode == "cpu" else gpu)(args)


if __name__ == "__main__":
  main()
