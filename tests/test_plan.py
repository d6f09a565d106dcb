"""`python -m attnlab.plan`: the large configs compile for real TPU slices on this CPU host,
with the Pallas kernels selected (not the XLA attention path), and fit; a step that
does not fit exits non-zero with suggestions."""

import json
import subprocess
import sys

import jax
import pytest
from flax import nnx

from attnlab import plan
from attnlab.models.transformer import build_model

from .conftest import REPO, load_config, tpu_mesh

# (config, slice, overrides): the slices the README names for each config, each built at
# full width with its kernels but one layer and T = 512 (NAtS-L: T = 1024, one block per 64
# tokens), so the four compile in the CI budget. One layer because the compile time is per
# layer: XLA unrolls a scan of 2 layers, and each layer's kernels and f32 (HIGHEST) matmuls
# cost the TPU compiler a minute or more on 2 cores. NAtS-L's own layer is the one built;
# its Gated DeltaNet layers are gated_deltanet_1b's kind. The whole configs take 5 to 30
# CPU-minutes each; the README's table has them, through `python -m attnlab.plan`
# (benchmarks/results/plan_*.json).
# The plain suite compiles softmax_1b (about a minute); the other three take 2-4 minutes
# each on 2 busy cores and run with `-m heavy`.
_SHORT = {"model.num_layers": 1, "data.seq_len": 512, "model.max_len": 512}
_HEAVY = pytest.mark.heavy
LARGE = [
  pytest.param("lucid_1b", "v5p-64", _SHORT, marks=_HEAVY),
  ("softmax_1b", "v5p-64", _SHORT),
  pytest.param("gated_deltanet_1b", "v5p-64", _SHORT, marks=_HEAVY),
  pytest.param(
    "nats_l_340m",
    "v5p-32",
    {
      "model.num_layers": 1,
      "model.layer_pattern": "nats_l",
      "data.seq_len": 1024,
      "model.max_len": 1024,
    },
    marks=_HEAVY,
  ),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,topology,model_overrides", LARGE)
def test_large_config_compiles_and_fits(name, topology, model_overrides, record_property):
  tpu_mesh("v5e:2x2")  # skips with the reason where libtpu is missing
  config = load_config(name)
  with config.unlocked():
    for key, value in model_overrides.items():
      section, field = key.split(".")
      config[section][field] = value
  report = plan.plan(config, topology, with_eval=False)
  record_property("report", json.dumps(report))
  train = report["train"]
  assert report["fits"], plan.format_report(report)
  assert 0 < train["total_gib"] <= report["hbm_gib"]
  assert train["pallas_kernels"] > 0, "the attention ran on the XLA path, not the kernels"
  assert train["donated_fraction"] > 0.95  # the new state is written over the old one
  # Model FLOPs at least the 6·N rule on the non-embedding half of the parameters.
  abstract = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
  assert report["train_flops_per_step"] > 6 * 0.5 * n_params * report["tokens_per_step"]


@pytest.mark.slow
def test_plan_command_reports_a_step_that_does_not_fit():
  tpu_mesh("v5e:2x2")
  command = [
    sys.executable, "-m", "attnlab.plan", "--config=configs/tiny.py", "--topology=v5e-4",
    "--noeval", "--json", "--config.data.batch_size=8192", "--config.data.seq_len=4096",
    "--config.model.d_model=1024", "--config.model.mlp_dim=4096",
  ]  # fmt: skip
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 1, done.stderr[-2000:]
  report = json.loads(done.stdout[done.stdout.index("{") :])
  # Either the compiled footprint exceeds the 16 GiB of a v5e, or the compiler refuses.
  assert report["fits"] is False
  assert "Ran out of memory on HBM" in report.get("error", "") or (
    report["train"]["total_gib"] > report["hbm_gib"] == 16
  )
  assert "grad_accum_steps" in done.stderr  # the knob it suggests
