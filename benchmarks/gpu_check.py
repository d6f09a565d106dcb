"""GPU kernels against the xla path on the device: forward and all gradients, bf16.

    python -m benchmarks.gpu_check          # run by benchmarks/gpu_check.sh

Every case runs the kernel and the dense xla path on the same bf16 inputs
(the xla path computes in float32 inside) and compares the output and the
gradients w.r.t. q, k, v (and logit_scale) with errors measured relative to
the largest reference entry: ≤ 2e-2 forward, ≤ 4e-2 gradients, the bf16
tolerances of tests/test_ops_pallas.py. T = 1000 is not a multiple of any
block, and the GQA cases put 8 query heads on 2 kv heads. Writes
benchmarks/results/gpu_check_<device>_<date>.{json,md}; exits 1 on any failure.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import ops
from benchmarks import _timing

FORWARD_TOL, GRAD_TOL = 2e-2, 4e-2
BUDGET_S = float(os.environ.get("CHECK_BUDGET", "150"))  # later cases are skipped past it


def _cases():
  # name, kind, implementation, power, (batch, T, heads, kv_heads, D), logit_scale
  yield "softmax MHA D=128", "softmax", "pallas_gpu", None, (2, 1000, 8, 8, 128), False
  yield "softmax GQA+SSA D=128", "softmax", "pallas_gpu", None, (2, 1000, 8, 2, 128), True
  yield "softmax GQA+SSA D=64", "softmax", "pallas_gpu", None, (2, 1000, 8, 2, 64), True
  yield "softmax long T=4096", "softmax", "pallas_gpu", None, (1, 4096, 4, 4, 128), False
  yield "cudnn GQA+SSA D=128", "softmax", "cudnn", None, (2, 1000, 8, 2, 128), True
  yield "LSSA GQA D=128", "softplus", "pallas_gpu", None, (2, 1000, 8, 2, 128), False
  yield "LSSAR p=3 GQA D=128", "softplus", "pallas_gpu", 3.0, (2, 1000, 8, 2, 128), False
  yield "LSSAR p=15 GQA D=128", "softplus", "pallas_gpu", 15.0, (2, 1000, 8, 2, 128), False
  yield "LSSAR p=15 D=64", "softplus", "pallas_gpu", 15.0, (2, 1000, 8, 8, 64), False
  yield "LSSAR p=15 long T=4096", "softplus", "pallas_gpu", 15.0, (1, 4096, 4, 4, 128), False


def _fn(kind, impl, power):
  if kind == "softmax":
    return lambda q, k, v, ls: ops.softmax_attention(q, k, v, logit_scale=ls, implementation=impl)
  return lambda q, k, v, ls: ops.softplus_attention(q, k, v, power=power, implementation=impl)


def _error(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if not np.all(np.isfinite(got)):
    return float("inf")
  return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def check(name, kind, impl, power, shape, with_ls, seed) -> dict:
  batch, t, heads, kv_heads, d = shape
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (batch, t, heads, d)).astype(jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, t, kv_heads, d)).astype(jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, t, kv_heads, d)).astype(jnp.bfloat16)
  cot = jax.random.normal(keys[3], (batch, t, heads, d)).astype(jnp.bfloat16)
  ls = jax.random.uniform(keys[4], (batch, t, heads), minval=0.5, maxval=2.0) if with_ls else None
  kernel, xla = _fn(kind, impl, power), _fn(kind, "xla", power)
  argnums = (0, 1, 2, 3) if with_ls else (0, 1, 2)
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cot.astype(jnp.float32))
  row = dict(case=name, implementation=impl, shape=list(shape), logit_scale=with_ls)
  start = time.perf_counter()
  try:
    args = (q, k, v, ls)
    row["forward"] = _error(jax.jit(kernel)(*args), jax.jit(xla)(*args))
    got = jax.jit(jax.grad(loss(kernel), argnums))(*args)
    want = jax.jit(jax.grad(loss(xla), argnums))(*args)
    row["grads"] = {
      n: _error(g, w) for n, g, w in zip(("dq", "dk", "dv", "dlogit_scale"), got, want)
    }
    worst = max(row["grads"].values())
    row["ok"] = row["forward"] <= FORWARD_TOL and worst <= GRAD_TOL
  except Exception as error:  # noqa: BLE001 - report every case
    row["ok"] = False
    row["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
    row["traceback"] = traceback.format_exc(limit=6)[-4000:]
  row["seconds"] = time.perf_counter() - start
  return row


def main() -> int:
  env = _timing.environment()
  print(f"gpu_check on {env['device']} ({env['platform']}), jax {env['jax']}", flush=True)
  if env["platform"] != "gpu":
    print("no GPU: nothing to check")
    return 1
  rows, start = [], time.perf_counter()
  for seed, case in enumerate(_cases()):
    if time.perf_counter() - start > BUDGET_S:
      rows.append(dict(case=case[0], ok=False, error=f"skipped: over the {BUDGET_S:.0f} s budget"))
      print(f"SKIP {case[0]}", flush=True)
      continue
    row = check(*case, seed=seed)
    rows.append(row)
    grads = " ".join(f"{k}={v:.1e}" for k, v in row.get("grads", {}).items())
    status = "PASS" if row["ok"] else "FAIL"
    detail = row.get("error", f"fwd={row.get('forward', float('nan')):.1e} {grads}")
    print(f"{status} {row['case']:26s} {row['seconds']:5.1f}s {detail[:600]}", flush=True)
  table = [
    [r["case"], "PASS" if r["ok"] else "FAIL", r.get("forward"),
     *[r.get("grads", {}).get(n) for n in ("dq", "dk", "dv", "dlogit_scale")],
     r.get("error", "")[:120]]
    for r in rows
  ]  # fmt: skip
  markdown = "\n".join([
    f"# GPU kernels vs the xla path on {env['device']} (bf16)",
    "",
    f"Max error relative to the largest reference entry; tolerance {FORWARD_TOL} forward, "
    f"{GRAD_TOL} gradients.",
    "",
    _timing.markdown_table(
      ["case", "status", "fwd", "dq", "dk", "dv", "dlogit_scale", "error"], table
    ),
  ])  # fmt: skip
  paths = _timing.write_results("gpu_check", env, dict(rows=rows), markdown)
  print("wrote", *paths)
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
