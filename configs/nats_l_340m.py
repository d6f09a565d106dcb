"""NAtS-L 340M, the paper's configuration (automl/NeuralAttentionSearchLinear,
experiments/configs/natsl_340M.json): hidden 1024, 21 layers, Gated DeltaNet
layers with 6 heads of 128 (expand_v 2) and NAtS-L at layers 3, 7, 11, 15, 19
and 20 with 12 softmax heads and 64-token blocks; SwiGLU 2816, untied.

    python -m attnlab.train \
        --config=configs/nats_l_340m.py:tokenizer=/path/spm32000.model \
        --workdir=gs://BUCKET/nats_l_340m \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets --distributed

The released recipe trains 20480 steps of 524,288 tokens at seq_len 4096,
lr 3e-4 with 1024 warmup steps.
Tokenizer: a SentencePiece model of 32000 pieces, passed as :tokenizer=PATH;
`python -m attnlab.data.prepare --source_dir=DIR --train_tokenizer=32000` trains one
on a directory of .txt files (DATA_DIR/spm32000.model). The byte default is
rejected when the data pipeline is built (257 ids, 32000 rows).
Arguments: tokenizer=<path>, dataset=<tfds name>.
"""

from attnlab import config as config_lib

NATS_L_LAYERS = (3, 7, 11, 15, 19, 20)


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, tokenizer="byte", dataset="c4/en:3.1.0")
  c = config_lib.pretraining(config_lib.base_config(), tokenizer=arg.tokenizer, dataset=arg.dataset)
  c.total_steps = 20_480
  m = c.model
  m.d_model = 1024
  m.num_layers = 21
  m.num_heads = 6
  m.head_dim = 128
  m.mlp_dim = 2816  # fla: 256 * ceil(int(1024 * 4 * 2/3) / 256)
  m.layer_pattern = ",".join(
    "nats_l" if i in NATS_L_LAYERS else "gated_deltanet" for i in range(m.num_layers)
  )
  m.max_len = 8192
  m.scan_layers = False  # mixed variants: layers are unrolled
  m.mixer.nats_l.num_attn_heads = 12
  m.mixer.nats_l.block_size = 64

  c.data.seq_len = 4096
  c.data.batch_size = 128  # 524,288 tokens per step
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 1024
  return config_lib.finalize(c)
