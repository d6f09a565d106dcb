"""The chunked causal XLA paths (softmax, softplus) against the per-row oracles.

`attnlab.ops._causal_chunks.CHUNK` is shrunk so that a short sequence spans
several query chunks, including a ragged last one: every chunk must see exactly
its own key prefix, in values and in gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from attnlab.ops import _causal_chunks


@pytest.fixture
def small_chunks(monkeypatch):
  monkeypatch.setattr(_causal_chunks, "CHUNK", 4)
  monkeypatch.setattr(_causal_chunks, "MAX_CHUNKS", 3)  # T=15 -> chunks of 5


def _qkv(seed, t=15, heads=4, kv_heads=2, d=8):
  rng = np.random.default_rng(seed)
  shapes = ((1, t, heads, d), (1, t, kv_heads, d), (1, t, kv_heads, 6))
  return [jnp.asarray(rng.normal(size=s), jnp.float64) for s in shapes]


def test_query_chunks_cover_the_sequence(small_chunks):
  assert _causal_chunks.query_chunks(15) == [(0, 5), (5, 10), (10, 15)]
  assert _causal_chunks.query_chunks(9) == [(0, 4), (4, 8), (8, 9)]


def _check(f, args, seed):
  """Values and vjp of implementation='xla' equal 'reference' (float64)."""
  cot = jnp.asarray(np.random.default_rng(seed).normal(size=f(*args, "reference").shape))
  outs, grads = {}, {}
  for impl in ("xla", "reference"):
    outs[impl], vjp = jax.vjp(lambda *a, impl=impl: f(*a, impl), *args)
    grads[impl] = vjp(cot)
  np.testing.assert_allclose(outs["xla"], outs["reference"], rtol=1e-11, atol=1e-12)
  for a, b in zip(grads["xla"], grads["reference"]):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_chunked_softmax_with_logit_scale_matches_reference(x64, small_chunks):
  q, k, v = _qkv(0)
  ls = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, q.shape[:3]))
  f = lambda q, k, v, ls, impl: ops.softmax_attention(q, k, v, logit_scale=ls, implementation=impl)
  _check(f, (q, k, v, ls), 2)


@pytest.mark.slow
@pytest.mark.parametrize("power", [None, 15.0])
def test_chunked_softplus_matches_reference(x64, small_chunks, power):
  q, k, v = _qkv(3)
  f = lambda q, k, v, impl: ops.softplus_attention(q, k, v, power=power, implementation=impl)
  _check(f, (q, k, v), 4)
