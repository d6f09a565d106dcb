"""Build a TFDS text dataset from local files, and optionally train a tokenizer
on the same corpus.

A directory of .txt files becomes the `text_corpus` dataset (attnlab/data/text_corpus.py):

    python -m attnlab.data.prepare --source_dir=../shared/data/shakespeare \
        --data_dir=~/tensorflow_datasets
    python -m attnlab.data.prepare --source_dir=DIR --data_dir=DIR --train_tokenizer=32000

Parquet or JSON-lines shards (a directory, a file or a glob; .gz too) become
the dataset --dataset_name (attnlab/data/text_shards.py); killed, the same
command resumes, keeping every input shard already converted:

    python -m attnlab.data.prepare --source='corpus/*.parquet' --text_field=text \
        --dataset_name=my_corpus --data_dir=DIR --train_tokenizer=8192 --tokenizer_kind=hf

--train_tokenizer=VOCAB trains, with --tokenizer_kind=sentencepiece (the
default), <data_dir>/spm<VOCAB>.model (pip install -e ".[sentencepiece]"); with
--tokenizer_kind=hf, a byte-level BPE <data_dir>/bpe<VOCAB>.json, a Hugging Face
tokenizer.json (pip install -e ".[tokenizers]"). --tokenizer_prefix sets the
path without its extension. Configs take either as `data.tokenizer` (the large
configs as `:tokenizer=PATH`) together with data.vocab_size=VOCAB.
"""

import glob
import os
import time

from absl import flags

from attnlab import cli, errors, metrics
from attnlab.data import text_corpus, text_shards, tokenizers

_SOURCE_DIR = flags.DEFINE_string(
  "source_dir", None, "Directory of .txt files (builds the text_corpus dataset)."
)
_SOURCE = flags.DEFINE_string(
  "source",
  None,
  "Parquet or JSON-lines files (.parquet, .jsonl, .json, .jsonl.gz, .json.gz): a directory, "
  "a file or a glob (builds --dataset_name).",
)
_TEXT_FIELD = flags.DEFINE_string(
  "text_field", "text", "With --source: the column / JSON field that holds each document."
)
_DATASET_NAME = flags.DEFINE_string(
  "dataset_name",
  text_shards.DEFAULT_NAME,
  "With --source: the TFDS name of the dataset built (data.tfds_name).",
)
_HOLDOUT_EVERY = flags.DEFINE_integer(
  "holdout_every",
  text_shards.HOLDOUT_EVERY,
  "With --source: about one document in this many is held out for validation (by a hash of "
  "its text).",
)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", os.path.expanduser("~/tensorflow_datasets"), "TFDS data_dir to build into."
)
_TRAIN_TOKENIZER = flags.DEFINE_integer(
  "train_tokenizer",
  0,
  "Train a tokenizer of this many tokens on the corpus (0: no).",
  lower_bound=0,
)
_TOKENIZER_KIND = flags.DEFINE_enum(
  "tokenizer_kind",
  "sentencepiece",
  ["sentencepiece", "hf"],
  "sentencepiece: a SentencePiece BPE .model; hf: a byte-level BPE Hugging Face tokenizer.json.",
)
_TOKENIZER_PREFIX = flags.DEFINE_string(
  "tokenizer_prefix",
  None,
  "Output path of the tokenizer without .model / .json (default data_dir/spmN or data_dir/bpeN).",
)
_TOKENIZER_MAX_DOCS = flags.DEFINE_integer(
  "tokenizer_max_docs",
  1_000_000,
  "With --source: train the tokenizer on the first this many training documents.",
  lower_bound=1,
)
_BUILD_DATASET = flags.DEFINE_bool("build_dataset", True, "Build the dataset.")

_SOURCE_ONLY = (_TEXT_FIELD, _DATASET_NAME, _HOLDOUT_EVERY, _TOKENIZER_MAX_DOCS)


def _check_flags() -> None:
  if _SOURCE_DIR.value and _SOURCE.value:
    raise errors.UsageError("give one of --source_dir and --source, not both")
  if not (_SOURCE_DIR.value or _SOURCE.value):
    raise errors.UsageError(
      "give --source_dir=DIR (.txt files) or --source=DIR_OR_GLOB (Parquet or JSON-lines files)"
    )
  if _SOURCE_DIR.value:
    given = [f"--{holder.name}" for holder in _SOURCE_ONLY if flags.FLAGS[holder.name].present]
    if given:
      raise errors.UsageError(f"{', '.join(given)} applies to --source only, not --source_dir")
  vocab, kind = _TRAIN_TOKENIZER.value, _TOKENIZER_KIND.value
  least = tokenizers.HF_MIN_VOCAB if kind == "hf" else 256 + 3 + 1
  if 0 < vocab < least:
    raise errors.UsageError(
      f"--train_tokenizer={vocab} is too small for a {kind} tokenizer: it needs at least "
      f"{least} tokens (256 bytes and the special tokens come first)"
    )


def _tokenizer_path(data_dir: str) -> str:
  vocab, hf = _TRAIN_TOKENIZER.value, _TOKENIZER_KIND.value == "hf"
  prefix = _TOKENIZER_PREFIX.value or os.path.join(data_dir, f"{'bpe' if hf else 'spm'}{vocab}")
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  return prefix + (".json" if hf else "")


def _train_tokenizer(data_dir: str, *, files=None, texts=None) -> str:
  """Trains the tokenizer the flags ask for on `files` (.txt) or `texts`."""
  path, vocab = _tokenizer_path(data_dir), _TRAIN_TOKENIZER.value
  if _TOKENIZER_KIND.value == "sentencepiece":
    return tokenizers.train_sentencepiece(files, path, vocab, texts=texts)
  return tokenizers.train_hf_bpe(texts if texts is not None else _passages(files), path, vocab)


def _passages(files: list[str]):
  """.txt works as passages, so that the trainer's unit stays small."""
  for path in files:
    with open(path, encoding="utf-8", errors="replace") as f:
      yield from text_corpus.passages(f.read())


def _prepare_text_dir(data_dir: str) -> None:
  source = _SOURCE_DIR.value
  if not os.path.isdir(source):
    raise errors.PathError(f"--source_dir={source}: no such directory")
  files = sorted(glob.glob(os.path.join(source, "**", "*.txt"), recursive=True))
  if not files:
    raise errors.PathError(f"no .txt files under --source_dir={source}")
  size = sum(os.path.getsize(f) for f in files)
  steps = int(_BUILD_DATASET.value) + int(_TRAIN_TOKENIZER.value > 0)
  progress = metrics.Progress(total=steps + 1, label="data.prepare")
  progress.update(step="scanned", files=len(files), MB=f"{size / 1e6:.1f}")
  if _TRAIN_TOKENIZER.value:
    start = time.time()
    path = _train_tokenizer(data_dir, files=files)
    progress.update(step="trained tokenizer", into=path, took=f"{time.time() - start:.0f}s")
  if _BUILD_DATASET.value:
    start = time.time()
    text_corpus.prepare(source, data_dir)
    progress.update(step="built text_corpus", into=data_dir, took=f"{time.time() - start:.0f}s")
  progress.close()


def _prepare_shards(data_dir: str) -> None:
  files = text_shards.find_files(_SOURCE.value)
  text_shards.check_name(_DATASET_NAME.value)
  if _HOLDOUT_EVERY.value < 2:
    raise errors.UsageError(f"--holdout_every={_HOLDOUT_EVERY.value} must be at least 2")
  text_shards.scan(files, _TEXT_FIELD.value)  # every file's field, before anything is written
  if _BUILD_DATASET.value:
    text_shards.prepare(
      files,
      data_dir,
      name=_DATASET_NAME.value,
      text_field=_TEXT_FIELD.value,
      holdout_every=_HOLDOUT_EVERY.value,
    )
  if _TRAIN_TOKENIZER.value:
    progress = metrics.Progress(total=1, label="data.prepare tokenizer")
    start = time.time()
    texts = text_shards.training_documents(
      files, _TEXT_FIELD.value, _HOLDOUT_EVERY.value, _TOKENIZER_MAX_DOCS.value
    )
    path = _train_tokenizer(data_dir, texts=texts)
    progress.update(step="trained tokenizer", into=path, took=f"{time.time() - start:.0f}s")
    progress.close()


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
  _check_flags()
  data_dir = os.path.expanduser(_DATA_DIR.value)
  if _SOURCE.value:
    _prepare_shards(data_dir)
  else:
    _prepare_text_dir(data_dir)


if __name__ == "__main__":
  cli.run(main)
