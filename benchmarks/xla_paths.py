"""The softmax-family `'xla'` paths against `jax.nn.dot_product_attention` on this host.

    python -m benchmarks.xla_paths [--lengths=256,512,1024,2048,4096] [--rounds=7]
                                   [--rounds_long=3]

Causal, float32, B=1, 8 query heads, D=64. Every variant is timed against
`jax.nn.dot_product_attention(is_causal=True, implementation='xla')` on the
same shapes (2 kv heads unless the variant says MHA), forward and
forward+backward (vjp of all of q, k, v). After one warm-up call each, single calls of
the compiled functions alternate ours / theirs (the order flips every round) for
`rounds` rounds per (variant, T) (`rounds_long` for T > 2048, their mean at
2048), because the CPU is shared and noisy; the ratio is the median over rounds
of ours / theirs within a round (< 1: ours is faster), the times the medians. Memory: XLA's
temporaries (`memory_analysis().temp_size_in_bytes`) of the compiled fwd+bwd.

Variants: softmax (GQA 8/2, MHA 8/8, GQA with SSA's `logit_scale`), LSSA,
LSSAR p=15, and the whole LUCID op (V′ solve + softmax part, whose softmax
part is the softmax path). Results: benchmarks/results/xla_paths_<device>_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import ops
from benchmarks import _timing

HEADS, HEAD_DIM = 8, 64


def _ours(variant: str):
  if variant.startswith("softmax"):
    if variant == "softmax_logit_scale":
      return lambda q, k, v, ls: ops.softmax_attention(
        q, k, v, logit_scale=ls, implementation="xla"
      )
    return lambda q, k, v, ls: ops.softmax_attention(q, k, v, implementation="xla")
  if variant in ("lssa", "lssar15"):
    power = None if variant == "lssa" else 15.0
    return lambda q, k, v, ls: ops.softplus_attention(q, k, v, power=power, implementation="xla")
  if variant == "lucid":
    return lambda q, k, v, ls: ops.lucid_attention(q, k, v, implementation="xla")
  raise ValueError(variant)


def _theirs(q, k, v, ls):
  del ls
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


VARIANTS = ("softmax_gqa", "softmax_mha", "softmax_logit_scale", "lssa", "lssar15", "lucid")


def _compiled(f, args, mode):
  """The compiled forward, or the compiled vjp of q, k, v with a fixed cotangent."""
  if mode == "fwd":
    fn = f
  else:
    cot = jnp.asarray(np.random.default_rng(1).normal(size=args[0].shape), args[0].dtype)

    def fn(q, k, v, ls):
      return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, ls) * cot), (0, 1, 2))(q, k, v)

  return jax.jit(fn).lower(*args).compile()


def _inputs(t: int, kv_heads: int):
  rng = np.random.default_rng(0)
  q, k, v = (
    jnp.asarray(rng.normal(size=(1, t, h, HEAD_DIM)), jnp.float32)
    for h in (HEADS, kv_heads, kv_heads)
  )
  ls = jnp.asarray(rng.uniform(0.5, 2.0, (1, t, HEADS)), jnp.float32)
  return q, k, v, ls


def _call_s(fn, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def measure(variant: str, t: int, rounds: int) -> dict:
  """One warm-up call each, then `rounds` alternating single calls (order flips per round)."""
  args = _inputs(t, HEADS if variant == "softmax_mha" else 2)
  row = {"variant": variant, "T": t, "rounds": rounds}
  for mode in ("fwd", "fwdbwd"):
    fns = {"ours": _compiled(_ours(variant), args, mode), "theirs": _compiled(_theirs, args, mode)}
    if mode == "fwdbwd":
      for who, fn in fns.items():
        row[f"temp_mib_{who}"] = fn.memory_analysis().temp_size_in_bytes / 2**20
    for fn in fns.values():
      _call_s(fn, args)
    times = {"ours": [], "theirs": []}
    for r in range(rounds):
      for who in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
        times[who].append(_call_s(fns[who], args))
    ratios = [a / b for a, b in zip(times["ours"], times["theirs"])]
    row[f"{mode}_ms_ours"] = 1e3 * statistics.median(times["ours"])
    row[f"{mode}_ms_theirs"] = 1e3 * statistics.median(times["theirs"])
    row[f"{mode}_ratio"] = statistics.median(ratios)
    row[f"{mode}_ratios"] = ratios
  return row


HEADER = (
  "variant", "T", "rounds", "fwd ours ms", "fwd dpa ms", "fwd ratio", "fwd+bwd ours ms",
  "fwd+bwd dpa ms", "fwd+bwd ratio", "temp ours MiB", "temp dpa MiB",
)  # fmt: skip


def _table(rows: list[dict]) -> str:
  keys = (
    "variant", "T", "rounds", "fwd_ms_ours", "fwd_ms_theirs", "fwd_ratio", "fwdbwd_ms_ours",
    "fwdbwd_ms_theirs", "fwdbwd_ratio", "temp_mib_ours", "temp_mib_theirs",
  )  # fmt: skip
  ordered = sorted(rows, key=lambda r: (VARIANTS.index(r["variant"]), r["T"]))
  return _timing.markdown_table(HEADER, [[r[k] for k in keys] for r in ordered])


def _rounds(t: int, rounds: int, rounds_long: int) -> int:
  """`rounds` up to T=1024, their mean with `rounds_long` at 2048, `rounds_long` beyond."""
  return rounds if t <= 1024 else (rounds + rounds_long) // 2 if t <= 2048 else rounds_long


def _command(args) -> str:
  return (
    f"python -m benchmarks.xla_paths --lengths={args.lengths} --variants={args.variants} "
    f"--rounds={args.rounds} --rounds_long={args.rounds_long}" + (" --merge" if args.merge else "")
  )


def _device(env: dict) -> str:
  """The device part of `_timing.write_results`' file name."""
  return re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="256,512,1024,2048,4096")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--rounds", type=int, default=7, help="rounds for T <= 1024")
  parser.add_argument("--rounds_long", type=int, default=3, help="rounds for T > 2048")
  parser.add_argument("--no_write", action="store_true")
  parser.add_argument(
    "--merge", action="store_true", help="keep today's other rows (e.g. a separate long-T run)"
  )
  args = parser.parse_args()
  env = _timing.environment()
  config = {"batch": 1, "heads": HEADS, "kv_heads": 2, "head_dim": HEAD_DIM, "dtype": "float32"}
  config.update(rounds=args.rounds, rounds_long=args.rounds_long)
  rows, commands = [], [_command(args)]
  previous = _timing.RESULTS / f"xla_paths_{_device(env)}_{env['date'][:10]}.json"
  if args.merge and previous.exists():
    old = json.loads(previous.read_text())
    rows = old["rows"]
    # A file from before commands were recorded: its run used the defaults.
    default = f"python -m benchmarks.xla_paths --rounds={old['config'].get('rounds')}"
    commands = old.get("commands", [default]) + commands
  for t in (int(x) for x in args.lengths.split(",")):
    for variant in args.variants.split(","):
      row = measure(variant, t, _rounds(t, args.rounds, args.rounds_long))
      rows = [r for r in rows if (r["variant"], r["T"]) != (variant, t)] + [row]
      print(
        f"{variant:20s} T={t:5d}  fwd {row['fwd_ms_ours']:9.2f} / {row['fwd_ms_theirs']:9.2f} ms"
        f" = {row['fwd_ratio']:.2f}   fwd+bwd {row['fwdbwd_ms_ours']:9.2f} /"
        f" {row['fwdbwd_ms_theirs']:9.2f} ms = {row['fwdbwd_ratio']:.2f}   temp"
        f" {row['temp_mib_ours']:.1f} / {row['temp_mib_theirs']:.1f} MiB",
        flush=True,
      )
      if not args.no_write:  # after every row, so a long run keeps what it measured
        markdown = (
          "# softmax-family XLA paths / jax.nn.dot_product_attention (causal, CPU)\n\n"
          "ratio = ours / dot_product_attention, median over alternating rounds "
          "(< 1: ours is faster); temp = XLA temporaries of the compiled fwd+bwd.\n"
          f"Commands: {', '.join(f'`{c}`' for c in commands)}; config {config}.\n\n" + _table(rows)
        )
        payload = {"config": config, "commands": commands, "rows": rows}
        _timing.write_results("xla_paths", env, payload, markdown)
  print(_table(rows))


if __name__ == "__main__":
  main()
