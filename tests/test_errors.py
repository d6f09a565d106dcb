"""Bad input gets a clear error before any compute, one test per case.

Run cases go through the command line as a user meets them: absl flags are
parsed in-process and `attnlab.train.main` is called (a subprocess per case
would cost seconds of imports each; `test_cli_errors.py` runs the real
programs for every command). Model building and data loading are replaced by functions
that fail the test if reached, so each error provably comes first.
"""

import sys

import jax.numpy as jnp
import pytest
from absl import flags

import attnlab.data
from attnlab import errors, ops, train, train_state

from .conftest import REPO


@pytest.fixture
def cli(monkeypatch, tmp_path):
  """cli(*flags) parses flags as `python -m attnlab.train` would and runs main."""

  def unreachable(*args, **kwargs):
    raise AssertionError("reached model or data construction before the error")

  monkeypatch.setattr(train_state, "initializer", unreachable)
  monkeypatch.setattr(attnlab.data, "make_dataset", unreachable)

  def run(*args, config="configs/tiny.py", workdir=None):
    argv = ["attnlab.train", f"--config={REPO / config}", f"--workdir={workdir or tmp_path / 'w'}"]
    # ml_collections reads `--config.*` overrides from sys.argv, as in a real run.
    monkeypatch.setattr(sys, "argv", [*argv, *args])
    _reset_flags()
    try:
      flags.FLAGS([*argv, *args])
      train.main(["attnlab.train"])
    finally:
      _reset_flags()

  return run


def _reset_flags():
  """Forgets parsed values and the `--config.*` override flags a parse defined."""
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)


def _fails(cli, match, *args, **kwargs):
  with pytest.raises(errors.UsageError, match=match):
    cli(*args, **kwargs)


def test_heads_not_dividing_d_model(cli):
  _fails(cli, r"num_heads=3 does not divide model.d_model=64", "--config.model.num_heads=3")


def test_kv_heads_not_dividing_heads(cli):
  _fails(
    cli, r"num_kv_heads=3 does not divide model.num_heads=4",
    "--config.model.num_heads=4", "--config.model.num_kv_heads=3",
  )  # fmt: skip


def test_chunk_size_the_op_cannot_take(cli):
  _fails(
    cli, r"model.mixer.gated_deltanet.chunk_size=0: the op takes a positive integer",
    "--config.model.attention=gated_deltanet", "--config.model.mixer.gated_deltanet.chunk_size=0",
  )  # fmt: skip


def test_block_size_the_op_cannot_take(cli):
  _fails(
    cli, r"model.mixer.nats_l.block_size=-16",
    "--config.model.layer_pattern=gated_deltanet,nats_l", "--config.model.mixer.nats_l.block_size=-16",
  )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
  "call",
  [
    lambda x, g: ops.gated_delta_rule(x, x, x, g, g, chunk_size=0),
    lambda x, g: ops.linear_attention(x, x, x, chunk_size=0),
    lambda x, g: ops.lucid_attention(x, x, x, block_size=0),
    lambda x, g: ops.block_sparse_softmax(x, x, x, g[:, :1], block_size=0),
    lambda x, g: ops.block_gated_delta_rule(x, x, x, g, g, g[:, :1], block_size=0),
    lambda x, g: ops.soft_attention(x, x, jnp.ones((2, 3, 3)), chunk_size=0),
  ],
  ids=["gated_delta_rule", "linear", "lucid", "block_sparse_softmax", "block_delta", "soft"],
)
def test_ops_reject_a_non_positive_chunk_or_block_size(call):
  x, g = jnp.ones((1, 4, 2, 3)), -jnp.ones((1, 4, 2))
  with pytest.raises(ValueError, match=r"(chunk|block)_size must be positive"):
    call(x, g)


def test_unknown_variant_in_layer_pattern(cli):
  _fails(
    cli,
    r"unknown attention variant\(s\) \['flashy'\]",
    "--config.model.layer_pattern=softmax,flashy",
  )


def test_scan_layers_with_a_mixed_pattern(cli):
  _fails(
    cli, r"scan_layers needs every layer to be the same variant",
    "--config.model.layer_pattern=softmax,linear", "--config.model.scan_layers=True",
  )  # fmt: skip


def test_packed_nats_l_needs_documents_aligned_to_its_blocks(cli):
  _fails(
    cli, r"set --config.data.pack_align=16",
    "--config.model.attention=nats_l", "--config.model.mixer.nats_l.block_size=16",
    "--config.data.pack=True",
  )  # fmt: skip


def test_pack_align_that_does_not_divide_seq_len(cli):
  _fails(
    cli, r"pack_align=48 does not divide data.seq_len",
    "--config.data.pack=True", "--config.data.pack_align=48",
  )  # fmt: skip


_TEXT = ["--config.data.task=tfds", "--config.data.tfds_name=text_corpus"]


def test_missing_data_directory(cli, tmp_path):
  missing = tmp_path / "no_such_dir"
  _fails(
    cli, rf"data.data_dir='{missing}' does not exist",
    *_TEXT, "--config.data.vocab_size=257", f"--config.data.data_dir={missing}",
  )  # fmt: skip


def test_empty_data_directory(cli, tmp_path):
  (tmp_path / "empty").mkdir()
  _fails(
    cli, r"data.data_dir=.*empty.* is empty; prepare 'text_corpus' there first",
    *_TEXT, "--config.data.vocab_size=257", f"--config.data.data_dir={tmp_path / 'empty'}",
  )  # fmt: skip


def test_text_source_without_txt_files(cli, tmp_path):
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "notes.md").write_text("not a .txt file")
  _fails(
    cli, r"data.prepare_from=.* holds no .txt files",
    *_TEXT, "--config.data.vocab_size=257", f"--config.data.prepare_from={tmp_path / 'src'}",
  )  # fmt: skip


def test_tokenizer_vocabulary_larger_than_vocab_size(cli):
  # The byte tokenizer has 257 ids; tiny's vocabulary is 64.
  _fails(cli, r"tokenizer has 257 tokens but data.vocab_size is 64", *_TEXT)


def test_tokenizer_file_that_does_not_exist(cli, tmp_path):
  _fails(
    cli, r"data.tokenizer=.*missing.model.* is neither 'byte' nor a file",
    *_TEXT, f"--config.data.tokenizer={tmp_path / 'missing.model'}",
  )  # fmt: skip


def test_workdir_that_is_not_writable(cli, tmp_path):
  # A path under a regular file cannot be created, even by root (who ignores
  # permission bits, so chmod would not show the case).
  (tmp_path / "a_file").write_text("")
  _fails(cli, r"workdir .*a_file/run.* is not writable", workdir=tmp_path / "a_file" / "run")


def test_batch_that_does_not_divide_the_mesh(cli):
  # The tests run on 8 simulated devices.
  _fails(
    cli, r"data.batch_size=12 does not divide over the mesh's batch axes \(data × fsdp = 8",
    "--config.mesh.data=8", "--config.data.batch_size=12",
  )  # fmt: skip


def test_batch_that_does_not_split_into_microbatches(cli):
  _fails(
    cli, r"does not split into optim.grad_accum_steps=3 microbatches",
    "--config.optim.grad_accum_steps=3",
  )  # fmt: skip


def test_config_file_that_does_not_exist(cli):
  _fails(
    cli, r"configs/does_not_exist\.py: no such config file", config="configs/does_not_exist.py"
  )
