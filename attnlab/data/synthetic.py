"""Synthetic recall tasks, generated on the fly, a whole batch at a time.

A batch is a dict of int32 `inputs` [B, T], `targets` [B, T] and float32
`weights` [B, T]; loss and accuracy are taken only where weights > 0 (the
answer positions). A batch is a pure function of (seed, example indices), so
pipelines are deterministic, resumable and shardable without stored data, and
generation is vectorised (per-example generation would bottleneck small models).
"""

from __future__ import annotations

import numpy as np

FILLER = 0
NEEDLE_MARKER = 1


def _batch(sequences: np.ndarray, answer_mask: np.ndarray) -> dict[str, np.ndarray]:
  """Next-token pairs from [B, T+1] sequences; `answer_mask` is [B, T]."""
  return {
    "inputs": sequences[:, :-1].astype(np.int32),
    "targets": sequences[:, 1:].astype(np.int32),
    "weights": answer_mask.astype(np.float32),
  }


def _top_k_without_replacement(rng, log_weights: np.ndarray, batch: int, k: int) -> np.ndarray:
  """[batch, k] distinct indices drawn with probabilities ∝ exp(log_weights) (Gumbel top-k)."""
  scores = log_weights[None] + rng.gumbel(size=(batch, len(log_weights)))
  return np.argsort(-scores, axis=1)[:, :k]


def mqar(
  indices: np.ndarray,
  *,
  seed: int,
  seq_len: int,
  vocab_size: int,
  num_kv_pairs: int,
  num_queries: int | None = None,
  power_a: float = 0.01,
) -> dict[str, np.ndarray]:
  """A batch of multi-query associative recall (Arora et al., 2023, Zoology).

  Each sequence opens with key-value pairs k1 v1 … kN vN (keys from the lower
  half of the vocabulary, values from the upper half). The rest is filler,
  with queried keys placed at even offsets drawn from a power law favouring
  short gaps, each followed by its value. The model must predict the value
  after each queried key. The batch is a pure function of (seed, indices).
  """
  indices = np.asarray(indices)
  rng = np.random.default_rng([seed, int(indices[0]), len(indices)])
  batch = len(indices)
  num_queries = num_kv_pairs if num_queries is None else num_queries
  context = 2 * num_kv_pairs
  slots = (seq_len + 1 - context) // 2
  half = vocab_size // 2
  if num_kv_pairs > half - 1 or num_queries > min(num_kv_pairs, slots):
    raise ValueError(
      f"MQAR cannot fit {num_kv_pairs} pairs / {num_queries} queries into "
      f"seq_len={seq_len}, vocab_size={vocab_size}"
    )
  rows = np.arange(batch)[:, None]
  keys = 1 + _top_k_without_replacement(rng, np.zeros(half - 1), batch, num_kv_pairs)
  values = rng.integers(half, vocab_size, size=(batch, num_kv_pairs))
  sequences = np.full((batch, seq_len + 1), FILLER, np.int64)
  sequences[:, 0:context:2], sequences[:, 1:context:2] = keys, values

  gap_log_weights = (power_a - 1) * np.log(np.arange(1, slots + 1, dtype=np.float64))
  chosen_slots = _top_k_without_replacement(rng, gap_log_weights, batch, num_queries)
  queried = _top_k_without_replacement(rng, np.zeros(num_kv_pairs), batch, num_queries)
  key_positions = context + 2 * chosen_slots
  sequences[rows, key_positions] = keys[rows, queried]
  sequences[rows, key_positions + 1] = values[rows, queried]
  answer_mask = np.zeros((batch, seq_len), bool)
  answer_mask[rows, key_positions] = True
  return _batch(sequences, answer_mask)


def needle(
  indices: np.ndarray, *, seed: int, seq_len: int, vocab_size: int, **unused
) -> dict[str, np.ndarray]:
  """A batch of needle-in-a-haystack retrieval.

  Random haystack tokens; one needle `MARK key value` somewhere; each sequence
  ends with the query `MARK key`, and the answer is its value.
  """
  del unused
  indices = np.asarray(indices)
  rng = np.random.default_rng([seed, int(indices[0]), len(indices)])
  batch = len(indices)
  if seq_len < 8:
    raise ValueError(f"needle needs seq_len >= 8, got {seq_len}")
  half = vocab_size // 2
  rows = np.arange(batch)
  sequences = rng.integers(2, vocab_size, size=(batch, seq_len + 1))
  key = rng.integers(2, half, size=batch)
  value = rng.integers(half, vocab_size, size=batch)
  position = rng.integers(0, seq_len - 4, size=batch)
  for offset, token in enumerate((np.full(batch, NEEDLE_MARKER), key, value)):
    sequences[rows, position + offset] = token
    sequences[rows, seq_len - 2 + offset] = token
  answer_mask = np.zeros((batch, seq_len), bool)
  answer_mask[:, -1] = True
  return _batch(sequences, answer_mask)


def multi_needle(
  indices: np.ndarray,
  *,
  seed: int,
  seq_len: int,
  vocab_size: int,
  num_kv_pairs: int,
  num_queries: int | None = 1,
  **unused,
) -> dict[str, np.ndarray]:
  """A batch of multi-key needle retrieval (RULER's MK-NIAH, and MQ-NIAH when
  `num_queries` > 1).

  A haystack of random tokens holds `num_kv_pairs` needles `MARK key value`
  (distinct keys, lower half of the vocabulary; values from the upper half) at
  uniformly random, non-overlapping places. The sequence ends with
  `num_queries` queries `MARK key value` for distinct needles in random order;
  the model must predict each value after its key, the other needles being
  distractors. MARK appears nowhere else, so every query has one answer.
  """
  del unused
  indices = np.asarray(indices)
  rng = np.random.default_rng([seed, int(indices[0]), len(indices), 7])
  batch = len(indices)
  num_queries = 1 if num_queries is None else num_queries
  half = vocab_size // 2
  haystack = seq_len + 1 - 3 * num_queries  # tokens before the queries
  if not 1 <= num_queries <= num_kv_pairs <= half - 2 or 3 * num_kv_pairs > haystack:
    raise ValueError(
      f"multi_needle cannot fit {num_kv_pairs} needles / {num_queries} queries into "
      f"seq_len={seq_len}, vocab_size={vocab_size}"
    )
  rows = np.arange(batch)[:, None]
  sequences = rng.integers(2, vocab_size, size=(batch, seq_len + 1))
  keys = 2 + _top_k_without_replacement(rng, np.zeros(half - 2), batch, num_kv_pairs)
  values = rng.integers(half, vocab_size, size=(batch, num_kv_pairs))
  # Uniform non-overlapping placement: n sorted starts among haystack - 2n places,
  # the i-th shifted right by 2i to make room for the two tokens before it.
  free = haystack - 2 * num_kv_pairs
  starts = np.sort(_top_k_without_replacement(rng, np.zeros(free), batch, num_kv_pairs), axis=1)
  starts = starts + 2 * np.arange(num_kv_pairs)
  queried = _top_k_without_replacement(rng, np.zeros(num_kv_pairs), batch, num_queries)
  query_starts = haystack + 3 * np.arange(num_queries)
  marker = np.full((batch, 1), NEEDLE_MARKER)
  for offset, (needle_tokens, query_tokens) in enumerate(
    ((marker, marker), (keys, keys[rows, queried]), (values, values[rows, queried]))
  ):
    sequences[rows, starts + offset] = needle_tokens
    sequences[rows, query_starts + offset] = query_tokens
  answer_mask = np.zeros((batch, seq_len), bool)
  answer_mask[:, query_starts + 1] = True  # the input is the key, the target its value
  return _batch(sequences, answer_mask)


TASKS = {"mqar": mqar, "needle": needle, "multi_needle": multi_needle}
