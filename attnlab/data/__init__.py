"""Input pipelines (grain): synthetic recall tasks and TFDS text."""

from __future__ import annotations

import functools

import grain
from ml_collections import ConfigDict

from attnlab.data import synthetic, text

_EVAL_SEED_OFFSET = 1_000_003


def _synthetic(
  data: ConfigDict, *, seed: int, batch_size: int, process_index: int, process_count: int
):
  generate = functools.partial(
    synthetic.TASKS[data.task],
    seed=seed,
    seq_len=data.seq_len,
    vocab_size=data.vocab_size,
    num_kv_pairs=data.num_kv_pairs,
    num_queries=data.num_queries,
  )
  ds = grain.MapDataset.range(2**62)[process_index::process_count]
  return ds.batch(batch_size, drop_remainder=True).map(generate).to_iter_dataset()


def make_dataset(
  data: ConfigDict, *, seed: int, train: bool, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
  """This process's share of the train (infinite) or eval dataset, batched."""
  global_batch = data.batch_size if train else data.eval_batch_size
  if global_batch % process_count:
    raise ValueError(f"batch size {global_batch} does not split over {process_count} processes")
  kwargs = dict(
    batch_size=global_batch // process_count,
    process_index=process_index,
    process_count=process_count,
  )
  if data.task in synthetic.TASKS:
    return _synthetic(data, seed=seed if train else seed + _EVAL_SEED_OFFSET, **kwargs)
  if data.task == "tfds":
    split = data.train_split if train else data.eval_split
    return text.lm_dataset(data, split=split, seed=seed, train=train, **kwargs)
  raise ValueError(f"unknown data.task {data.task!r}; choose mqar, needle or tfds")
