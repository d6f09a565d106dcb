"""Config parsing: `:key=value` arguments, overrides and typos that must fail."""

import subprocess
import sys

import pytest

from attnlab import config as config_lib

from .conftest import REPO, load_config


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
    config = load_config(name)
    assert config.total_steps > 0 and config.model.vocab_size == config.data.vocab_size
    with pytest.raises(AttributeError):
      config.modle = 1  # locked: new keys are rejected
  assert load_config("tiny", "attention=linear").model.attention == "linear"


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


@pytest.mark.slow
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
  from attnlab import loader

  saved = config_lib.base_config().to_dict()
  del saved["model"]["canon_conv"], saved["model"]["scan_layers"]
  saved["model"]["d_model"] = 96
  (tmp_path / "config.json").write_text(json.dumps(saved))
  loaded = loader.load_config(str(tmp_path))
  assert loaded.model.d_model == 96  # saved values win
  assert loaded.model.canon_conv == 0 and loaded.model.scan_layers is False


def test_data_vocab_override_on_the_command_line_reaches_the_model():
  """`--config.data.vocab_size=300` on configs/tiny.py (64 in the file): the
  model's vocabulary is derived after overrides, through attnlab.train's flag."""
  import jax
  from absl import flags
  from flax import nnx
  from ml_collections import config_flags

  from attnlab.models import build_model

  argv = ["train", f"--config={REPO}/configs/tiny.py", "--config.data.vocab_size=300"]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
    "config", None, flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  config = values[holder.name].value
  assert config.data.vocab_size == 300 and config.model.vocab_size == 300
  model = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
  shapes = {jax.tree_util.keystr(p): v.shape for p, v in nnx.to_flat_state(nnx.state(model))}
  embedding = [shape for name, shape in shapes.items() if "embedding" in name]
  assert embedding and all(shape[0] == 300 for shape in embedding), shapes
  assert '"vocab_size": 300' in config.to_json_best_effort(indent=1).replace("\n", "")


def test_byte_tokenizer_with_a_32k_vocabulary_is_an_error_when_data_is_built():
  import attnlab.data
  from attnlab.data import tokenizers

  config = load_config("lucid_1b")  # the byte default and vocab_size 32000
  with pytest.raises(ValueError, match="byte tokenizer.*train_tokenizer=32000"):
    attnlab.data.make_dataset(config.data, seed=0, train=True)
  byte = tokenizers.ByteTokenizer()
  tokenizers.check_vocab_size(byte, 264)  # padding to a round size is fine
  with pytest.raises(ValueError, match="257 tokens"):
    tokenizers.check_vocab_size(byte, 200)


@pytest.mark.slow
def test_prepare_trains_a_sentencepiece_tokenizer(tmp_path):
  from attnlab.data import tokenizers

  from .conftest import SHAKESPEARE

  if not SHAKESPEARE.exists():
    pytest.skip("needs ../shared/data/shakespeare")
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for path in sorted(SHAKESPEARE.glob("*.txt"))[:2]:
    (corpus / path.name).write_text(path.read_text())
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "attnlab.data.prepare",
      f"--source_dir={corpus}",
      f"--data_dir={tmp_path / 'data'}",
      "--train_tokenizer=512",
      "--nobuild_dataset",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr
  tokenizer = tokenizers.get_tokenizer(str(tmp_path / "data" / "spm512.model"))
  assert tokenizer.vocab_size == 512 and tokenizer.eos_id == 2
  text = "ROMEO: But soft, what light through yonder window breaks? 1599 ❦"
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text  # byte fallback: nothing is lost
  assert len(ids) < len(text.encode()) / 1.5  # merges learned from the corpus
  tokenizers.check_vocab_size(tokenizer, 512)


def test_the_config_system_imports_no_model_code():
  """config.py and optim.py sit below the models: importing them loads no mixer."""
  code = (
    "import sys; import attnlab.config, attnlab.optim; "
    "print(sorted(m for m in sys.modules if m.startswith('attnlab.models')))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_every_variant_has_config_options_and_unknown_ones_fail_at_build():
  from flax import nnx

  from attnlab.models import attention, build_model

  assert set(config_lib.mixer_options()) == set(attention.names())
  model = load_config("tiny").model
  model.mixer.softplus.power = 15.0
  assert attention.registry.options("softplus", model).power == 15.0
  with model.unlocked():
    del model.mixer["lucid"]  # a config saved before a variant existed takes its defaults
    assert attention.registry.options("lucid", model).eps == config_lib.mixer_options().lucid.eps
    model.mixer.softplus.pwer = 15.0  # a typo set inside get_config, before it locks
  model.attention = "softplus"
  with pytest.raises(ValueError, match=r"model.mixer.softplus: unknown option\(s\) \['pwer'\]"):
    build_model(model, nnx.Rngs(0))
