"""Config parsing: `:key=value` arguments, overrides and typos that must fail."""

import subprocess
import sys

import pytest

from attnlab import config as config_lib

from .conftest import REPO
from .test_models import _load_config


def test_parse_arg_types_and_unknown_keys():
  arg = config_lib.parse_arg(
    "attention=linear,steps=12,fast=true", attention="softmax", steps=1, fast=False
  )
  assert (arg.attention, arg.steps, arg.fast) == ("linear", 12, True)
  with pytest.raises(ValueError, match="unknown config argument 'atention'"):
    config_lib.parse_arg("atention=linear", attention="softmax")
  with pytest.raises(ValueError, match="key=value"):
    config_lib.parse_arg("linear", attention="softmax")


def test_configs_build_and_are_locked():
  for name in ("tiny", "shakespeare", "softmax_1b"):
    config = _load_config(name)
    assert config.total_steps > 0 and config.model.vocab_size == config.data.vocab_size
    with pytest.raises(AttributeError):
      config.modle = 1  # locked: new keys are rejected
  assert _load_config("tiny", "attention=linear").model.attention == "linear"


def _train_cli(*args, tmp_path):
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "attnlab.train",
      "--config=configs/tiny.py",
      f"--workdir={tmp_path}",
      *args,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_cli_rejects_typos(tmp_path):
  bad_override = _train_cli("--config.model.d_modle=32", tmp_path=tmp_path)
  assert bad_override.returncode != 0 and "d_modle" in bad_override.stderr
  bad_arg = subprocess.run(
    [
      sys.executable,
      "-m",
      "attnlab.train",
      "--config=configs/tiny.py:atention=linear",
      f"--workdir={tmp_path}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad_arg.returncode != 0 and "atention" in bad_arg.stderr
  bad_type = _train_cli("--config.total_steps=lots", tmp_path=tmp_path)
  assert bad_type.returncode != 0 and "total_steps" in bad_type.stderr


def test_saved_configs_from_older_versions_load_with_new_defaults(tmp_path):
  import json

  from attnlab import config as config_lib
  from attnlab import generate

  saved = config_lib.base_config().to_dict()
  del saved["model"]["canon_conv"], saved["model"]["scan_layers"]
  saved["model"]["d_model"] = 96
  (tmp_path / "config.json").write_text(json.dumps(saved))
  loaded = generate.load_config(str(tmp_path))
  assert loaded.model.d_model == 96  # saved values win
  assert loaded.model.canon_conv == 0 and loaded.model.scan_layers is False
