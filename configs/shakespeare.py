"""Byte-level language model on the complete works of Shakespeare.

    python -m attnlab.train --config=configs/shakespeare.py --workdir=runs/shakespeare
    python -m attnlab.train --config=configs/shakespeare.py:attention=linear,seq_len=512 \
        --workdir=runs/shakespeare_linear
    python -m attnlab.sample --workdir=runs/shakespeare --prompt="ROMEO:" --temperature=0.8

The `text_corpus` TFDS dataset is built on first use from `:source=DIR` (by
default ../shared/data/shakespeare beside the repository) into
`--config.data.data_dir` (default ~/tensorflow_datasets). Whole plays are
held out for validation.
Arguments: attention=<variant>, seq_len=<int>, steps=<int>, source=<dir>.
"""

import os

from attnlab import config as config_lib

_DEFAULT_SOURCE = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "shakespeare"
)


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(
    arg, attention="softmax", seq_len=256, steps=5000, source=os.path.normpath(_DEFAULT_SOURCE)
  )
  c = config_lib.base_config()
  c.total_steps = arg.steps
  c.log_every = 50
  c.eval_every = 500
  c.eval_batches = 16
  c.checkpoint_every = 500

  c.model.attention = arg.attention
  c.model.d_model = 256
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.mlp_dim = 1024
  c.model.max_len = 4096

  d = c.data
  d.task = "tfds"
  d.tfds_name = "text_corpus"
  d.prepare_from = arg.source
  d.tokenizer = "byte"
  d.vocab_size = 264  # 257 byte tokens, rounded up to a multiple of 8
  d.seq_len = arg.seq_len
  d.batch_size = 32
  d.eval_batch_size = 32

  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  return config_lib.finalize(c)
