"""Language-modelling data from any prepared TFDS dataset (ArrayRecord).

Reads with `tfds.data_source` (random access, no TensorFlow), tokenizes each
document, appends EOS, and packs documents into fixed windows with grain's
concat-then-split. Each process reads its own slice of the split.

With `data.pack` the windows also carry `segment_ids` [seq_len] (one id per
document, from 1; 0 is padding) so that mixers that support packed rows keep
documents apart, and the loss weight is 0 wherever the target starts a new
document (the previous document cannot predict it). Without it, documents
simply follow one another through the window and state flows across them.
"""

from __future__ import annotations

import os

import grain
import numpy as np
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from attnlab.data import text_corpus, tokenizers


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset named in the config is missing from its data_dir."""


def _data_dir(data: ConfigDict) -> str:
  return os.path.expanduser(
    data.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  )


def open_source(data: ConfigDict, split: str):
  """tfds.data_source for `split`; builds `text_corpus` from prepare_from if asked."""
  data_dir = _data_dir(data)
  if data.tfds_name == "text_corpus" and data.prepare_from:
    if not tfds.builder("text_corpus", data_dir=data_dir).is_prepared():
      if not os.path.isdir(data.prepare_from):
        raise DatasetNotPreparedError(
          f"data.prepare_from={data.prepare_from!r} is not a directory of .txt files"
        )
      text_corpus.prepare(data.prepare_from, data_dir)
  message = (
    f"TFDS dataset {data.tfds_name!r} is not prepared as ArrayRecord in "
    f"data_dir={data_dir!r}. Prepare it first, e.g.\n"
    f"  tfds build {data.tfds_name} --data_dir={data_dir} --file_format=array_record\n"
    "or, for a directory of .txt files,\n"
    f"  python -m attnlab.data.prepare --source_dir=DIR --data_dir={data_dir}\n"
    "or, for Parquet or JSON-lines files,\n"
    f"  python -m attnlab.data.prepare --source=DIR_OR_GLOB --dataset_name={data.tfds_name} "
    f"--data_dir={data_dir}"
  )
  try:
    builder = tfds.builder(data.tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotPreparedError(message) from e
  if not builder.is_prepared():
    raise DatasetNotPreparedError(message)
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError as e:  # prepared, but as TFRecord
    raise DatasetNotPreparedError(f"{message}\n({e})") from e


def lm_dataset(
  data: ConfigDict,
  *,
  split: str,
  seed: int,
  train: bool,
  batch_size: int,
  process_index: int,
  process_count: int,
) -> grain.IterDataset:
  """Batches of packed {inputs, targets, weights} windows of length seq_len."""
  tokenizer = tokenizers.get_tokenizer(data.tokenizer)
  tokenizers.check_vocab_size(tokenizer, data.vocab_size)
  source = open_source(data, tfds.even_splits(split, process_count)[process_index])
  ds = grain.MapDataset.source(source)
  if train:
    ds = ds.seed(seed).shuffle().repeat()
  text_key = data.text_key

  def tokenize(example):
    ids = tokenizer.encode(example[text_key])
    return {"tokens": np.append(ids, tokenizer.eos_id).astype(np.int32)}

  ds = pack_documents(
    ds.map(tokenize).to_iter_dataset(), data.seq_len, segments=data.pack,
    align=data.get("pack_align", 1),
  )  # fmt: skip
  return ds.batch(batch_size, drop_remainder=True)


def pack_documents(
  docs: grain.IterDataset, seq_len: int, *, segments: bool, align: int = 1
) -> grain.IterDataset:
  """{tokens [n]} documents -> {inputs, targets, weights[, segment_ids]} windows [seq_len].

  Documents are concatenated and cut into windows of seq_len + 1 tokens (grain's
  concat-then-split; a document may continue into the next window). With
  `segments`, segment_ids are the inputs' document ids and the weight of a
  target in another document than its input is 0.

  With `segments` and align > 1 (NAtS-L: its block size), every document starts
  at a multiple of `align` within its window: each document becomes its own
  (input, target) pairs, padded with weight-0 pairs to a multiple of `align`,
  and windows are cut from the pairs (seq_len a multiple of align). Nothing is
  lost against align = 1, where the target that starts a new document has
  weight 0 anyway.
  """
  if segments and align > 1:
    return _aligned_pairs(docs, seq_len, align)
  ds = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"tokens": seq_len + 1})

  def to_example(packed):
    tokens, seg = packed["tokens"], packed["tokens_segment_ids"]
    # Padding after the last document of a finite split has segment id 0.
    weights = seg[1:] > 0
    example = {"inputs": tokens[:-1], "targets": tokens[1:]}
    if segments:
      weights &= seg[1:] == seg[:-1]
      example["segment_ids"] = seg[:-1].astype(np.int32)
    example["weights"] = weights.astype(np.float32)
    return example

  return ds.map(to_example)


def _aligned_pairs(docs: grain.IterDataset, seq_len: int, align: int) -> grain.IterDataset:
  """`pack_documents` with documents starting at multiples of `align`."""
  if seq_len % align:
    raise ValueError(f"seq_len={seq_len} is not a multiple of pack_align={align}")

  def to_pairs(doc):
    tokens = doc["tokens"]
    n = len(tokens) - 1
    pad = -n % align
    pairs = {
      "inputs": np.pad(tokens[:-1], (0, pad)),
      "targets": np.pad(tokens[1:], (0, pad)),
      "weights": np.pad(np.ones(n, np.float32), (0, pad)),
    }
    return pairs

  pairs = docs.filter(lambda doc: len(doc["tokens"]) > 1).map(to_pairs)
  lengths = {"inputs": seq_len, "targets": seq_len, "weights": seq_len}
  ds = grain.experimental.ConcatThenSplitIterDataset(pairs, length_struct=lengths)

  def to_example(packed):
    seg = packed["inputs_segment_ids"]
    return {
      "inputs": packed["inputs"].astype(np.int32),
      "targets": packed["targets"].astype(np.int32),
      # Padding after the last document of a finite split has segment id 0.
      "weights": (packed["weights"] * (seg > 0)).astype(np.float32),
      "segment_ids": seg.astype(np.int32),
    }

  return ds.map(to_example)
