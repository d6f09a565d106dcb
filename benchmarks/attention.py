"""Causal attention kernels: throughput on a GPU, cost scaling on a CPU.

    python -m benchmarks.attention --mode=gpu   # H200: < 8 min, writes benchmarks/results/
    python -m benchmarks.attention --mode=cpu   # scaling exponent of cost in T

GPU mode: causal, bf16, head_dim D ∈ {64, 128}, T from 1K to 32K with
batch = 16K tokens / T (at least 1) and heads = 2048 / D, so batch×heads
fills the chip at every T. Forward and forward+backward. Variants: our
softmax kernel (`pallas_gpu`), cuDNN, the dense XLA path (T ≤ 4K, it is
quadratic in memory), tokamax's attention where it imports, and our
softplus kernels (LSSA, LSSAR p=15). TFLOP/s use the causal softmax count
(forward 2·B·H·T²·D, backward 2.5× that) for every variant, so softplus
figures are softmax-equivalent throughput. A time budget keeps the run under
8 minutes: the D=128, T=8K targets run first, and configurations left when
the budget is spent are reported as skipped.

CPU mode: the dense XLA softmax and LSSAR paths (and the TPU kernel in HLO
interpret mode) over T = 256 … 4096, with the log-log slope of time against T
(2 for quadratic cost).

Results: a markdown table and JSON (date, device, jax version) in
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import functools
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import ops
from benchmarks import _timing

TOKENS = 16384
WIDTH = 2048  # heads × head_dim


def causal_flops(batch: int, heads: int, t: int, d: int, mode: str) -> float:
  """Softmax attention FLOPs with the causal half: forward 2·B·H·T²·D, fwd+bwd 3.5×."""
  forward = 2.0 * batch * heads * t * t * d
  return forward if mode == "fwd" else 3.5 * forward


def _attention(variant: str, **options):
  """f(q, k, v) -> out for a variant name '<kind>/<implementation>'."""
  kind, impl = variant.split("/")
  if impl.startswith("tokamax"):
    import tokamax  # optional dependency (a wheel carried in .wheels/)

    # 'tokamax': its own choice; 'tokamax_triton' / 'tokamax_mosaic': that backend.
    choice = impl.partition("_")[2] or None
    return lambda q, k, v: tokamax.dot_product_attention(
      q, k, v, is_causal=True, implementation=choice
    )
  if impl == "xla_bf16":  # jax's own XLA attention on the bf16 inputs (no upcast)
    return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="xla"
    )
  if impl == "pallas_tpu_hlo":
    from attnlab.ops.softmax import pallas_tpu

    return lambda q, k, v: pallas_tpu.softmax_attention(
      q, k, v, interpret=True, block_q=128, block_k=128
    )
  if options:  # block-size sweep: the backend module takes kernel options
    from attnlab.ops.softmax import pallas_gpu as softmax_gpu
    from attnlab.ops.softplus import pallas_gpu as softplus_gpu

    if kind == "softmax":
      return functools.partial(softmax_gpu.softmax_attention, **options)
    power = {"lssa": None, "lssar15": 15.0}[kind]
    return functools.partial(softplus_gpu.softplus_attention, power=power, **options)
  if kind == "softmax":
    return functools.partial(ops.softmax_attention, implementation=impl, **options)
  power = {"lssa": None, "lssar15": 15.0}[kind]
  return functools.partial(ops.softplus_attention, power=power, implementation=impl, **options)


def _program(variant: str, mode: str, cot: jax.Array, **options):
  f = _attention(variant, **options)
  if mode == "fwd":
    return jax.jit(f)

  def loss(q, k, v):
    return jnp.sum(f(q, k, v).astype(jnp.float32) * cot.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _inputs(batch, t, heads, d, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch, t, heads, d)
  return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys]


FORWARD_TOL, GRAD_TOL = 2e-2, 4e-2  # relative to the largest reference entry (bf16)


def check_at_shape(variant: str, mode: str, q, k, v, cot, got, heads: int = 1) -> dict:
  """The variant's output (fwd) or gradients (fwdbwd) at the benchmark shape
  against the float32 xla path (at float32 matmul precision: Hopper's default
  TF32 would make the reference worse than a bf16 kernel at LSSAR p=15) on
  batch 0 and the first `heads` heads, which no other head influences. Returns
  {"check": "PASS" | "FAIL", "check_errors": {...}}."""
  kind = variant.split("/")[0]
  part = lambda x: x[:1, :, :heads].astype(jnp.float32)
  ref = _program(f"{kind}/xla", mode, part(cot))
  with jax.default_matmul_precision("float32"):
    want = ref(part(q), part(k), part(v))
  names = ("out",) if mode == "fwd" else ("dq", "dk", "dv")
  got = (got,) if mode == "fwd" else got
  want = (want,) if mode == "fwd" else want
  errors = {}
  for name, g, w in zip(names, got, want):
    g = np.asarray(part(g), np.float32)
    w = np.asarray(w, np.float32)
    errors[name] = float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30))
    if not np.all(np.isfinite(g)):
      errors[name] = float("inf")
  tol = FORWARD_TOL if mode == "fwd" else GRAD_TOL
  return {"check": "PASS" if max(errors.values()) <= tol else "FAIL", "check_errors": errors}


def measure(variant, mode, batch, t, heads, d, dtype, options=None, check=True, **timing) -> dict:
  """One variant at one shape: checked against the reference at this shape first
  (a failing check is reported, not timed), then timed on the device (`device_s`:
  many calls in one jitted loop, `_timing.device_time`) with the wall clock of a
  single call beside it (`median_s`). TFLOP/s use the device time."""
  row = dict(variant=variant, mode=mode, batch=batch, t=t, heads=heads, d=d)
  if options:
    row["options"] = {k: str(v) for k, v in options.items()}
  try:
    q, k, v, cot = _inputs(batch, t, heads, d, dtype)
    program = _program(variant, mode, cot, **(options or {}))
    if check and not variant.endswith("/xla"):
      row.update(check_at_shape(variant, mode, q, k, v, cot, program(q, k, v)))
      if row["check"] == "FAIL":
        row["error"] = f"wrong at this shape: {row['check_errors']}"
        return row
    result = _timing.time_fn(program, (q, k, v), device=True, **timing)
  except Exception as error:  # noqa: BLE001 - a failing variant must not stop the sweep
    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    row["traceback"] = traceback.format_exc(limit=4)[-2000:]
    return row
  row.update(result)
  flops = causal_flops(batch, heads, t, d, mode)
  row["tflops"] = flops / result["device_s"] / 1e12
  row["tflops_wall"] = flops / result["median_s"] / 1e12
  return row


# --- GPU mode -------------------------------------------------------------------------------


def _gpu_plan(lengths, dims, variants):
  """(variant, mode, D, T) in priority order: the D=128, T=8K targets first."""
  plan = []
  for d in dims:
    for t in lengths:
      for variant in variants:
        kind, impl = variant.split("/")
        if impl in ("xla", "xla_bf16") and t > 4096:
          continue  # dense T×T logits: quadratic memory
        if kind == "lssa" and (d != 128 or t != 8192):
          continue
        for mode in ("fwd", "fwdbwd"):
          plan.append((variant, mode, d, t))
  first = lambda item: (item[2], item[3]) != (128, 8192)
  return sorted(plan, key=first)  # stable: the rest keep their order


def _lookup(rows, variant, mode, d, t):
  for row in rows:
    if (row["variant"], row["mode"], row["d"], row["t"]) == (variant, mode, d, t):
      return row
  return None


def _sweep_candidates():
  from attnlab.ops.flash.pallas_gpu import BlockSizes

  return [
    BlockSizes(),
    BlockSizes(block_q=128, block_k=128),
    BlockSizes(num_stages=3),
    BlockSizes(64, 64, 64, 64, 64, 64, num_warps=4, num_stages=3),
    BlockSizes(128, 64, 64, 64, 64, 64, num_stages=3),
  ]


# Peers' published figures, for the columns a run could not fill (not measured here).
PUBLISHED = (
  "Published, for comparison (not measured here): tokamax's H100 autotune data at bf16 "
  "[2, 8192, 16, 128] causal: cuDNN forward 0.872 ms; Mosaic GPU 0.886 ms forward, 3.124 ms "
  "backward; Pallas-Triton 1.501 / 4.136 ms. fla on a GB200, forward + backward at B2 T16K H16 "
  "D128: chunk Gated DeltaNet 3.62 ms, FlashAttention 19.96 ms."
)


def _gpu_report(rows, env, budget_note, args, sweep=()):
  header = [
    "D", "T", "B×H", "mode", "ours TFLOP/s", "(wall)", "cuDNN", "ours/cuDNN", "XLA bf16",
    "ours/XLA bf16", "tokamax", "ours/tokamax", "tokamax Triton", "tokamax Mosaic",
    "LSSAR15 TFLOP/s", "LSSAR15 time / ours", "LSSA time / ours",
  ]  # fmt: skip
  table, ratios = [], []

  def tflops(row):
    return None if row is None or "tflops" not in row else row["tflops"]

  def ratio(a, b):
    return None if tflops(a) is None or tflops(b) is None else tflops(a) / tflops(b)

  keys = sorted({(r["d"], r["t"], r["mode"]) for r in rows})
  for d, t, mode in keys:
    ours, cudnn, xla_, tok, tok_triton, tok_mosaic, lssar, lssa = (
      _lookup(rows, variant, mode, d, t)
      for variant in ("softmax/pallas_gpu", "softmax/cudnn", "softmax/xla_bf16",
                      "softmax/tokamax", "softmax/tokamax_triton", "softmax/tokamax_mosaic",
                      "lssar15/pallas_gpu", "lssa/pallas_gpu")
    )  # fmt: skip
    time_ratio = ratio(ours, lssar)  # equal FLOP counts: a throughput ratio is a time ratio
    any_row = ours or cudnn or lssar
    bh = f"{any_row['batch']}×{any_row['heads']}" if any_row else None
    wall = None if ours is None else ours.get("tflops_wall")
    table.append([
      d, t, bh, mode, tflops(ours), wall, tflops(cudnn), ratio(ours, cudnn), tflops(xla_),
      ratio(ours, xla_), tflops(tok), ratio(ours, tok), tflops(tok_triton), tflops(tok_mosaic),
      tflops(lssar), time_ratio, ratio(ours, lssa),
    ])  # fmt: skip
    ratios.append(dict(d=d, t=t, mode=mode, ours_over_cudnn=ratio(ours, cudnn),
                       ours_over_xla_bf16=ratio(ours, xla_), ours_over_tokamax=ratio(ours, tok),
                       lssar15_time_over_softmax=time_ratio,
                       lssa_time_over_softmax=ratio(ours, lssa)))  # fmt: skip
  target = next((r for r in ratios if (r["d"], r["t"], r["mode"]) == (128, 8192, "fwdbwd")), {})
  lssa = _lookup(rows, "lssa/pallas_gpu", "fwdbwd", 128, 8192)
  errors = [
    f"- {r['variant']} {r['mode']} D={r['d']} T={r['t']}: {r['error']}"
    for r in rows
    if "error" in r
  ]
  fmt = lambda x: "n/a" if x is None else f"{x:.2f}"
  md = [
    f"# Causal attention kernels, bf16, on {env['device']}",
    "",
    "TFLOP/s with the causal softmax FLOP count (fwd 2·B·H·T²·D, fwd+bwd 3.5×) over the "
    "device time (many calls in one jitted loop; '(wall)': ours over the wall clock of one "
    "call, dispatch and sync included); ratios are throughput ratios (>1: ours faster). "
    "Every variant was checked against the float32 xla path at its benchmark shape before it "
    f"was timed. Batch = {args.tokens} tokens / T, heads = {args.width} / D. Ours: "
    "`pallas_gpu` (Pallas, Triton lowering) with default BlockSizes; XLA bf16 = "
    "`jax.nn.dot_product_attention(implementation='xla')` on the bf16 inputs.",
    "",
    "**Targets (D=128, T=8K, fwd+bwd)**: ours / cuDNN = "
    f"{fmt(target.get('ours_over_cudnn'))} (target ≥ 0.8); LSSAR p=15 time / our softmax time = "
    f"{fmt(target.get('lssar15_time_over_softmax'))} (target ≤ 1.5); LSSA time / our softmax "
    f"time = {fmt(target.get('lssa_time_over_softmax'))} (target ≤ 1.3)."
    + ("" if lssa is None or "tflops" not in lssa else f" LSSA: {lssa['tflops']:.0f} TFLOP/s."),
    "",
    _timing.markdown_table(header, table),
    "",
    PUBLISHED,
    "",
    budget_note,
  ]
  if sweep:
    sweep_rows = [
      [r["options"]["blocks"], r.get("tflops"), r.get("error", "")[:80]] for r in sweep
    ]  # fmt: skip
    md += [
      "", "## Block-size sweep: our softmax, D=128, T=8K, fwd+bwd", "",
      _timing.markdown_table(["BlockSizes", "TFLOP/s", "error"], sweep_rows),
    ]  # fmt: skip
  if errors:
    md += ["", "## Errors", "", *errors]
  return "\n".join(md), ratios


def run_gpu(args) -> None:
  variants = ["softmax/pallas_gpu", "softmax/cudnn", "softmax/xla_bf16", "lssar15/pallas_gpu"]
  variants.append("lssa/pallas_gpu")
  try:
    import tokamax  # noqa: F401

    variants += ["softmax/tokamax", "softmax/tokamax_triton", "softmax/tokamax_mosaic"]
  except ImportError as error:
    print(f"tokamax does not import here ({error}); its columns stay empty")
  lengths = [int(x) for x in args.lengths.split(",")]
  dims = [int(x) for x in args.dims.split(",")]
  plan = _gpu_plan(lengths, dims, variants)
  env = _timing.environment()
  print(f"{len(plan)} measurements on {env['device']} (jax {env['jax']})", flush=True)
  recorder, budget = _timing.Recorder("attention_gpu", env), _timing.Budget(args.time_budget)
  start, rows, skipped, sweep = time.perf_counter(), [], [], []
  is_target = lambda item: (item[2], item[3]) == (128, 8192)

  def run(items):
    for variant, mode, d, t in items:
      if budget.over():
        skipped.append(recorder.add(dict(variant=variant, mode=mode, d=d, t=t, status="SKIP")))
        continue
      heads, batch = args.width // d, max(1, args.tokens // t)
      row = measure(variant, mode, batch, t, heads, d, jnp.bfloat16, min_seconds=args.min_seconds)
      rows.append(recorder.add(row))
      shown = f"{row['tflops']:7.1f} TFLOP/s" if "tflops" in row else row["error"][:100]
      print(f"{variant:20s} {mode:6s} D={d:3d} T={t:5d}: {shown}", flush=True)

  try:
    run([item for item in plan if is_target(item)])  # the targets before any sweep
    if args.sweep:
      for blocks in _sweep_candidates():
        if budget.left() < 0.5 * args.time_budget:
          break  # the sweep may use at most half of the budget
        row = measure(
          "softmax/pallas_gpu", "fwdbwd", max(1, args.tokens // 8192), 8192, args.width // 128,
          128, jnp.bfloat16, options=dict(blocks=blocks), min_seconds=args.min_seconds,
        )  # fmt: skip
        sweep.append(recorder.add(row))
        shown = f"{row['tflops']:7.1f} TFLOP/s" if "tflops" in row else row["error"][:100]
        print(f"sweep {blocks}: {shown}", flush=True)
    run([item for item in plan if not is_target(item)])
  finally:
    _finish_gpu(rows, skipped, sweep, env, args, start)


def _finish_gpu(rows, skipped, sweep, env, args, start) -> None:
  note = f"Run time {time.perf_counter() - start:.0f} s (budget {args.time_budget:.0f} s)"
  note += f"; {len(skipped)} configurations skipped for time." if skipped else "."
  markdown, ratios = _gpu_report(rows, env, note, args, sweep)
  payload = dict(mode="gpu", rows=rows, ratios=ratios, skipped=skipped, tokens=args.tokens)
  payload["sweep"] = sweep
  payload["width"] = args.width
  paths = _timing.write_results("attention_gpu", env, payload, markdown)
  print(markdown)
  print("wrote", *paths)


# --- CPU mode -------------------------------------------------------------------------------


def run_cpu(args) -> None:
  lengths = [int(x) for x in args.lengths.split(",")]
  env = _timing.environment()
  batch, heads, d = 1, 4, 64
  plan = [
    ("softmax/xla", "fwd", lengths),
    ("softmax/xla", "fwdbwd", lengths),
    ("lssar15/xla", "fwd", lengths),
    ("lssar15/xla", "fwdbwd", lengths),
    ("softmax/pallas_tpu_hlo", "fwd", [t for t in lengths if t <= 2048]),
  ]
  rows, fits = [], []
  for variant, mode, ts in plan:
    series = []
    for t in ts:
      row = measure(variant, mode, batch, t, heads, d, jnp.float32, min_runs=5, min_seconds=0.5)
      rows.append(row)
      if "median_s" in row:
        series.append((t, row["median_s"]))
        print(f"{variant:24s} {mode:6s} T={t:5d}: {row['median_s'] * 1e3:9.2f} ms", flush=True)
      else:
        print(f"{variant:24s} {mode:6s} T={t:5d}: {row['error']}", flush=True)
    if len(series) >= 3:
      sizes, seconds = zip(*series)
      upper = [(s, x) for s, x in series if s >= 1024]
      fits.append(dict(
        variant=variant, mode=mode, t_range=[min(sizes), max(sizes)],
        exponent=_timing.fit_exponent(sizes, seconds),
        exponent_t_ge_1024=_timing.fit_exponent(*zip(*upper)) if len(upper) >= 2 else None,
      ))  # fmt: skip
  header = ["variant", "mode", *[f"T={t} ms" for t in lengths], "slope (all T)", "slope (T≥1K)"]
  table = []
  for fit in fits:
    times = {
      r["t"]: r.get("median_s")
      for r in rows
      if (r["variant"], r["mode"]) == (fit["variant"], fit["mode"])
    }
    table.append([
      fit["variant"], fit["mode"],
      *[None if times.get(t) is None else times[t] * 1e3 for t in lengths],
      fit["exponent"], fit["exponent_t_ge_1024"],
    ])  # fmt: skip
  markdown = "\n".join([
    f"# Causal attention cost against T on {env['device']} ({env['platform']})",
    "",
    f"float32, batch {batch}, heads {heads}, head_dim {d}; median wall time. Slope: least-squares "
    "fit of log(time) on log(T), so time ∝ T^slope (2 = quadratic). `pallas_tpu_hlo` is the TPU "
    "kernel in HLO interpret mode (128-blocks): its cost counts grid steps, not TPU time.",
    "",
    _timing.markdown_table(header, table),
  ])  # fmt: skip
  paths = _timing.write_results(
    "attention_cpu", env, dict(mode="cpu", rows=rows, fits=fits), markdown
  )
  print(markdown)
  print("wrote", *paths)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", choices=("gpu", "cpu"), default=None, help="default: by backend")
  parser.add_argument("--lengths", default=None, help="comma-separated T values")
  parser.add_argument("--dims", default="128,64", help="head dims (GPU mode)")
  parser.add_argument("--time_budget", type=float, default=400.0, help="seconds (GPU mode)")
  parser.add_argument("--tokens", type=int, default=TOKENS, help="batch × T (GPU mode)")
  parser.add_argument("--width", type=int, default=WIDTH, help="heads × head_dim (GPU mode)")
  parser.add_argument("--sweep", action="store_true", help="GPU: try block sizes at D=128, T=8K")
  parser.add_argument("--min_seconds", type=float, default=0.5, help="timed seconds per config")
  args = parser.parse_args()
  args.mode = args.mode or ("gpu" if jax.default_backend() == "gpu" else "cpu")
  if args.lengths is None:
    args.lengths = (
      "1024,2048,4096,8192,16384,32768" if args.mode == "gpu" else "256,512,1024,2048,4096"
    )
  np.set_printoptions(precision=3)
  (run_gpu if args.mode == "gpu" else run_cpu)(args)


if __name__ == "__main__":
  main()
