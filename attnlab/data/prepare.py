"""Build the `text_corpus` TFDS dataset from a directory of .txt files, and
optionally train a SentencePiece tokenizer on the same corpus.

    python -m attnlab.data.prepare --source_dir=../shared/data/shakespeare \
        --data_dir=~/tensorflow_datasets
    python -m attnlab.data.prepare --source_dir=DIR --data_dir=DIR --train_tokenizer=32000

--train_tokenizer=VOCAB writes <data_dir>/spm<VOCAB>.model (or --tokenizer_prefix
+ .model), which configs take as `data.tokenizer` (the large configs as
`:tokenizer=PATH`) together with data.vocab_size=VOCAB. It needs the
sentencepiece package: pip install -e ".[sentencepiece]".
"""

import glob
import os
import time

from absl import flags

from attnlab import cli, errors, metrics
from attnlab.data import text_corpus, tokenizers

_SOURCE = flags.DEFINE_string("source_dir", None, "Directory of .txt files.", required=True)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", os.path.expanduser("~/tensorflow_datasets"), "TFDS data_dir to build into."
)
_TRAIN_TOKENIZER = flags.DEFINE_integer(
  "train_tokenizer",
  0,
  "Train a SentencePiece model of this many pieces on the corpus (0: no).",
  lower_bound=0,
)
_TOKENIZER_PREFIX = flags.DEFINE_string(
  "tokenizer_prefix", None, "Output path of the tokenizer without .model (default data_dir/spmN)."
)
_BUILD_DATASET = flags.DEFINE_bool("build_dataset", True, "Build the text_corpus dataset.")


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
  if not os.path.isdir(_SOURCE.value):
    raise errors.PathError(f"--source_dir={_SOURCE.value}: no such directory")
  files = sorted(glob.glob(os.path.join(_SOURCE.value, "**", "*.txt"), recursive=True))
  if not files:
    raise errors.PathError(f"no .txt files under --source_dir={_SOURCE.value}")
  size = sum(os.path.getsize(f) for f in files)
  steps = int(_BUILD_DATASET.value) + int(_TRAIN_TOKENIZER.value > 0)
  progress = metrics.Progress(total=steps + 1, label="data.prepare")
  progress.update(step="scanned", files=len(files), MB=f"{size / 1e6:.1f}")
  data_dir = os.path.expanduser(_DATA_DIR.value)
  if _TRAIN_TOKENIZER.value:
    start = time.time()
    prefix = _TOKENIZER_PREFIX.value or os.path.join(data_dir, f"spm{_TRAIN_TOKENIZER.value}")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    path = tokenizers.train_sentencepiece(files, prefix, _TRAIN_TOKENIZER.value)
    progress.update(step="trained tokenizer", into=path, took=f"{time.time() - start:.0f}s")
  if _BUILD_DATASET.value:
    start = time.time()
    text_corpus.prepare(_SOURCE.value, data_dir)
    progress.update(step="built text_corpus", into=data_dir, took=f"{time.time() - start:.0f}s")
  progress.close()


if __name__ == "__main__":
  cli.run(main)
