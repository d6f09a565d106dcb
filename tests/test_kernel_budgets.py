"""Every GPU kernel compiled for an H100 on this CPU host stays within its budget.

Each Pallas GPU kernel of attnlab is compiled at its default launch settings
by XLA's deviceless CUDA compiler (Pallas → Triton → PTX → cubin, no GPU) at
the budget shape of `benchmarks/gpu_kernel_budgets.json`, and `ptxas -v`'s
registers and spill bytes must not exceed the kernel's budget there (today's
figures; zero for the kernels that do not spill). A kernel change that makes
a kernel spill more fails here with the kernel's name and figures. Skips with
the reason where the compile-only CUDA toolchain (the test extra's
`jax[cuda12-local]` and `nvidia-cuda-nvcc-cu12`) is missing.
"""

import json

import pytest

from benchmarks import _compile_only, kernel_report

BUDGETS = json.loads(kernel_report.BUDGETS.read_text())
CASES = [(c, d) for c in kernel_report.cases() if c.implementation("h100") for d in c.dims("h100")]


@pytest.fixture(scope="module")
def cuda():
  try:
    return _compile_only.cuda_mesh(), _compile_only.ptxas_path()
  except _compile_only.CompilerUnavailable as error:
    pytest.skip(str(error))


def test_budget_file_matches_the_budget_shape():
  assert BUDGETS["shape"] == kernel_report.BUDGET_SHAPE
  for key, budget in BUDGETS["kernels"].items():
    assert set(budget) == set(kernel_report.BUDGET_FIGURES), key
    assert all(isinstance(v, int) and v >= 0 for v in budget.values()), key


@pytest.mark.slow  # 20 H100 compiles, 10-31 s each: the full tier (and CI), not the edit loop
@pytest.mark.parametrize("case,head_dim", CASES, ids=[f"{c.op}-d{d}" for c, d in CASES])
def test_gpu_kernels_within_budget(cuda, case, head_dim):
  rows = kernel_report.budget_rows(case, head_dim)
  assert rows, f"{case.op}: no attnlab kernel in the H100 program (it took the XLA path)"
  problems = kernel_report.over_budget(rows, BUDGETS["kernels"])
  assert not problems, "\n".join(problems)


def test_budget_check_flags_a_spilling_kernel():
  """The check itself: a figure above its budget, and a kernel without one, are named."""
  row = {"op": "softmax", "kernel": "attnlab_flash_softmax_fwd", "head_dim": 128,
         "registers": 200, "spill_stores": 8, "spill_loads": 0}  # fmt: skip
  key = kernel_report.budget_key(row)
  zero = {key: {"registers": 255, "spill_stores": 0, "spill_loads": 0}}
  assert kernel_report.over_budget([row], zero) == [f"{key}: spill_stores 8 > 0"]
  assert "no budget" in kernel_report.over_budget([row], {})[0]
  assert kernel_report.over_budget([row], {key: {**zero[key], "spill_stores": 8}}) == []


@pytest.mark.heavy  # two minutes of compiling; the budgets below run in the plain suite
def test_report_command_writes_rows_and_tables(cuda, tmp_path, capsys):
  """`python -m benchmarks.kernel_report` end to end on one small op family, both
  compilers: JSON lines per kernel and the XLA part, and the Markdown made from them."""
  out = tmp_path / "report.jsonl"
  argv = ["--targets=h100,v5e", "--ops=nats_l", "--seq_lens=256", "--head_dims=64",
          "--no_sass", f"--json={out}"]  # fmt: skip
  try:
    _compile_only.tpu_mesh("v5e:2x2")
  except _compile_only.CompilerUnavailable as error:
    pytest.skip(str(error))
  assert kernel_report.main(argv) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  gpu = {r["kernel"] for r in rows if r["target"] == "h100"}
  assert {"attnlab_nats_l_block_sparse_dkv", "attnlab_gdn_bwd", "(xla)"} <= gpu
  tpu = [r for r in rows if r["target"] == "v5e" and r["kernel"] != "(xla)"]
  assert tpu and all(r["grid_steps"] > 0 and r["hbm_bytes_per_step"] > 0 for r in tpu)
  assert all(r["mosaic_calls"] == 3 for r in tpu)
  table = out.with_suffix(".md").read_text()
  assert "attnlab_nats_l_block_sparse_dkv" in table and "### TPU" in table
  with pytest.raises(SystemExit) as exit_info:
    kernel_report.main(["--targets=h200"])
  assert exit_info.value.code == 2
  assert "unknown --targets ['h200']" in capsys.readouterr().err
