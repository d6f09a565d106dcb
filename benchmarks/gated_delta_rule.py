"""Chunked (WY) vs recurrent gated delta rule: forward+backward wall time.

    python -m benchmarks.gated_delta_rule --seq_len=2048     # from the repository root

Both implementations run in the same process on the same inputs; the figure
that matters is the ratio. Imports only jax, numpy and attnlab.ops.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import ops


def _inputs(batch, seq_len, heads, head_k, head_v, seed=0):
  rng = np.random.default_rng(seed)
  q, k = (rng.normal(size=(batch, seq_len, heads, head_k)) for _ in range(2))
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.normal(size=(batch, seq_len, heads, head_v))
  g = -np.log1p(np.exp(-rng.normal(size=(batch, seq_len, heads)) - 3.0))
  beta = 1 / (1 + np.exp(-rng.normal(size=(batch, seq_len, heads))))
  return tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v, g, beta))


def _fwd_bwd(implementation, chunk_size):
  def loss(q, k, v, g, beta):
    o, _ = ops.gated_delta_rule(
      q, k, v, g, beta, chunk_size=chunk_size, implementation=implementation
    )
    return jnp.sum(o**2)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def _time(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
  return statistics.median(samples)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head_k", type=int, default=64)
  parser.add_argument("--head_v", type=int, default=128)
  parser.add_argument("--chunk_size", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  inputs = _inputs(args.batch, args.seq_len, args.heads, args.head_k, args.head_v)
  times = {
    impl: _time(_fwd_bwd(impl, args.chunk_size), inputs, args.repeats)
    for impl in ("xla", "reference")
  }
  print(
    f"gated_delta_rule fwd+bwd on {jax.devices()[0].platform} (jax {jax.__version__}), "
    f"B={args.batch} T={args.seq_len} H={args.heads} K={args.head_k} V={args.head_v} "
    f"C={args.chunk_size}, median of {args.repeats}"
  )
  for impl, seconds in times.items():
    print(f"  {impl:10s} {seconds * 1e3:9.1f} ms")
  print(f"  recurrence / chunked = {times['reference'] / times['xla']:.2f}x")


if __name__ == "__main__":
  main()
