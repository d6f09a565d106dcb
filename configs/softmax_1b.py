"""Softmax attention at ~1.1B parameters (TinyLlama shape), for pods and clusters.

    python -m attnlab.train --config=configs/softmax_1b.py --workdir=gs://BUCKET/softmax_1b \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets --distributed

Data: any ArrayRecord TFDS text dataset (default c4/en, prepared with
`tfds build c4/en --file_format=array_record`), tokenized with a SentencePiece
model of 32000 pieces given by `:tokenizer=/path/to/spm.model`.
Arguments: attention=<variant>, tokenizer=<path>, dataset=<tfds name>.
"""

from attnlab import config as config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, attention="softmax", tokenizer="byte", dataset="c4/en:3.1.0")
  c = config_lib.base_config()
  c.total_steps = 50_000  # ~100B tokens at 2M tokens per step
  c.log_every = 50
  c.eval_every = 1000
  c.eval_batches = 20
  c.checkpoint_every = 1000
  c.mesh = dict(data=1, fsdp=-1, tensor=1)  # FSDP within a slice

  m = c.model
  m.attention = arg.attention
  m.d_model = 2048
  m.num_layers = 22
  m.num_heads = 32
  m.num_kv_heads = 4
  m.mlp_dim = 5632
  m.tie_embeddings = False
  m.dtype = "bfloat16"
  m.remat = True
  m.max_len = 2048

  d = c.data
  d.task = "tfds"
  d.tfds_name = arg.dataset
  d.train_split = "train"
  d.eval_split = "validation"
  d.tokenizer = arg.tokenizer
  d.vocab_size = 32000
  d.seq_len = 2048
  d.batch_size = 1024
  d.eval_batch_size = 256

  o = c.optim
  o.lr = 4e-4
  o.warmup_steps = 2000
  o.weight_decay = 0.1
  o.min_lr_ratio = 0.1
  return config_lib.finalize(c)
