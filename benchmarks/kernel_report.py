"""What every attnlab Pallas kernel costs, read from the compilers on a CPU host.

    python -m benchmarks.kernel_report --targets=h100,v5e            # all ops
    python -m benchmarks.kernel_report --targets=h100 --ops=softmax,lucid --seq_lens=2048
    python -m benchmarks.kernel_report --from_json=benchmarks/results/kernel_report_....jsonl

Compiles forward + backward (`value_and_grad`, as a training step compiles them)
of every op that has Pallas kernels, at bf16, B2 H16, T 2K and 8K, head_dim 64
and 128 (and 68 for LUCID), GQA where the op has it (4 query heads a kv head;
Gated DeltaNet: 2 value heads a q/k head), and writes one JSON object per
(op, kernel, target, shape) to --json (JSON lines, flushed as each compile
ends; --resume skips rows already there) and the Markdown tables to --md:

* h100 (deviceless CUDA compile, `_compile_only.compile_cuda`): per kernel
  registers, spill stores / loads and stack (bytes, `ptxas -v`), shared memory,
  threads and grid (XLA's launch), SASS instructions, HGMMA (wgmma) / HMMA
  (mma.sync), MUFU, PTX float divides, and the C75xx "wgmma serialised" warning;
* v5e / v5p / v6e (libtpu compile-only): per kernel its grid steps and the HBM
  bytes its BlockSpecs move per step (row statistics included), their product,
  and the total when an unchanged block is not fetched again; per program its
  temporaries, Mosaic calls and compile seconds;
* per op and target, the XLA work outside the kernels (e.g. the gated delta
  rule's WY preparation): its launches and the HLO cost analysis (FLOPs, bytes)
  of the program less the kernels' operands and results.

No accelerator is needed. h100 needs the test extra's `jax[cuda12-local]` and
`nvidia-cuda-nvcc-cu12`; SASS figures need cuobjdump, which is installed on
first use into ~/.cache/attnlab/cuda_tools (pip --target; never into the jax
environment). The TPU targets need libtpu (`jax[tpu]`, also in the test extra).
"""

from __future__ import annotations

import os

# The CUDA plugin registers its deviceless topology only with the CPU backend
# selected before jax is imported (see _compile_only).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attnlab import ops  # noqa: E402
from benchmarks import _args, _compile_only  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TPU_TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
TARGETS = ("h100", *TPU_TOPOLOGIES)
FAMILIES = ("softmax", "softplus", "gated_delta", "linear", "lucid", "nats_l")
BATCH, HEADS = 2, 16


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  seq_len: int
  heads: int
  head_dim: int
  dtype: str = "bfloat16"


@dataclasses.dataclass(frozen=True)
class Case:
  """One op of one family: `build(shape, impl)` -> (fn, args) of forward + backward."""

  family: str
  op: str
  build: Callable[[Shape, str], tuple[Callable, tuple]]
  head_dims: tuple[int, ...] = (64, 128)
  implementations: tuple[tuple[str, str], ...] = (("gpu", "pallas_gpu"), ("tpu", "pallas_tpu"))
  kv_group: int = 1  # query heads per kv head (GQA), or value heads per q/k head (GVA)
  gpu_head_dims: tuple[int, ...] | None = None  # where the GPU kernel takes fewer

  def dims(self, target: str) -> tuple[int, ...]:
    if target == "h100" and self.gpu_head_dims is not None:
      return self.gpu_head_dims
    return self.head_dims

  def implementation(self, target: str) -> str | None:
    kind = "gpu" if target == "h100" else "tpu"
    return dict(self.implementations).get(kind)


def _spec(*shape, dtype=jnp.bfloat16) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype)


def _training(fn: Callable, nargs: int) -> Callable:
  """Forward + backward as a training step compiles it: value_and_grad of the
  float32 sum (with `grad` alone XLA may drop a forward kernel whose output the
  backward recomputes)."""
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=tuple(range(nargs)))


def _attention(op: Callable, group: int, extra: str | None = None):
  def build(s: Shape, impl: str):
    kv = s.heads // group
    q = _spec(s.batch, s.seq_len, s.heads, s.head_dim)
    k = _spec(s.batch, s.seq_len, kv, s.head_dim)
    args = (q, k, k)
    if extra == "logit_scale":
      args += (_spec(s.batch, s.seq_len, s.heads, dtype=jnp.float32),)
    return _training(lambda *a: op(*a, implementation=impl), len(args)), args

  return build


def _gated_delta(s: Shape, impl: str):
  h = s.heads // 2  # GVA: two value heads per q/k head
  qk = _spec(s.batch, s.seq_len, h, s.head_dim)
  v = _spec(s.batch, s.seq_len, s.heads, s.head_dim)
  gate = _spec(s.batch, s.seq_len, s.heads, dtype=jnp.float32)
  fn = lambda q, k, v, g, b: ops.gated_delta_rule(q, k, v, g, b, implementation=impl)[0]
  return _training(fn, 5), (qk, qk, v, gate, gate)


def _linear(s: Shape, impl: str):
  x = _spec(s.batch, s.seq_len, s.heads, s.head_dim)
  fn = lambda q, k, v: ops.linear_attention(q, k, v, implementation=impl)[0]
  return _training(fn, 3), (x, x, x)


def _lucid(s: Shape, impl: str):
  kv = _spec(s.batch, s.seq_len, s.heads // 4, s.head_dim)
  fn = lambda k, v: ops.lucid_values(k, v, implementation=impl)
  return _training(fn, 2), (kv, kv)


NATS_BLOCK = 64


def _nats_sparse(s: Shape, impl: str):
  x = _spec(s.batch, s.seq_len, s.heads, s.head_dim)
  blocks = _spec(s.batch, -(-s.seq_len // NATS_BLOCK), s.heads, dtype=jnp.float32)
  fn = lambda q, k, v, vis: ops.block_sparse_softmax(
    q, k, v, vis, block_size=NATS_BLOCK, implementation=impl
  )
  return _training(fn, 4), (x, x, x, blocks)


def _nats_delta(s: Shape, impl: str):
  x = _spec(s.batch, s.seq_len, s.heads, s.head_dim)
  gate = _spec(s.batch, s.seq_len, s.heads, dtype=jnp.float32)
  blocks = _spec(s.batch, -(-s.seq_len // NATS_BLOCK), s.heads, dtype=jnp.float32)
  fn = lambda q, k, v, g, b, w: ops.block_gated_delta_rule(
    q, k, v, g, b, w, block_size=NATS_BLOCK, implementation=impl
  )
  return _training(fn, 6), (x, x, x, gate, gate, blocks)


def _softplus(power):
  return lambda q, k, v, implementation: ops.softplus_attention(
    q, k, v, power=power, implementation=implementation
  )


def _softmax(q, k, v, logit_scale=None, *, implementation):
  return ops.softmax_attention(q, k, v, logit_scale=logit_scale, implementation=implementation)


CASES = (
  Case("softmax", "softmax", _attention(_softmax, 4), kv_group=4),
  Case("softmax", "ssa", _attention(_softmax, 4, "logit_scale"), kv_group=4),
  # jax's splash attention: what implementation=None runs for softmax (and SSA, and
  # LUCID's softmax over V′) on TPU.
  Case(
    "softmax",
    "softmax_splash",
    _attention(_softmax, 4),
    implementations=(("tpu", "splash"),),
    kv_group=4,
  ),
  Case(
    "softmax",
    "ssa_splash",
    _attention(_softmax, 4, "logit_scale"),
    implementations=(("tpu", "splash"),),
    kv_group=4,
  ),
  Case("softplus", "lssa", _attention(_softplus(None), 4), kv_group=4),
  Case("softplus", "lssar_p15", _attention(_softplus(15.0), 4), kv_group=4),
  Case("gated_delta", "gated_delta_rule", _gated_delta, kv_group=2),
  Case("linear", "linear_attention", _linear),
  # LUCID's GPU kernel takes power-of-two head dims (its D=68 runs the xla path).
  Case("lucid", "lucid_values", _lucid, (64, 68, 128), kv_group=4, gpu_head_dims=(64, 128)),
  Case("nats_l", "block_sparse_softmax", _nats_sparse),
  Case("nats_l", "block_gated_delta_rule", _nats_delta),
)


def cases(families: tuple[str, ...] = FAMILIES) -> list[Case]:
  unknown = set(families) - set(FAMILIES)
  if unknown:
    raise ValueError(f"unknown op families {sorted(unknown)}; choose from {FAMILIES}")
  return [c for c in CASES if c.family in families]


# --- measuring ---------------------------------------------------------------------------------


def _meta(case: Case, target: str, shape: Shape, impl: str) -> dict:
  return {
    "op": case.op, "family": case.family, "target": target, "implementation": impl,
    **dataclasses.asdict(shape), "kv_group": case.kv_group,
  }  # fmt: skip


def measure(case: Case, target: str, shape: Shape, *, sass: bool = True) -> Iterator[dict]:
  """The rows of one (op, target, shape): one per kernel, then the XLA work around them."""
  impl = case.implementation(target)
  if impl is None:
    return
  fn, args = case.build(shape, impl)
  meta = _meta(case, target, shape, impl)
  if target == "h100":
    result = _compile_only.compile_cuda(fn, args, sass=sass)
    for kernel in result["kernels"]:
      yield {**meta, **kernel, "compile_s": result["compile_s"]}
    yield {**meta, "kernel": "(xla)", **result["xla"]}
    return
  result = _compile_only.compile_tpu(fn, args, TPU_TOPOLOGIES[target])
  program = result["program"]
  for call in result["kernels"]:
    figures = {k: v for k, v in call.items() if k not in ("name", "array_bytes")}
    row = {**meta, "kernel": call["name"], **figures}
    row["hbm_bytes"] = call["hbm_bytes_per_step"] * call["grid_steps"]
    row.update(temporaries_bytes=program["temporaries_bytes"],
               mosaic_calls=program["mosaic_calls"], compile_s=program["compile_s"])  # fmt: skip
    yield row
  yield {**meta, "kernel": "(xla)", "flops": program["flops"], "bytes": program["bytes"],
         "temporaries_bytes": program["temporaries_bytes"],
         "mosaic_calls": program["mosaic_calls"], "compile_s": program["compile_s"]}  # fmt: skip


def row_key(row: dict) -> tuple:
  return (row["op"], row["target"], row["seq_len"], row["head_dim"])


# --- GPU budgets: registers and spills no change may raise unnoticed ---------------------------

BUDGETS = pathlib.Path(__file__).resolve().parent / "gpu_kernel_budgets.json"
BUDGET_SHAPE = {"batch": BATCH, "heads": HEADS, "seq_len": 8192}  # the report's T = 8K rows
BUDGET_FIGURES = ("registers", "spill_stores", "spill_loads")


def budget_key(row: dict) -> str:
  return f"{row['op']}/{row['kernel']}/d{row['head_dim']}"


def budget_rows(case: Case, head_dim: int) -> list[dict]:
  """The H100 kernel rows of one op at the budget shape (no SASS: ptxas alone)."""
  shape = Shape(BUDGET_SHAPE["batch"], BUDGET_SHAPE["seq_len"], BUDGET_SHAPE["heads"], head_dim)
  return [r for r in measure(case, "h100", shape, sass=False) if r["kernel"] != "(xla)"]


def over_budget(rows: list[dict], budgets: dict) -> list[str]:
  """One line per kernel whose figures exceed its budget (or that has none)."""
  problems = []
  for row in rows:
    key = budget_key(row)
    budget = budgets.get(key)
    if budget is None:
      problems.append(f"{key}: no budget in {BUDGETS.name} (figures: "
                      + ", ".join(f"{f} {row[f]}" for f in BUDGET_FIGURES) + ")")  # fmt: skip
      continue
    over = [f"{f} {row[f]} > {budget[f]}" for f in BUDGET_FIGURES if row[f] > budget[f]]
    if over:
      problems.append(f"{key}: " + ", ".join(over))
  return problems


def write_budgets(path: pathlib.Path = BUDGETS) -> dict:
  """Today's figures of every GPU kernel as its budget (a maintainer's command:
  `--write_budgets`; a kernel change that lowers a figure lowers its budget)."""
  kernels = {}
  for case in (c for c in cases() if c.implementation("h100")):
    for d in case.dims("h100"):
      for row in budget_rows(case, d):
        kernels[budget_key(row)] = {f: row[f] for f in BUDGET_FIGURES}
  doc = {
    "about": "Per-kernel H100 budgets (registers; spill stores/loads in bytes per thread, "
    "ptxas -v) at the shape below; tests/test_kernel_budgets.py fails any kernel above its "
    "budget. Lower them as kernels improve; never raise one without saying why.",
    "shape": BUDGET_SHAPE,
    "date": datetime.date.today().isoformat(),
    "jax": jax.__version__,
    "kernels": dict(sorted(kernels.items())),
  }
  path.write_text(json.dumps(doc, indent=1) + "\n")
  return doc


# --- tables ----------------------------------------------------------------------------------


def _kib(n) -> str:
  return "–" if n is None else f"{n / 1024:,.0f}"


def _mib(n) -> str:
  return "–" if n is None else f"{n / 2**20:,.1f}"


def _num(n) -> str:
  return "–" if n is None else f"{n:,}"


def markdown(rows: list[dict]) -> str:
  """The report's tables, generated from its rows."""
  kernels = [r for r in rows if r.get("kernel") != "(xla)" and "error" not in r]
  order = lambda r: (FAMILIES.index(r["family"]), r["op"], r["head_dim"], r["seq_len"], r["kernel"])
  out = []
  gpu = sorted((r for r in kernels if r["target"] == "h100"), key=order)
  if gpu:
    out += [
      "### H100 (sm_90a, deviceless compile): per kernel",
      "",
      "Spills and stack in bytes per thread (`ptxas -v`); smem = dynamic shared memory per "
      "block (KiB); SASS = instructions; wgmma serialised = ptxas C75xx warning.",
      "",
      "| op | kernel | D | T | registers | spill st/ld | stack | smem KiB | threads | grid | "
      "SASS | HGMMA/HMMA | MUFU | div | wgmma serialised |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in gpu:
      mma = "–" if r.get("hgmma") is None else f"{r['hgmma']}/{r['hmma']}"
      warn = (r.get("serialized_wgmma") or "").split(":")[0] or "–"
      out.append(
        f"| {r['op']} | {r['kernel']} | {r['head_dim']} | {r['seq_len']} | {r['registers']} | "
        f"{r['spill_stores']}/{r['spill_loads']} | {r['stack_bytes']} | "
        f"{_kib(r['shared_memory_bytes'])} | {r['threads']} | {'×'.join(map(str, r['grid']))} | "
        f"{_num(r.get('sass_instructions'))} | {mma} | {_num(r.get('mufu'))} | "
        f"{r['divides']} | {warn} |"
      )
    out.append("")
  tpu = sorted(
    (r for r in kernels if r["target"] != "h100"), key=lambda r: (r["target"], *order(r))
  )
  if tpu:
    out += [
      "### TPU (libtpu compile-only): per kernel",
      "",
      "bytes/step = the HBM blocks of every operand and result of one grid step (KiB); "
      "total = bytes/step × grid steps (MiB); unchanged skipped = total when a block whose "
      "index does not change between consecutive steps is not moved again (MiB); temporaries "
      "and Mosaic calls are the whole forward + backward program's.",
      "",
      "| target | op | kernel | D | T | grid steps | bytes/step KiB | total MiB | "
      "unchanged skipped MiB | temporaries MiB | Mosaic calls | compile s |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tpu:
      out.append(
        f"| {r['target']} | {r['op']} | {r['kernel']} | {r['head_dim']} | {r['seq_len']} | "
        f"{r['grid_steps']:,} | {_kib(r['hbm_bytes_per_step'])} | {_mib(r['hbm_bytes'])} | "
        f"{_mib(r.get('hbm_bytes_refetch_skipped'))} | {_mib(r['temporaries_bytes'])} | "
        f"{r['mosaic_calls']} | {r['compile_s']:.1f} |"
      )
    out.append("")
  xla = sorted(
    (r for r in rows if r.get("kernel") == "(xla)"), key=lambda r: (r["target"], *order(r))
  )
  if xla:
    out += [
      "### The XLA work around the kernels (forward + backward program)",
      "",
      "HLO cost analysis of the program less the kernels' operands and results; launches "
      "(H100) are XLA's own kernels, GEMM fusions among them.",
      "",
      "| target | op | D | T | GFLOP | GB | launches (GEMM) |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in xla:
      gflop = "–" if r.get("flops") is None else f"{r['flops'] / 1e9:,.2f}"
      gb = "–" if r.get("bytes") is None else f"{r['bytes'] / 1e9:,.2f}"
      launches = f"{r['launches']} ({r['gemm_launches']})" if "launches" in r else "–"
      out.append(
        f"| {r['target']} | {r['op']} | {r['head_dim']} | {r['seq_len']} | {gflop} | {gb} | "
        f"{launches} |"
      )
    out.append("")
  errors = [r for r in rows if "error" in r]
  if errors:
    out += ["### Failed compiles", ""]
    out += [f"- {r['target']} {r['op']} D={r['head_dim']} T={r['seq_len']}: {r['error']}"
            for r in errors]  # fmt: skip
    out.append("")
  return "\n".join(out)


# --- command line -----------------------------------------------------------------------------


def _commit() -> str | None:
  try:
    return subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
      cwd=pathlib.Path(__file__).parent,
    ).stdout.strip()  # fmt: skip
  except (OSError, subprocess.CalledProcessError):
    return None


def _csv(text: str, allowed: tuple[str, ...] | None = None, name: str = "") -> tuple[str, ...]:
  items = tuple(x.strip() for x in text.split(",") if x.strip())
  if allowed is not None:
    bad = [x for x in items if x not in allowed]
    if bad:
      raise ValueError(f"unknown {name} {bad}; choose from {list(allowed)}")
  return items


def main(argv: list[str] | None = None) -> int:
  parser = _args.ArgumentParser(
    prog="benchmarks.kernel_report", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--targets", default="h100,v5e", help=f"comma-separated: {TARGETS}")
  parser.add_argument("--ops", default=",".join(FAMILIES), help=f"op families: {FAMILIES}")
  parser.add_argument("--seq_lens", default="2048,8192")
  parser.add_argument("--head_dims", default="", help="default: each op's own (64,128; 68 LUCID)")
  parser.add_argument("--batch", type=int, default=BATCH)
  parser.add_argument("--heads", type=int, default=HEADS)
  parser.add_argument("--json", default="", help="JSON lines out (default benchmarks/results/)")
  parser.add_argument("--md", default="", help="Markdown out (default: beside --json)")
  parser.add_argument("--resume", action="store_true", help="skip rows already in --json")
  parser.add_argument("--no_sass", action="store_true", help="skip cuobjdump (no SASS mix)")
  parser.add_argument("--from_json", default="", help="only regenerate the Markdown of a run")
  parser.add_argument("--write_budgets", action="store_true",
                      help=f"write today's H100 figures to {BUDGETS.name} and stop")  # fmt: skip
  args = parser.parse_args(argv)

  if args.write_budgets:
    doc = write_budgets()
    print(f"wrote {len(doc['kernels'])} kernel budgets to {BUDGETS}")
    return 0

  if args.from_json:
    path = pathlib.Path(args.from_json)
    if not path.is_file():
      parser.error(f"--from_json={path}: no such file")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    md = pathlib.Path(args.md or path.with_suffix(".md"))
    md.write_text(_header(rows) + markdown(rows))
    print(f"wrote {md}")
    return 0

  try:
    targets = _csv(args.targets, TARGETS, "--targets")
    families = _csv(args.ops, FAMILIES, "--ops")
  except ValueError as error:
    parser.error(str(error))
  try:
    seq_lens = tuple(int(x) for x in _csv(args.seq_lens))
    dims = tuple(int(x) for x in _csv(args.head_dims))
  except ValueError as error:
    parser.error(f"--seq_lens/--head_dims take integers: {error}")
  if any(t <= 0 for t in seq_lens) or any(d <= 0 for d in dims) or min(args.batch, args.heads) <= 0:
    parser.error("--seq_lens, --head_dims, --batch and --heads must be positive")
  today = datetime.date.today().isoformat()
  out = pathlib.Path(args.json or RESULTS / f"kernel_report_{'_'.join(targets)}_{today}.jsonl")
  md = pathlib.Path(args.md or out.with_suffix(".md"))
  done = set()
  if args.resume and out.exists():
    done = {row_key(json.loads(line)) for line in out.read_text().splitlines() if line.strip()}
  elif out.exists():
    out.unlink()
  out.parent.mkdir(parents=True, exist_ok=True)
  stamp = {"date": today, "jax": jax.__version__, "commit": _commit()}

  plan = [
    (case, target, Shape(args.batch, t, args.heads, d))
    for target in targets
    for case in cases(families)
    for d in (dims or case.dims(target))
    for t in seq_lens
    if case.implementation(target)
  ]
  unavailable: dict[str, str] = {}
  for n, (case, target, shape) in enumerate(plan, 1):
    key = (case.op, target, shape.seq_len, shape.head_dim)
    if key in done:
      continue
    label = f"[{n}/{len(plan)}] {target} {case.op} D={shape.head_dim} T={shape.seq_len}"
    if target in unavailable:
      continue
    try:
      rows = list(measure(case, target, shape, sass=not args.no_sass))
    except _compile_only.CompilerUnavailable as error:
      unavailable[target] = str(error)
      print(f"{label}: skipped, {error}", file=sys.stderr, flush=True)
      continue
    except Exception as error:  # noqa: BLE001 - one failed compile must not end the report
      traceback.print_exc()
      rows = [{**_meta(case, target, shape, case.implementation(target)),
               "error": f"{type(error).__name__}: {str(error)[:300]}"}]  # fmt: skip
    with out.open("a") as f:
      for row in rows:
        f.write(json.dumps({**row, **stamp}) + "\n")
    summary = ", ".join(
      f"{r['kernel']} {r.get('registers', '')}r {r.get('spill_stores', '')}sp"
      if target == "h100"
      else f"{r['kernel']} {r.get('grid_steps', '')} steps"
      for r in rows
      if r.get("kernel", "(xla)") != "(xla)"
    )
    print(f"{label}: {summary or rows[0].get('error', 'no kernels')}", flush=True)
  rows = (
    [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if out.exists()
    else []
  )
  md.write_text(_header(rows) + markdown(rows))
  print(f"wrote {out} and {md}")
  for target, why in unavailable.items():
    print(f"kernel_report: {target} not compiled: {why}", file=sys.stderr)
  return 1 if unavailable or any("error" in r for r in rows) else 0


def _header(rows: list[dict]) -> str:
  first = rows[0] if rows else {}
  return (
    f"# Kernel report (compile-only): {first.get('date', '?')}, jax {first.get('jax', '?')}, "
    f"commit {first.get('commit', '?')}\n\n"
    f"bf16, forward + backward (`value_and_grad`), batch {first.get('batch', '?')}, "
    f"{first.get('heads', '?')} heads; generated by `python -m benchmarks.kernel_report` "
    "from the JSON lines beside this file.\n\n"
  )


if __name__ == "__main__":
  sys.exit(main())
