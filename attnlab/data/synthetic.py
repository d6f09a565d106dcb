"""Synthetic recall tasks, generated on the fly from (seed, index).

Every example is a dict of int32 `inputs` [T], `targets` [T] and float32
`weights` [T]; the loss and accuracy are taken only where weights > 0 (the
answer positions). Example i is a pure function of (seed, i), so pipelines are
deterministic, resumable and shardable without any stored data.
"""

from __future__ import annotations

import numpy as np

FILLER = 0
NEEDLE_MARKER = 1


def _example(sequence: np.ndarray, answer_positions: np.ndarray) -> dict[str, np.ndarray]:
  """Next-token pairs from a length T+1 sequence; answers are target indices."""
  weights = np.zeros(len(sequence) - 1, np.float32)
  weights[answer_positions] = 1.0
  return {
      "inputs": sequence[:-1].astype(np.int32),
      "targets": sequence[1:].astype(np.int32),
      "weights": weights,
  }


def mqar(
    index: int,
    *,
    seed: int,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    num_queries: int | None = None,
    power_a: float = 0.01,
) -> dict[str, np.ndarray]:
  """Multi-query associative recall (Arora et al., 2023, Zoology).

  The sequence opens with key-value pairs k1 v1 … kN vN (keys from the lower
  half of the vocabulary, values from the upper half). The rest is filler,
  with queried keys placed at even offsets drawn from a power law favouring
  short gaps, each followed by its value. The model must predict the value
  after each queried key.
  """
  rng = np.random.default_rng([seed, index])
  num_queries = num_kv_pairs if num_queries is None else num_queries
  context = 2 * num_kv_pairs
  slots = (seq_len + 1 - context) // 2
  half = vocab_size // 2
  if num_kv_pairs > half - 1 or num_queries > min(num_kv_pairs, slots):
    raise ValueError(
        f"MQAR cannot fit {num_kv_pairs} pairs / {num_queries} queries into "
        f"seq_len={seq_len}, vocab_size={vocab_size}"
    )
  keys = rng.choice(np.arange(1, half), size=num_kv_pairs, replace=False)
  values = rng.integers(half, vocab_size, size=num_kv_pairs)
  sequence = np.full(seq_len + 1, FILLER, np.int64)
  sequence[0:context:2], sequence[1:context:2] = keys, values

  gap_weights = power_a * np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
  chosen_slots = rng.choice(slots, size=num_queries, replace=False, p=gap_weights / gap_weights.sum())
  queried = rng.choice(num_kv_pairs, size=num_queries, replace=False)
  key_positions = context + 2 * chosen_slots
  sequence[key_positions] = keys[queried]
  sequence[key_positions + 1] = values[queried]
  return _example(sequence, key_positions)


def needle(
    index: int, *, seed: int, seq_len: int, vocab_size: int, **unused
) -> dict[str, np.ndarray]:
  """Needle in a haystack: retrieve the value stored after `MARK key`.

  Random haystack tokens; one needle `MARK key value` somewhere; the sequence
  ends with the query `MARK key`, and the answer is its value.
  """
  del unused
  rng = np.random.default_rng([seed, index])
  if seq_len < 8:
    raise ValueError(f"needle needs seq_len >= 8, got {seq_len}")
  half = vocab_size // 2
  sequence = rng.integers(2, vocab_size, size=seq_len + 1)
  key = rng.integers(2, half)
  value = rng.integers(half, vocab_size)
  position = rng.integers(0, seq_len - 4)
  sequence[position : position + 3] = (NEEDLE_MARKER, key, value)
  sequence[-3:] = (NEEDLE_MARKER, key, value)
  return _example(sequence, np.array([seq_len - 1]))


TASKS = {"mqar": mqar, "needle": needle}
