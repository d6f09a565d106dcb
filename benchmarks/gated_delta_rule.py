"""The chunked gated delta rule's XLA path: before / after issue 13, and a
MaxText-style baseline, forward and forward+backward, side by side.

    python -m benchmarks.gated_delta_rule                       # the full sweep (CPU: ~15 min)
    python -m benchmarks.gated_delta_rule --seq_lens=512,1024 --head_dims=128

Three forward implementations on the same float32 inputs, in one process:

* `after`: `ops.gated_delta_rule(implementation='xla')`, the current path
  (fla's state update: the scan does W·S and Kᵀ·V' per chunk, GVA without
  repeating q/k, Precision.HIGHEST).
* `before`: a verbatim copy of attnlab's previous `_delta_chunks` (commit
  540bdb6), which carried a K×K transition per chunk through the scan and
  repeated q and k per value head. Kept here only, for this comparison.
* `maxtext_style`: written for this benchmark after reading the structure of
  MaxText's XLA `jax_chunk_gated_delta_rule` (not its code): (I + A)⁻¹ by a
  row-by-row forward substitution in a fori_loop, U and W before the scan, and
  Q Kᵀ, the output and the state update inside the scan, all at
  Precision.HIGHEST. Its numbers are a proxy for MaxText's, not MaxText's own.

Every implementation is checked against `after` before timing. The fitted
exponent is the slope of log(time) against log(T). Results go to
benchmarks/results/gated_delta_rule_<device>_<date>.{md,json}.

`--clock=cpu` (the default) runs XLA:CPU on one thread and times the
process's CPU seconds per call, which stays meaningful on a CPU shared with
other jobs (wall time there mostly measures the others); `--clock=wall` is
the usual median wall time with XLA's own threading. The implementations
alternate within every round, so drift hits all of them alike.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import ops
from attnlab.ops import _linalg
from benchmarks import _timing

HIGHEST = jax.lax.Precision.HIGHEST


# --- before: attnlab's previous XLA path (commit 540bdb6), for comparison only ---------------


def _before_to_chunks(x, chunk):
  b, t, h = x.shape[:3]
  x = x.reshape(b, t // chunk, chunk, h, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def _before_chunked(q, k, v, g, beta, *, scale, initial_state, chunk):
  b, t, h, dk = q.shape
  pad = -t % chunk
  pad_time = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  q, k, v, g, beta = (pad_time(a) for a in (q, k, v, g, beta))
  q, k, v, g, beta = (_before_to_chunks(a, chunk) for a in (q, k, v, g, beta))
  gamma = jnp.cumsum(g, axis=-1)
  diff = gamma[..., :, None] - gamma[..., None, :]
  inclusive = jnp.tril(jnp.ones((chunk, chunk), bool))
  strict = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
  decay = jnp.where(inclusive, jnp.exp(jnp.where(inclusive, diff, 0.0)), 0.0)
  kk = jnp.einsum("...ik,...jk->...ij", k, k)
  a = jnp.where(strict, beta[..., :, None] * kk * decay, 0.0)
  rhs = jnp.concatenate([beta[..., None] * v, beta[..., None] * k * jnp.exp(gamma)[..., None]], -1)
  solved = _linalg.unit_lower_inverse(a) @ rhs
  u, w = solved[..., : v.shape[-1]], solved[..., v.shape[-1] :]
  p = jnp.einsum("...ik,...jk->...ij", q * scale, k) * decay
  q_eff = q * scale * jnp.exp(gamma)[..., None] - p @ w
  pu = p @ u
  decay_end = jnp.exp(gamma[..., -1])
  k_end = k * jnp.exp(gamma[..., -1:] - gamma)[..., None]
  x = jnp.einsum("...ck,...cv->...kv", k_end, u)
  y = jnp.einsum("...ck,...cj->...kj", k_end, w)

  def advance(state, inputs):
    decay_n, x_n, y_n = inputs
    return decay_n[..., None, None] * state - y_n @ state + x_n, state

  xs = tuple(jnp.moveaxis(a, 2, 0) for a in (decay_end, x, y))
  final, starts = jax.lax.scan(advance, initial_state, xs)
  starts = jnp.moveaxis(starts, 0, 2)
  o = q_eff @ starts + pu
  o = jnp.moveaxis(o, 1, 3).reshape(b, t + pad, h, -1)[:, :t]
  return o, final


def before(q, k, v, g, beta, chunk=64):
  group = v.shape[2] // q.shape[2]
  q, k = (jnp.repeat(a, group, axis=2) for a in (q, k))
  state = jnp.zeros((v.shape[0], v.shape[2], q.shape[3], v.shape[3]), v.dtype)
  return _before_chunked(
    q, k, v, g, beta, scale=q.shape[-1] ** -0.5, initial_state=state, chunk=chunk
  )


# --- maxtext_style: the structure of MaxText's XLA path, written here -------------------------


def _forward_substitution_inverse(a):
  """(I + a)⁻¹ for strictly lower a [..., C, C], one row per loop step:
  row i of (I + a)⁻¹ = e_i − a_i,<i · (rows < i of the inverse)."""
  c = a.shape[-1]
  eye = jnp.eye(c, dtype=a.dtype)

  def body(i, inv):
    row = -jnp.einsum(
      "...j,...jk->...k", a[..., i, :] * (jnp.arange(c) < i), inv, precision=HIGHEST
    )
    return inv.at[..., i, :].set(row + eye[i])

  return jax.lax.fori_loop(1, c, body, jnp.broadcast_to(eye, a.shape))


def maxtext_style(q, k, v, g, beta, chunk=64):
  b, t, h, dk = q.shape
  hv = v.shape[2]
  q, k = (jnp.repeat(a, hv // h, axis=2) for a in (q, k))
  pad = -t % chunk
  heads_first = lambda x: jnp.moveaxis(
    jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)), 2, 1
  )
  q, k, v, g, beta = (heads_first(a) for a in (q, k, v, g, beta))  # [B,H,T,..]
  n = (t + pad) // chunk
  q = q * dk**-0.5
  split = lambda x: x.reshape(b, hv, n, chunk, *x.shape[3:])
  q, k, v, g, beta = (split(a) for a in (q, k, v, g, beta))
  gamma = jnp.cumsum(g, -1)
  tri = jnp.tril(jnp.ones((chunk, chunk), bool))
  decay = jnp.exp(jnp.where(tri, gamma[..., :, None] - gamma[..., None, :], -jnp.inf))
  a = jnp.where(
    jnp.tril(tri, -1),
    jnp.einsum("...ik,...jk->...ij", beta[..., None] * k, k, precision=HIGHEST),
    0,
  )
  inv = _forward_substitution_inverse(a * decay)
  u = jnp.einsum("...ij,...jv->...iv", inv, beta[..., None] * v, precision=HIGHEST)
  w = jnp.einsum(
    "...ij,...jk->...ik", inv, (beta * jnp.exp(gamma))[..., None] * k, precision=HIGHEST
  )

  def chunk_step(state, xs):
    q_n, k_n, u_n, w_n, gamma_n, decay_n = xs
    v_new = u_n - jnp.einsum("...ck,...kv->...cv", w_n, state, precision=HIGHEST)
    scores = jnp.einsum("...ik,...jk->...ij", q_n, k_n, precision=HIGHEST) * decay_n
    o = jnp.einsum(
      "...ck,...kv->...cv", q_n * jnp.exp(gamma_n)[..., None], state, precision=HIGHEST
    )
    o = o + jnp.einsum("...ij,...jv->...iv", scores, v_new, precision=HIGHEST)
    k_end = k_n * jnp.exp(gamma_n[..., -1:] - gamma_n)[..., None]
    state = jnp.exp(gamma_n[..., -1])[..., None, None] * state + jnp.einsum(
      "...ck,...cv->...kv", k_end, v_new, precision=HIGHEST
    )
    return state, o

  state = jnp.zeros((b, hv, dk, v.shape[-1]), v.dtype)
  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, u, w, gamma, decay))
  final, o = jax.lax.scan(chunk_step, state, xs)
  o = jnp.moveaxis(o, 0, 2).reshape(b, hv, t + pad, -1)[:, :, :t]
  return jnp.moveaxis(o, 1, 2), final


def after(q, k, v, g, beta, chunk=64):
  return ops.gated_delta_rule(
    q, k, v, g, beta, chunk_size=chunk, output_final_state=True, implementation="xla"
  )


IMPLEMENTATIONS = {"before": before, "after": after, "maxtext_style": maxtext_style}


def _inputs(batch, seq_len, heads, v_heads, head_k, head_v, seed=0):
  rng = np.random.default_rng(seed)
  q, k = (rng.normal(size=(batch, seq_len, heads, head_k)) for _ in range(2))
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.normal(size=(batch, seq_len, v_heads, head_v))
  g = -np.log1p(np.exp(-rng.normal(size=(batch, seq_len, v_heads)) - 3.0))
  beta = 1 / (1 + np.exp(-rng.normal(size=(batch, seq_len, v_heads))))
  return tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v, g, beta))


def _forward(fn):
  return jax.jit(lambda *a: fn(*a)[0])


def _fwd_bwd(fn):
  def loss(*args):
    o, s = fn(*args)
    return jnp.sum(o**2) + jnp.sum(s**2)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def _measure(fns: dict, args, clock: str, rounds: int) -> dict:
  """Median seconds per call of each fn, alternating the fns within every round."""
  tick = time.process_time if clock == "cpu" else time.perf_counter
  for fn in fns.values():  # compile and warm up
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
  samples = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = tick()
      jax.block_until_ready(fn(*args))
      samples[name].append(tick() - start)
  return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--group", type=int, default=1, help="value heads per q/k head (GVA)")
  parser.add_argument("--head_dims", default="128,256", help="K = V values")
  parser.add_argument("--seq_lens", default="512,1024,2048,4096,8192")
  parser.add_argument("--modes", default="fwd,fwd_bwd")
  parser.add_argument("--impls", default="before,after,maxtext_style")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
  parser.add_argument(
    "--max_fwd_bwd_elements",
    type=float,
    default=2.2e6,
    help="skip fwd_bwd cells with T*K above this (CPU time)",
  )
  parser.add_argument("--stem", default="gated_delta_rule")
  args = parser.parse_args()
  if args.clock == "cpu":  # before the backend starts: one XLA:CPU thread
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
  env = {**_timing.environment(), "clock": args.clock}
  impls = args.impls.split(",")
  seq_lens = [int(x) for x in args.seq_lens.split(",")]
  rows, table = [], []
  head_dims = [int(x) for x in args.head_dims.split(",")]
  for d, mode in itertools.product(head_dims, args.modes.split(",")):
    times = {i: [] for i in impls}
    lens = [t for t in seq_lens if mode == "fwd" or t * d <= args.max_fwd_bwd_elements]
    for t in lens:
      inputs = _inputs(args.batch, t, args.heads, args.heads * args.group, d, d)
      forwards = {n: _forward(IMPLEMENTATIONS[n]) for n in impls}
      reference = np.asarray(_forward(after)(*inputs))
      errors = {}
      for name in impls:
        errors[name] = float(np.max(np.abs(np.asarray(forwards[name](*inputs)) - reference)))
        if errors[name] > 1e-3:
          raise AssertionError(
            f"{name} disagrees with 'after' by {errors[name]:.2e} (K={d}, T={t})"
          )
      fns = forwards if mode == "fwd" else {n: _fwd_bwd(IMPLEMENTATIONS[n]) for n in impls}
      cell = _measure(fns, inputs, args.clock, args.rounds)
      for name in impls:
        times[name].append(cell[name])
        rows.append(
          {"K": d, "V": d, "T": t, "mode": mode, "impl": name, "seconds": cell[name],
           "max_abs_diff_vs_after": errors[name]}
        )  # fmt: skip
      ratios = [
        cell[n] / cell["after"] if n in cell and "after" in cell else None
        for n in ("before", "maxtext_style")
      ]
      table.append([f"{d}", mode, t, *(cell[i] * 1e3 for i in impls), *ratios])
      print(
        " | ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in table[-1]), flush=True
      )
    if len(lens) > 1:
      exponents = [_timing.fit_exponent(lens, times[name]) for name in impls]
      table.append([f"{d}", mode, "exponent", *exponents, None, None])
  header = ["K=V", "mode", "T", *(f"{i} ms" for i in impls), "before/after", "maxtext_style/after"]
  markdown = (
    f"# Gated delta rule, XLA path: before / after / MaxText-style\n\n"
    f"`python -m benchmarks.gated_delta_rule {' '.join(f'--{k}={v}' for k, v in vars(args).items())}`\n\n"
    f"B={args.batch}, H={args.heads} q/k heads x {args.group} value heads each, C=64, float32, "
    f"median {'CPU time on one XLA thread' if args.clock == 'cpu' else 'wall time'} of "
    f"{args.rounds} alternating rounds; ratios > 1 mean `after` is faster. 'exponent' rows: "
    "slope of log(time) against log(T).\n\n" + _timing.markdown_table(header, table)
  )
  print(markdown)
  paths = _timing.write_results(args.stem, env, {"args": vars(args), "rows": rows}, markdown)
  print("wrote", *paths)


if __name__ == "__main__":
  main()
