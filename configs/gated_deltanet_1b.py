"""Gated DeltaNet at ~1.4B parameters: fla's GatedDeltaNetConfig defaults
(hidden 2048, 21 layers, 6 heads of 256, expand_v 2, SwiGLU 5632, untied).

    python -m attnlab.train \
        --config=configs/gated_deltanet_1b.py:tokenizer=/path/spm32000.model \
        --workdir=gs://BUCKET/gdn_1b --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
        --distributed

Data as in configs/softmax_1b.py.
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
  m = c.model
  m.attention = "gated_deltanet"
  m.d_model = 2048
  m.num_layers = 21
  m.num_heads = 6
  m.head_dim = 256
  m.mlp_dim = 5632  # fla: 256 * ceil(int(2048 * 4 * 2/3) / 256)
  m.max_len = 1 << 16  # the recurrent state does not grow with length
  gdn = m.mixer.gated_deltanet
  gdn.expand_v = 2.0
  gdn.conv_size = 4
  return config_lib.finalize(c)
