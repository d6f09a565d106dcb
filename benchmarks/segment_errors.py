"""Per-document error of every op's packed form (xla paths, float64).

    python -m benchmarks.segment_errors

For each op: the largest difference between a packed row (`segment_ids`) and
its documents run one by one, relative to the largest entry, for the output
and for every input's gradient (the max over inputs). The layouts and inputs
are those of `tests/test_ops_segments.py`, which asserts the same to 1e-10;
this script records the figures in benchmarks/results/.
"""

import datetime
import json
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tests.test_ops_segments as T  # noqa: E402
from attnlab import ops  # noqa: E402


def relative_errors(packed, alone, arrays, cot) -> tuple[float, float]:
  """(output error, largest gradient error), each relative to the oracle's largest entry."""
  separate = lambda *a: T._per_document(alone, *a)
  argnums = tuple(range(len(arrays)))

  def run(f):
    loss = lambda *a: (jnp.sum(f(*a) * cot), f(*a))
    return jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(*arrays)

  (_, out_p), grads_p = run(packed)
  (_, out_a), grads_a = run(separate)
  rel = lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
  return rel(out_p, out_a), max(rel(x, y) for x, y in zip(grads_p, grads_a))


def cases():
  """(name, op taking segment_ids=..., its inputs, output cotangent)."""
  q, k, v, cot = T._inputs()
  rng = np.random.default_rng(3)
  scale = jnp.asarray(rng.uniform(0.5, 2.0, q.shape[:3]))
  v_cot = jnp.asarray(rng.normal(size=v.shape))
  yield (
    "softmax_attention",
    lambda s: lambda q, k, v: ops.softmax_attention(q, k, v, segment_ids=s, implementation="xla"),
    (q, k, v),
    cot,
  )
  yield (
    "softmax_attention + logit_scale (SSA)",
    lambda s: (
      lambda q, k, v, ls: ops.softmax_attention(
        q, k, v, logit_scale=ls, segment_ids=s, implementation="xla"
      )
    ),
    (q, k, v, scale),
    cot,
  )
  for power in (None, 3.0, 15.0):
    yield (
      f"softplus_attention power={power}",
      lambda s, p=power: (
        lambda q, k, v: ops.softplus_attention(
          q, k, v, power=p, segment_ids=s, implementation="xla"
        )
      ),
      (q, k, v),
      cot,
    )
  yield (
    "lucid_values (block 8)",
    lambda s: (
      lambda k, v: ops.lucid_values(k, v, block_size=8, segment_ids=s, implementation="xla")
    ),
    (k, v),
    v_cot,
  )
  yield (
    "lucid_attention",
    lambda s: (
      lambda q, k, v: ops.lucid_attention(
        q, k, v, block_size=8, segment_ids=s, implementation="xla"
      )
    ),
    (q, k, v),
    cot,
  )
  q2 = q[:, :, :2]
  v2 = jnp.asarray(rng.normal(size=q2.shape))
  landmarks = jnp.asarray(rng.normal(size=(2, 4, q.shape[-1])))
  yield (
    "soft_attention",
    lambda s: (
      lambda q, v: ops.soft_attention(
        q, v, landmarks, newton_iters=30, chunk_size=8, segment_ids=s, implementation="xla"
      )[0]
    ),
    (q2, v2),
    cot[:, :, :2],
  )


def nats_l_cases():
  q, k, v, g, beta, gates = T._nats_inputs()
  cot = jnp.asarray(np.random.default_rng(8).normal(size=v.shape))
  yield (
    "block_gated_delta_rule (aligned)",
    lambda s: (
      lambda q, k, v, g, b, ga: ops.block_gated_delta_rule(
        q, k, v, g, b, ga[:, ::4], block_size=4, segment_ids=s, implementation="xla"
      )
    ),
    (q, k, v, g, beta, gates),
    cot,
  )
  yield (
    "block_sparse_softmax (aligned)",
    lambda s: (
      lambda q, k, v, ga: ops.block_sparse_softmax(
        q, k, v, ga[:, ::4], block_size=4, segment_ids=s, implementation="xla"
      )
    ),
    (q, k, v, gates),
    cot,
  )


def main() -> None:
  rows = []
  seg = jnp.asarray(T._segment_ids())
  for name, op, arrays, cot in cases():
    rows.append((name, *relative_errors(op(seg), op(None), arrays, cot)))
  T.ROWS = T.ALIGNED  # NAtS-L: documents on block boundaries
  seg = jnp.asarray(T._segment_ids(T.ALIGNED))
  for name, op, arrays, cot in nats_l_cases():
    rows.append((name, *relative_errors(op(seg), op(None), arrays, cot)))
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  date = datetime.date.today().isoformat()
  stem = os.path.join(out, f"segment_errors_{date}")
  meta = {"date": date, "jax": jax.__version__, "dtype": "float64"}
  with open(stem + ".json", "w") as f:
    json.dump(
      {**meta, "rows": [dict(op=n, values=a, gradients=b) for n, a, b in rows]}, f, indent=1
    )
  lines = [
    f"# Packed rows against documents run one by one ({date}, jax {jax.__version__})",
    "",
    "Relative max error, xla paths, float64 (`python -m benchmarks.segment_errors`).",
    "",
    "| op | values | gradients |",
    "|---|---|---|",
  ]
  lines += [f"| {n} | {a:.1e} | {b:.1e} |" for n, a, b in rows]
  with open(stem + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
