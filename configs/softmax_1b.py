"""Softmax attention at ~1.1B parameters (TinyLlama shape), for pods and clusters.

    python -m attnlab.train \
        --config=configs/softmax_1b.py:tokenizer=/path/spm32000.model \
        --workdir=gs://BUCKET/softmax_1b \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets --distributed

Data: any ArrayRecord TFDS text dataset (default c4/en, prepared with
`tfds build c4/en --file_format=array_record`).
Tokenizer: a SentencePiece model of 32000 pieces, passed as :tokenizer=PATH;
`python -m attnlab.data.prepare --source_dir=DIR --train_tokenizer=32000` trains one
on a directory of .txt files (DATA_DIR/spm32000.model). The byte default is
rejected when the data pipeline is built (257 ids, 32000 rows).
Arguments: attention=<variant>, tokenizer=<path>, dataset=<tfds name>.
"""

from attnlab import config as config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, attention="softmax", tokenizer="byte", dataset="c4/en:3.1.0")
  c = config_lib.pretraining(config_lib.base_config(), tokenizer=arg.tokenizer, dataset=arg.dataset)
  m = c.model
  m.attention = arg.attention
  m.d_model = 2048
  m.num_layers = 22
  m.num_heads = 32
  m.num_kv_heads = 4
  m.mlp_dim = 5632
  return config_lib.finalize(c)
