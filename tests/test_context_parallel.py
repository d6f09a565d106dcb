"""Context parallelism (`attnlab.ops.context_parallel`): the sequence split over 2 or 4
simulated devices gives the unsplit op's outputs and every gradient (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from attnlab import ops
from attnlab.ops import context_parallel

from .conftest import assert_same_values_and_grads

B, T, H, HV, K, V = 2, 32, 2, 4, 8, 8


def _segments(kind):
  if kind is None:
    return None
  # Row 0: documents start at a shard edge (16, for 2 and 4 shards) and inside shards;
  # row 1: one document across every shard, then trailing padding.
  row0 = np.repeat([1, 2, 3, 4], [5, 11, 9, 7])
  row1 = np.repeat([1, 0], [27, 5])
  return jnp.asarray(np.stack([row0, row1]), jnp.int32)


def _split(fn, shards, num_inputs):
  mesh = jax.make_mesh(
    (shards,), ("context",), devices=jax.devices()[:shards],
    axis_types=(jax.sharding.AxisType.Auto,),
  )  # fmt: skip
  spec = P(None, "context")
  return jax.shard_map(
    fn, mesh=mesh, in_specs=(spec,) * num_inputs, out_specs=spec, check_vma=False
  )


@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("packed", [None, "packed"])
def test_gated_delta_rule_split_over_the_context_axis(x64, shards, packed):
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s))
  q, k = (f(B, T, H, K) / np.sqrt(K) for _ in range(2))
  v = f(B, T, HV, V)
  g = -jnp.abs(f(B, T, HV)) * 0.2
  beta = jax.nn.sigmoid(f(B, T, HV))
  cot = f(B, T, HV, V)
  seg = _segments(packed)
  opts = dict(chunk_size=4, implementation="xla")
  whole = lambda *a: ops.gated_delta_rule(*a, segment_ids=seg, **opts)[0]
  if seg is None:
    local = lambda *a: context_parallel.gated_delta_rule(*a, axis_name="context", **opts)
    split = _split(local, shards, 5)
    # Without the exchange each shard would start from zero: far from the answer.
    alone = _split(lambda *a: ops.gated_delta_rule(*a, **opts)[0], shards, 5)
    assert float(jnp.max(jnp.abs(alone(q, k, v, g, beta) - whole(q, k, v, g, beta)))) > 1e-2
  else:
    local = lambda q, k, v, g, beta, s: context_parallel.gated_delta_rule(
      q, k, v, g, beta, axis_name="context", segment_ids=s, **opts
    )
    split = lambda *a: _split(local, shards, 6)(*a, seg)
  assert_same_values_and_grads(split, whole, (q, k, v, g, beta), cot)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("packed", [None, "packed"])
def test_linear_attention_split_over_the_context_axis(x64, normalize, packed):
  rng = np.random.default_rng(1)
  f = lambda *s: jnp.asarray(rng.normal(size=s))
  q, k = (jax.nn.elu(f(B, T, H, K)) + 1 for _ in range(2))  # positive features: a valid normaliser
  v, cot = f(B, T, H, V), f(B, T, H, V)
  seg = _segments(packed)
  opts = dict(chunk_size=4, normalize=normalize, implementation="xla")
  whole = lambda *a: ops.linear_attention(*a, segment_ids=seg, **opts)[0]
  if seg is None:
    local = lambda *a: context_parallel.linear_attention(*a, axis_name="context", **opts)
    split = _split(local, 4, 3)
  else:
    local = lambda q, k, v, s: context_parallel.linear_attention(
      q, k, v, axis_name="context", segment_ids=s, **opts
    )
    split = lambda *a: _split(local, 4, 4)(*a, seg)
  assert_same_values_and_grads(split, whole, (q, k, v), cot)
