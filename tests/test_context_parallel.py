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


@pytest.mark.parametrize("shards,packed", [(2, None), (4, None), (4, "packed")])
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


@pytest.mark.parametrize("packed", [None, "packed"])
@pytest.mark.parametrize("op", ["softmax", "ssa", "lssa", "lssar15", "lucid"])
def test_softmax_family_split_over_the_context_axis(x64, op, packed):
  rng = np.random.default_rng(2)
  f = lambda *s: jnp.asarray(rng.normal(size=s))
  q, k, v = f(B, T, 2 * H, K), f(B, T, H, K), f(B, T, H, V)  # GQA: 2 query heads per kv head
  cot = f(B, T, 2 * H, V)
  seg = _segments(packed) if packed else jnp.zeros((B, T), jnp.int32)
  ids = None if packed is None else seg
  if op in ("softmax", "ssa"):
    ls = jnp.asarray(rng.uniform(0.5, 2.0, (B, T, 2 * H))) if op == "ssa" else None
    args = {} if ls is None else {"logit_scale": ls}
    whole = lambda q, k, v: ops.softmax_attention(q, k, v, segment_ids=ids, **args)
    local = lambda q, k, v, s, *ls: context_parallel.softmax_attention(
      q, k, v, axis_name="context", segment_ids=None if packed is None else s,
      logit_scale=ls[0] if ls else None,
    )  # fmt: skip
    extra = () if ls is None else (ls,)
  elif op == "lucid":
    whole = lambda q, k, v: ops.lucid_attention(q, k, v, block_size=4, segment_ids=ids)
    local = lambda q, k, v, s: context_parallel.lucid_attention(
      q, k, v, axis_name="context", block_size=4, segment_ids=None if packed is None else s
    )
    extra = ()
  else:
    power = 15.0 if op == "lssar15" else None
    whole = lambda q, k, v: ops.softplus_attention(q, k, v, power=power, segment_ids=ids)
    local = lambda q, k, v, s: context_parallel.softplus_attention(
      q, k, v, axis_name="context", power=power, segment_ids=None if packed is None else s
    )
    extra = ()
  split = lambda q, k, v: _split(local, 4, 4 + len(extra))(q, k, v, seg, *extra)
  assert_same_values_and_grads(split, whole, (q, k, v), cot)


@pytest.mark.parametrize("packed", [None, "packed"])
def test_soft_attention_split_over_the_context_axis(x64, packed):
  rng = np.random.default_rng(3)
  f = lambda *s: jnp.asarray(rng.normal(size=s))
  q, v, cot = f(B, T, H, K), f(B, T, H, V), f(B, T, H, V)
  landmarks = f(H, 6, K)
  seg = _segments(packed) if packed else jnp.zeros((B, T), jnp.int32)
  ids = None if packed is None else seg
  opts = dict(chunk_size=4, newton_iters=8, implementation="xla")
  whole = lambda q, v: ops.soft_attention(q, v, landmarks, segment_ids=ids, **opts)[0]
  local = lambda q, v, s: context_parallel.soft_attention(
    q, v, landmarks, axis_name="context", segment_ids=None if packed is None else s, **opts
  )
  split = lambda q, v: _split(local, 4, 3)(q, v, seg)
  assert_same_values_and_grads(split, whole, (q, v), cot)


@pytest.mark.parametrize("packed", [None, "packed"])
def test_nats_l_delta_path_split_over_the_context_axis(x64, packed):
  """NAtS-L's block-written delta rule: 4 shards of 8 tokens, blocks of 4, mixed types."""
  rng = np.random.default_rng(4)
  f = lambda *s: jnp.asarray(rng.normal(size=s))
  q, k = (f(B, T, H, K) / np.sqrt(K) for _ in range(2))
  v, cot = f(B, T, H, V), f(B, T, H, V)
  g = -jnp.abs(f(B, T, H)) * 0.2
  beta = jax.nn.sigmoid(f(B, T, H))
  write = jnp.asarray(rng.integers(0, 2, (B, T // 4, H)), jnp.float64)
  # NAtS-L's documents start on block boundaries: 0, 8, 20, 28 in row 0; 0, 24 in row 1.
  seg = jnp.asarray(np.stack([np.repeat([1, 2, 3, 4], [8, 12, 8, 4]), np.repeat([1, 0], [24, 8])]))
  ids = seg if packed else None
  opts = dict(block_size=4, implementation="xla")
  whole = lambda q, k, v, g, beta, w: ops.block_gated_delta_rule(
    q, k, v, g, beta, w, segment_ids=ids, **opts
  )
  local = lambda q, k, v, g, beta, w, s: context_parallel.block_gated_delta_rule(
    q, k, v, g, beta, w, axis_name="context", segment_ids=s if packed else None, **opts
  )
  split = lambda *a: _split(local, 4, 7)(*a, seg)
  assert_same_values_and_grads(split, whole, (q, k, v, g, beta, write), cot)
