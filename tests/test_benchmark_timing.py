"""The GPU benchmark's measuring parts, on the CPU: device time in one jitted loop,
the check at the benchmark shape that keeps a wrong kernel from being timed, and
the kernel report's TPU block accounting."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import _compile_only, _timing, attention


def test_device_time_runs_every_call_in_order():
  calls = []
  counted = jax.jit(lambda xs, y: (jax.debug.callback(lambda: calls.append(1)), xs[0] @ y)[1])
  x = jnp.ones((8, 8))
  result = _timing.device_time(counted, ((x, x), x), wall_s=1.0, target_s=0.0)
  assert result["device_calls"] == 5 and result["device_s"] > 0
  # Compile once, then three timed loops: 4 × 5 calls, none hoisted out of the loop.
  assert len(calls) == 4 * 5


def test_check_at_shape_passes_the_kernel_and_fails_a_wrong_output():
  q, k, v, cot = attention._inputs(1, 64, 2, 16, jnp.bfloat16)
  program = attention._program("softmax/xla_bf16", "fwdbwd", cot)
  good = attention.check_at_shape("softmax/xla_bf16", "fwdbwd", q, k, v, cot, program(q, k, v))
  assert good["check"] == "PASS", good
  wrong = tuple(g * 1.1 for g in program(q, k, v))  # 10 % off: far outside bf16 tolerance
  bad = attention.check_at_shape("softmax/xla_bf16", "fwdbwd", q, k, v, cot, wrong)
  assert bad["check"] == "FAIL" and bad["check_errors"]["dq"] > attention.GRAD_TOL


def test_a_failing_check_is_reported_not_timed(monkeypatch):
  monkeypatch.setattr(
    attention, "check_at_shape", lambda *a, **k: {"check": "FAIL", "check_errors": {"out": 1.0}}
  )
  row = attention.measure("softmax/xla_bf16", "fwd", 1, 64, 2, 16, jnp.bfloat16)
  assert row["check"] == "FAIL" and "error" in row and "device_s" not in row


def test_tpu_block_accounting_counts_blocks_and_skips_unchanged_ones():
  """A 2-D grid (i, j) reading x's block i and y's block j, writing o's block i:
  bytes per step = three blocks; with unchanged blocks skipped, x and o move
  once per i and y once per step."""
  from jax.experimental import pallas as pl

  def kernel(x_ref, y_ref, o_ref):
    o_ref[...] = x_ref[...] + y_ref[...]

  def f(x, y):
    return pl.pallas_call(
      kernel,
      grid=(4, 3),
      in_specs=[
        pl.BlockSpec((8, 128), lambda i, j: (i, 0)),
        pl.BlockSpec((8, 128), lambda i, j: (j, 0)),
      ],  # fmt: skip
      out_specs=pl.BlockSpec((8, 128), lambda i, j: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((32, 128), jnp.float32),
      interpret=True,
      name="accounting",
    )(x, y)

  x = jax.ShapeDtypeStruct((32, 128), jnp.float32)
  (call,) = _compile_only.pallas_calls(f, (x, x), traffic=True)
  block = 8 * 128 * 4
  assert call["name"] == "accounting" and call["grid_steps"] == 12
  assert call["hbm_bytes_per_step"] == 3 * block
  assert call["hbm_bytes_refetch_skipped"] == (4 + 12 + 4) * block


WARNING = (
  "ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are "
  "serialized due to insufficient register resources for the function 'k'\n"
)


@pytest.mark.parametrize("text,expected,warning", [
  ("    64 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
   "ptxas info    : Used 200 registers", (200, 8, 12, 64), []),
  (WARNING + "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
   "ptxas info    : Used 96 registers, used 1 barriers", (96, 0, 0, 0),
   [("C7512", "insufficient register resources")]),
])  # fmt: skip
def test_ptxas_figures_are_parsed(text, expected, warning):
  figures = {k: int(p.search(text).group(1)) for k, p in _compile_only._PTXAS_RE.items()}
  got = (figures["registers"], figures["spill_stores"], figures["spill_loads"],
         figures["stack_bytes"])  # fmt: skip
  assert got == expected
  assert _compile_only._WGMMA_WARNING.findall(text) == warning
