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
  """Every process generates the global batch and keeps its contiguous rows, so
  a run sees the same global batches on any number of processes (generation is
  cheap next to a train step)."""
  generate = functools.partial(
    synthetic.TASKS[data.task],
    seed=seed,
    seq_len=data.seq_len,
    vocab_size=data.vocab_size,
    num_kv_pairs=data.num_kv_pairs,
    num_queries=data.num_queries,
  )
  rows = slice(process_index * batch_size, (process_index + 1) * batch_size)

  def local_rows(indices):
    return {key: value[rows] for key, value in generate(indices).items()}

  ds = grain.MapDataset.range(2**62).batch(batch_size * process_count, drop_remainder=True)
  return ds.map(local_rows).to_iter_dataset()


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
