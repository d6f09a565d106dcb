"""`config.init_from`: a new run of any variant starts from a softmax workdir's
matching parameters (attnlab/warm_start.py)."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("safetensors", reason="the hf extra: pip install -e '.[hf]'")

from attnlab import config as config_lib  # noqa: E402
from attnlab import convert, loader, sharding, train_state, trainer, validate, warm_start  # noqa: E402

from .conftest import metric_rows  # noqa: E402
from .test_convert import TINY, random_tensors, write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
  """A converted tiny Llama (GQA, untied head): a softmax workdir at step 0."""
  root = tmp_path_factory.mktemp("init_from")
  hf_dir = write_checkpoint(root / "hf", TINY, random_tensors(TINY, seed=7))
  return convert.from_hf(hf_dir, str(root / "source"))


def run_config(source: str, attention: str, **overrides):
  """The source's model as `attention`, set up as a short MQAR run."""
  c = config_lib.load_config(source)
  c.model.attention = attention
  c.init_from = source
  c.seed = 3
  c.progress = False
  c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 2, 1, 0, 2
  c.data.batch_size = c.data.eval_batch_size = 8
  c.data.seq_len, c.data.num_kv_pairs = 32, 4
  c.mesh.data = 1
  c.model.mixer.gated_deltanet.chunk_size = 8
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = c
    for p in path:
      node = node[p]
    node[leaf] = value
  return config_lib.finalize(c)


def flat(params) -> dict[str, np.ndarray]:
  return {
    "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): np.asarray(v)
    for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }


FRESH = {
  "lucid": [],
  "gated_deltanet": [
    "g_proj/kernel", "inputs/A_log", "inputs/a_proj/kernel", "inputs/b_proj/kernel",
    "inputs/dt_bias", "inputs/k_conv/kernel", "inputs/k_proj/kernel", "inputs/q_conv/kernel",
    "inputs/q_proj/kernel", "inputs/v_conv/kernel", "inputs/v_proj/kernel", "o_norm/scale",
    "o_proj/kernel",
  ],
}  # fmt: skip


@pytest.mark.parametrize(
  "attention", ["lucid", pytest.param("gated_deltanet", marks=pytest.mark.slow)]
)
def test_matching_parameters_come_from_the_source_the_rest_fresh(source, attention):
  config = run_config(source, attention)
  placed = train_state.setup(config, sharding.make_mesh({}, jax.local_devices()[:1]))
  fresh_state = placed.create(jax.random.key(config.seed))
  state, report = warm_start.load(config, placed, fresh_state)

  expected_fresh = sorted(f"blocks/{i}/mixer/{name}" for i in (0, 1) for name in FRESH[attention])
  assert sorted(report["fresh"]) == expected_fresh
  got, fresh = flat(state["params"]), flat(fresh_state["params"])
  assert sorted(report["taken"] + report["fresh"]) == sorted(got)
  src_model, _, _ = loader.load_model(source)
  src = flat(nnx.state(src_model, nnx.Param))
  for name in report["taken"]:
    np.testing.assert_array_equal(got[name], src[name], err_msg=name)
  for name in report["fresh"]:
    np.testing.assert_array_equal(got[name], fresh[name], err_msg=name)
  assert int(state["step"]) == 0
  for a, b in zip(jax.tree.leaves(state["opt_state"]), jax.tree.leaves(fresh_state["opt_state"])):
    np.testing.assert_array_equal(a, b)  # a fresh optimizer
  line = warm_start.describe(report)
  assert f"{len(report['taken'])} of {len(got)} parameters" in line
  if report["fresh"]:
    assert "blocks/*/mixer/o_proj/kernel ×2" in line


def test_bad_init_from_fails_at_startup(source, tmp_path):
  def error(config):
    with pytest.raises(validate.ConfigError) as caught:
      validate.check_run(config, str(tmp_path / "w"))
    return str(caught.value)

  assert "does not exist" in error(run_config(source, "lucid", init_from=str(tmp_path / "no")))
  os.makedirs(tmp_path / "empty")
  assert "is not a workdir" in error(run_config(source, "lucid", init_from=str(tmp_path / "empty")))
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  shutil.copy(os.path.join(source, "config.json"), fresh / "config.json")
  assert "holds no checkpoint" in error(run_config(source, "lucid", init_from=str(fresh)))
  message = error(run_config(source, "lucid", **{"model.mlp_dim": 128}))
  assert "6 parameters have another shape there" in message
  assert "blocks/0/mlp/down/kernel [96, 64] there, [128, 64] here" in message
  message = error(run_config(source, "lucid", **{"model.d_model": 32}))
  assert "21 parameters have another shape there" in message  # all but the norms' scales


@pytest.mark.slow
def test_scanned_and_unscanned_layouts_match(source):
  """The converted source is unscanned; a scan_layers run stacks its layers."""
  config = run_config(source, "softmax", **{"model.scan_layers": True})
  placed = train_state.setup(config, sharding.make_mesh({}, jax.local_devices()[:1]))
  state, report = warm_start.load(config, placed, placed.create(jax.random.key(0)))
  assert report["fresh"] == []
  src_model, _, _ = loader.load_model(source)
  src = flat(nnx.state(src_model, nnx.Param))
  got = flat(state["params"])
  for layer in (0, 1):
    np.testing.assert_array_equal(
      got["blocks/mixer/qkv/k/kernel"][layer], src[f"blocks/{layer}/mixer/qkv/k/kernel"]
    )
  np.testing.assert_array_equal(got["lm_head/kernel"], src["lm_head/kernel"])


@pytest.mark.slow
def test_training_starts_from_the_source_and_resumes_without_it(source, tmp_path):
  workdir = str(tmp_path / "gdn")
  trainer.train_and_evaluate(run_config(source, "gated_deltanet"), workdir)
  with open(os.path.join(workdir, warm_start.REPORT_FILE)) as f:
    report = json.load(f)
  assert len(report["fresh"]) == 2 * len(FRESH["gated_deltanet"]) and report["step"] == 0
  assert json.load(open(os.path.join(workdir, "config.json")))["init_from"] == source
  # The resumed run takes its own checkpoint: init_from is not even looked at.
  resumed = run_config(source, "gated_deltanet", init_from=str(tmp_path / "gone"), total_steps=4)
  trainer.train_and_evaluate(resumed, workdir)
  assert [r["step"] for r in metric_rows(workdir)] == [1, 2, 3, 4]
