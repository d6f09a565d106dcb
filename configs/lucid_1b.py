"""LUCID at ~1.1B parameters: the paper's TinyLlama-like shape (hidden 2048,
22 layers, 32 heads of 68, 4 kv heads, SwiGLU 5632, NoPE), for pods and clusters.

    python -m attnlab.train \
        --config=configs/lucid_1b.py:tokenizer=/path/spm32000.model \
        --workdir=gs://BUCKET/lucid_1b \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets --distributed

Recipe of the release (saisuryadv/LUCID, lucid/train_lucid.slurm), in fp32: block 2048,
global batch 256, lr 5e-4 with cosine decay and 6% warmup, AdamW β2 0.99,
ε 1e-12, weight decay 0.01, one epoch of ~6.5B Dolma tokens (≈12.4k steps).
Data as in configs/softmax_1b.py (any ArrayRecord TFDS text dataset).
Tokenizer: a SentencePiece model of 32000 pieces, passed as :tokenizer=PATH;
`python -m attnlab.data.prepare --source_dir=DIR --train_tokenizer=32000` trains one
on a directory of .txt files (DATA_DIR/spm32000.model). The byte default is
rejected when the data pipeline is built (257 ids, 32000 rows).
Arguments: tokenizer=<path>, dataset=<tfds name>.
"""

from attnlab import config as config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, tokenizer="byte", dataset="c4/en:3.1.0")
  c = config_lib.pretraining(config_lib.base_config(), tokenizer=arg.tokenizer, dataset=arg.dataset)
  c.total_steps = 12_400  # 6.5B tokens / (256 × 2048)
  m = c.model
  m.attention = "lucid"
  m.d_model = 2048
  m.num_layers = 22
  m.num_heads = 32
  m.num_kv_heads = 4
  m.head_dim = 68
  m.mlp_dim = 5632
  m.norm_eps = 1e-5
  m.rope = False
  m.mixer.lucid.eps = 1e-5
  m.mixer.lucid.block_size = 256
  # The release computes in fp32 (its model config: torch_dtype float32). κ(L)
  # grows with T (≈1e7 at 64K in the paper), and V′ = L⁻¹V rounded to bf16
  # would lose what the solve kept; the solve itself always runs in fp32.
  m.dtype = "float32"

  c.data.batch_size = 256
  c.data.seq_len = 2048
  o = c.optim
  o.lr = 5e-4
  o.warmup_steps = 744  # 6% of the steps
  o.min_lr_ratio = 0.0
  o.b2 = 0.99
  o.eps = 1e-12
  o.weight_decay = 0.01
  return config_lib.finalize(c)
