"""GPU kernels against the xla path on the device: forward and all gradients, bf16.

    python -m benchmarks.gpu_check          # run by benchmarks/gpu_check.sh

Every case runs the kernel and the xla path on the same bf16 inputs (the xla
path computes in float32 inside, at float32 matmul precision: Hopper's default
TF32 would make the reference less accurate than the kernel at LSSAR p=15) and
compares the output and every gradient with errors measured relative to the
largest reference entry: ≤ 2e-2 forward, ≤ 4e-2 gradients, the bf16
tolerances of tests/test_ops_pallas.py. T = 1000 is not a multiple of any
block, and the GQA cases put 8 query heads on 2 kv heads. Each row is flushed
to gpu_check_<device>_<date>.jsonl ($OUT or benchmarks/results/) as soon as it
is done; cases past the time budget are reported as SKIP, not FAIL. Writes
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
  # Newer ops first (GDN, LUCID, NAtS-L), then the flash family.
  yield "GDN GVA D=128", "gated_delta", "pallas_gpu", None, (2, 1000, 4, 8, 128), False
  yield "GDN D=64", "gated_delta", "pallas_gpu", None, (2, 1000, 8, 8, 64), False
  yield "linear D=128", "linear", "pallas_gpu", None, (2, 1000, 8, 8, 128), False
  yield "LUCID GQA D=128", "lucid", "pallas_gpu", None, (2, 1000, 8, 2, 128), False
  yield "NAtS-L sparse softmax D=128", "nats_l", "pallas_gpu", None, (2, 1000, 8, 8, 128), False
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
  """f(q, k, v, extra) for one op; `extra` is logit_scale, or (g, beta), or the block gates."""
  if kind == "softmax":
    return lambda q, k, v, ls: ops.softmax_attention(q, k, v, logit_scale=ls, implementation=impl)
  if kind == "gated_delta":
    return lambda q, k, v, gb: ops.gated_delta_rule(q, k, v, *gb, implementation=impl)[0]
  if kind == "linear":
    return lambda q, k, v, _: ops.linear_attention(q, k, v, implementation=impl)[0]
  if kind == "lucid":
    return lambda q, k, v, _: ops.lucid_attention(q, k, v, implementation=impl)
  if kind == "nats_l":
    return lambda q, k, v, gates: ops.block_sparse_softmax(q, k, v, gates, implementation=impl)
  return lambda q, k, v, ls: ops.softplus_attention(q, k, v, power=power, implementation=impl)


def _extra(kind, keys, batch, t, heads, kv_heads, with_ls):
  """The op's extra input and whether it is differentiated."""
  if kind == "softmax" and with_ls:
    return jax.random.uniform(keys[4], (batch, t, heads), minval=0.5, maxval=2.0), True
  if kind == "gated_delta":  # v heads = kv_heads; decay near 1 as in trained models
    g = -jax.nn.softplus(jax.random.normal(keys[4], (batch, t, kv_heads)) - 3.0)
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (batch, t, kv_heads)))
    return (g, beta), True
  if kind == "nats_l":  # half the key blocks attention-typed
    blocks = -(-t // 64)
    return (jax.random.uniform(keys[4], (batch, blocks, heads)) < 0.5).astype(jnp.float32), False
  return None, False


def _error(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if not np.all(np.isfinite(got)):
    return float("inf")
  return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def check(name, kind, impl, power, shape, with_ls, seed) -> dict:
  batch, t, heads, kv_heads, d = shape
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (batch, t, heads, d))
  k = jax.random.normal(keys[1], (batch, t, heads if kind == "gated_delta" else kv_heads, d))
  if kind in ("gated_delta", "linear"):  # unit q and k keep linear attention's sums tame
    q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
  q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, t, kv_heads, d)).astype(jnp.bfloat16)
  out_heads = kv_heads if kind == "gated_delta" else heads
  cot = jax.random.normal(keys[3], (batch, t, out_heads, d)).astype(jnp.bfloat16)
  ls, differentiate_extra = _extra(kind, keys, batch, t, heads, kv_heads, with_ls)
  kernel, xla = _fn(kind, impl, power), _fn(kind, "xla", power)
  argnums = (0, 1, 2, 3) if differentiate_extra else (0, 1, 2)
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cot.astype(jnp.float32))
  row = dict(case=name, implementation=impl, shape=list(shape), logit_scale=with_ls)
  start = time.perf_counter()
  try:
    args = (q, k, v, ls)
    with jax.default_matmul_precision("float32"):
      want_out = jax.jit(xla)(*args)
      want = jax.jit(jax.grad(loss(xla), argnums))(*args)
    row["forward"] = _error(jax.jit(kernel)(*args), want_out)
    got = jax.jit(jax.grad(loss(kernel), argnums))(*args)
    flat = lambda tree: jax.tree.leaves(tree)
    names = ("dq", "dk", "dv", "dextra", "dextra2")
    row["grads"] = {n: _error(g, w) for n, g, w in zip(names, flat(got), flat(want))}
    worst = max(row["grads"].values())
    row["ok"] = row["forward"] <= FORWARD_TOL and worst <= GRAD_TOL
  except Exception as error:  # noqa: BLE001 - report every case
    row["ok"] = False
    if isinstance(error, ValueError) and "unknown implementation" in str(error):
      row["status"] = "SKIP"  # the op has no such kernel (yet): nothing to check
    row["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
    row["traceback"] = traceback.format_exc(limit=6)[-4000:]
  row["seconds"] = time.perf_counter() - start
  row.setdefault("status", "PASS" if row["ok"] else "FAIL")
  return row


def main() -> int:
  env = _timing.environment()
  print(f"gpu_check on {env['device']} ({env['platform']}), jax {env['jax']}", flush=True)
  if env["platform"] != "gpu":
    print("no GPU: nothing to check")
    return 1
  recorder, budget = _timing.Recorder("gpu_check", env), _timing.Budget(BUDGET_S)
  try:
    for seed, case in enumerate(_cases()):
      if budget.over():
        row = dict(case=case[0], ok=False, status="SKIP", error=f"over the {BUDGET_S:.0f} s budget")
      else:
        row = check(*case, seed=seed)
      recorder.add(row)
      grads = " ".join(f"{k}={v:.1e}" for k, v in row.get("grads", {}).items())
      detail = row.get("error", f"fwd={row.get('forward', float('nan')):.1e} {grads}")
      print(
        f"{row['status']} {row['case']:28s} {row.get('seconds', 0):5.1f}s {detail[:600]}",
        flush=True,
      )
  finally:
    _report(recorder.rows, env)
  return 0 if all(r["status"] != "FAIL" for r in recorder.rows) else 1


def _report(rows, env) -> None:
  table = [
    [r["case"], r["status"], r.get("forward"),
     *[r.get("grads", {}).get(n) for n in ("dq", "dk", "dv", "dextra")],
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
      ["case", "status", "fwd", "dq", "dk", "dv", "d(extra)", "error"], table
    ),
  ])  # fmt: skip
  paths = _timing.write_results("gpu_check", env, dict(rows=rows), markdown)
  print(markdown)
  print("wrote", *paths)


if __name__ == "__main__":
  sys.exit(main())
