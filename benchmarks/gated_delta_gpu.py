"""Gated delta rule on one NVIDIA GPU: our Pallas kernel against fla, our xla path,
and causal softmax attention (our flash kernel, cuDNN) across T.

    python -m benchmarks.gated_delta_gpu [--budget_s=170] [--out=DIR]

Rows, in priority order (a time budget skips what does not fit, as SKIP rows):

1. correctness at B=2, T=16K, H=16, D=128, bf16: our `pallas_gpu` output
   against fla's `chunk_gated_delta_rule` (torch + Triton) and against our
   xla path on the same inputs (max |Δ| / max |ref|);
2. forward + backward at that shape: ours, fla, a few launch settings of
   ours (block_v, num_warps), our xla path;
3. the crossover: forward + backward of ours against causal softmax
   attention (`softmax_attention(implementation='pallas_gpu' | 'cudnn')`) at
   T = 2K, 4K, 8K, 16K, same B, H, D, and linear attention on the same
   state-pass kernels (`linear_attention(implementation='pallas_gpu')`) and
   on its xla path.

fla is imported lazily (`fla_core` / `flash_linear_attention` wheels); if it
does not import, its rows say SKIP with the reason. Every row is flushed as a
JSON line to `<out>/gated_delta_gpu.jsonl` as soon as it is measured, and the
markdown table `<out>/gated_delta_gpu.md` is rewritten after each row, so a
timeout keeps what was measured. `<out>` is $OUT when set, else
benchmarks/results. Timing: compile, warm-up, then the median of repeated
runs (`benchmarks._timing.time_fn`; torch: CUDA-synchronised wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

# torch and jax share the GPU: keep jax from preallocating most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from attnlab import ops  # noqa: E402
from attnlab.ops.gated_delta import pallas_gpu as gdn_gpu  # noqa: E402
from benchmarks import _timing  # noqa: E402

B, H, D = 2, 16, 128
T_MAIN = 16384
CROSSOVER_T = (2048, 4096, 8192, 16384)
SWEEP = ((32, 4), (64, 8), (128, 8))  # (block_v, num_warps) besides the default (64, 4)


def _inputs(t: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Float32 numpy inputs, GDN-like: unit q and k, log decay < 0, β in (0, 1)."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  f32 = np.float32
  return dict(
    q=unit(rng.normal(size=(B, t, H, D))).astype(f32),
    k=unit(rng.normal(size=(B, t, H, D))).astype(f32),
    v=rng.normal(size=(B, t, H, D)).astype(f32),
    g=(-np.log1p(np.exp(-rng.normal(size=(B, t, H)) + 2.0))).astype(f32),
    beta=(1 / (1 + np.exp(-rng.normal(size=(B, t, H))))).astype(f32),
    do=rng.normal(size=(B, t, H, D)).astype(f32),
  )


def _jax_args(x: dict) -> tuple:
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  return (bf(x["q"]), bf(x["k"]), bf(x["v"]), jnp.asarray(x["g"]), jnp.asarray(x["beta"]))


def _gdn(implementation: str, **options):
  def f(q, k, v, g, beta):
    if implementation == "pallas_gpu":  # the backend itself, whatever the api registers
      o, _ = gdn_gpu.gated_delta_rule(q, k, v, g, beta, scale=D**-0.5, interpret=False, **options)
    else:
      o, _ = ops.gated_delta_rule(q, k, v, g, beta, implementation=implementation)
    return o

  return f


def _softmax(implementation: str):
  return lambda q, k, v: ops.softmax_attention(q, k, v, implementation=implementation)


def _linear(implementation: str):
  return lambda q, k, v: ops.linear_attention(q, k, v, implementation=implementation)[0]


def _fwd_bwd(f):
  """One program: the forward and the VJP of every input for cotangent `do`."""

  def run(args, do):
    o, vjp = jax.vjp(f, *args)
    return o, vjp(do.astype(o.dtype))

  return jax.jit(run)


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


# --- fla (torch) -----------------------------------------------------------------------


def _load_fla():
  """(chunk_gated_delta_rule, torch) or raises with the reason."""
  import torch  # noqa: PLC0415 - optional, only on the GPU host

  try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: PLC0415
  except ImportError:
    from fla.ops import chunk_gated_delta_rule  # noqa: PLC0415
  return chunk_gated_delta_rule, torch


def _fla_tensors(torch, x: dict, grad: bool):
  dev = "cuda"
  bf = lambda a: torch.from_numpy(a).to(dev, torch.bfloat16)
  f32 = lambda a: torch.from_numpy(a).to(dev, torch.float32)
  q, k, v = bf(x["q"]), bf(x["k"]), bf(x["v"])
  g, beta = f32(x["g"]), bf(x["beta"])
  ins = [q, k, v, g, beta]
  if grad:
    for t in ins:
      t.requires_grad_(True)
  return ins, bf(x["do"])


def _fla_time(fla, torch, x: dict, warmup: int = 3, runs: int = 10, calls: int = 20) -> dict:
  """fla's fwd+bwd: the wall clock of single synchronised calls (`median_s`) and
  the device time of `calls` back-to-back calls between two CUDA events
  (`device_s`, as `_timing.time_fn` measures ours)."""
  ins, do = _fla_tensors(torch, x, grad=True)

  def step():
    for t in ins:
      t.grad = None
    o, _ = fla(*ins, output_final_state=False)
    o.backward(do)

  start = time.perf_counter()
  step()
  torch.cuda.synchronize()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    step()
  torch.cuda.synchronize()
  samples = []
  for _ in range(runs):
    begin = time.perf_counter()
    step()
    torch.cuda.synchronize()
    samples.append(time.perf_counter() - begin)
  device = []
  for _ in range(3):
    start_event = torch.cuda.Event(enable_timing=True)
    end_event = torch.cuda.Event(enable_timing=True)
    start_event.record()
    for _ in range(calls):
      step()
    end_event.record()
    torch.cuda.synchronize()
    device.append(start_event.elapsed_time(end_event) / 1e3 / calls)
  return {"median_s": statistics.median(samples), "device_s": min(device),
          "seconds": min(device), "runs": runs, "compile_s": compile_s}  # fmt: skip


# --- reporting ---------------------------------------------------------------------------


class Report:
  def __init__(self, out: pathlib.Path, env: dict):
    out.mkdir(parents=True, exist_ok=True)
    self.jsonl, self.md = out / "gated_delta_gpu.jsonl", out / "gated_delta_gpu.md"
    self.env, self.rows = env, []
    self.jsonl.write_text(json.dumps({"environment": env}) + "\n")

  def add(self, **row) -> None:
    self.rows.append(row)
    with self.jsonl.open("a") as f:
      f.write(json.dumps(row) + "\n")
      f.flush()
    header = ["row", "T", "impl", "ms", "vs ours", "rel. error", "note"]
    table = [
      [
        r.get("row"), r.get("T"), r.get("impl"),
        None if r.get("seconds") is None else 1e3 * r["seconds"],
        r.get("ratio_vs_ours"), r.get("rel_err"), r.get("note", ""),
      ]
      for r in self.rows
    ]  # fmt: skip
    env = ", ".join(f"{k} {v}" for k, v in self.env.items())
    title = f"# Gated delta rule on GPU (B={B}, H={H}, D={D}, bf16, fwd+bwd)\n\n"
    self.md.write_text(title + _timing.markdown_table(header, table) + f"\n\n_{env}_\n")
    print(json.dumps(row), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget_s", type=float, default=170.0)
  parser.add_argument("--out", default=os.environ.get("OUT") or str(_timing.RESULTS))
  parser.add_argument("--t_main", type=int, default=T_MAIN)
  parser.add_argument("--crossover", default=",".join(map(str, CROSSOVER_T)))
  args = parser.parse_args()
  begin = time.perf_counter()
  left = lambda: args.budget_s - (time.perf_counter() - begin)
  timing = dict(warmup=2, min_runs=5, max_runs=50, min_seconds=0.5)
  report = Report(pathlib.Path(args.out), _timing.environment())

  try:
    fla, torch = _load_fla()
    fla_error = None
  except Exception as error:  # noqa: BLE001 - any import failure is reported, not fatal
    fla, torch, fla_error = (
      None,
      None,
      f"SKIP: fla does not import ({type(error).__name__}: {error})",
    )

  # 1. Correctness at the main shape.
  t = args.t_main
  x = _inputs(t)
  jargs, do = _jax_args(x), jnp.asarray(x["do"], jnp.bfloat16)
  ours_fb = _fwd_bwd(_gdn("pallas_gpu"))
  o_ours = np.asarray(jax.jit(_gdn("pallas_gpu"))(*jargs), np.float32)
  o_xla = np.asarray(jax.jit(_gdn("xla"))(*jargs), np.float32)
  report.add(row="correctness", T=t, impl="pallas_gpu vs xla", rel_err=_rel_err(o_ours, o_xla))
  if fla is not None:
    with torch.no_grad():
      ins, _ = _fla_tensors(torch, x, grad=False)
      o_fla, _ = fla(*ins, output_final_state=False)
      o_fla = o_fla.float().cpu().numpy()
    report.add(row="correctness", T=t, impl="pallas_gpu vs fla", rel_err=_rel_err(o_ours, o_fla))
    report.add(row="correctness", T=t, impl="xla vs fla", rel_err=_rel_err(o_xla, o_fla))
  else:
    report.add(row="correctness", T=t, impl="pallas_gpu vs fla", note=fla_error)
  del o_ours, o_xla
  # Every gradient too, at this shape, before anything is timed (bf16 tolerances).
  got = jax.tree.leaves(ours_fb(jargs, do))
  want = jax.tree.leaves(_fwd_bwd(_gdn("xla"))(jargs, do))
  grad_errors = [_rel_err(g, w) for g, w in zip(got, want)]
  report.add(row="correctness", T=t, impl="pallas_gpu vs xla, out + every gradient",
             rel_err=max(grad_errors), note=str([f"{e:.1e}" for e in grad_errors]))  # fmt: skip
  del got, want
  if max(grad_errors) > 4e-2:
    report.add(row="gdn fwd+bwd", T=t, impl="pallas_gpu", note="NOT TIMED: wrong at this shape")
    return

  # 2. Forward + backward at the main shape.
  ours = _timing.time_fn(ours_fb, (jargs, do), **timing)
  report.add(row="gdn fwd+bwd", T=t, impl="pallas_gpu", ratio_vs_ours=1.0, **ours)
  if fla is not None and left() > 20:
    r = _fla_time(fla, torch, x)
    report.add(
      row="gdn fwd+bwd", T=t, impl="fla", ratio_vs_ours=r["seconds"] / ours["seconds"], **r
    )
  else:
    report.add(row="gdn fwd+bwd", T=t, impl="fla", note=fla_error or "SKIP: time budget")
  # Launch settings of our kernel (the default above is block_v=64, num_warps=4).
  for block_v, warps in SWEEP:
    name = f"pallas_gpu block_v={block_v} warps={warps}"
    if left() < 60:
      report.add(row="gdn fwd+bwd", T=t, impl=name, note="SKIP: time budget")
      continue
    try:
      f = _fwd_bwd(_gdn("pallas_gpu", block_v=block_v, num_warps=warps))
      r = _timing.time_fn(f, (jargs, do), **timing)
      report.add(
        row="gdn fwd+bwd", T=t, impl=name, ratio_vs_ours=r["seconds"] / ours["seconds"], **r
      )
    except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: report, go on
      report.add(row="gdn fwd+bwd", T=t, impl=name, note=f"FAILED: {error!r}"[:300])
  if left() > 40:
    r = _timing.time_fn(_fwd_bwd(_gdn("xla")), (jargs, do), **timing)
    report.add(
      row="gdn fwd+bwd", T=t, impl="xla", ratio_vs_ours=r["seconds"] / ours["seconds"], **r
    )
  else:
    report.add(row="gdn fwd+bwd", T=t, impl="xla", note="SKIP: time budget")
  del jargs

  # 3. Crossover against causal softmax attention.
  for t in map(int, args.crossover.split(",")):
    if left() < 25:
      report.add(row="crossover", T=t, impl="all", note="SKIP: time budget")
      continue
    x = _inputs(t, seed=1)
    jargs, do = _jax_args(x), jnp.asarray(x["do"], jnp.bfloat16)
    mine = ours if t == args.t_main else _timing.time_fn(ours_fb, (jargs, do), **timing)
    report.add(row="crossover", T=t, impl="gdn pallas_gpu", ratio_vs_ours=1.0, **mine)
    others = [(f"softmax {i}", _softmax(i)) for i in ("pallas_gpu", "cudnn")]
    others += [(f"linear {i}", _linear(i)) for i in ("pallas_gpu", "xla")]
    for name, f in others:
      if left() < 15:
        report.add(row="crossover", T=t, impl=name, note="SKIP: time budget")
        continue
      try:
        r = _timing.time_fn(_fwd_bwd(f), (jargs[:3], do), **timing)
        report.add(
          row="crossover", T=t, impl=name, ratio_vs_ours=r["seconds"] / mine["seconds"], **r
        )
      except Exception as error:  # noqa: BLE001 - one failing backend must not end the run
        report.add(row="crossover", T=t, impl=name, note=f"FAILED: {error!r}"[:300])


if __name__ == "__main__":
  main()
