"""Input pipelines: synthetic tasks, the text builder, per-host splits, errors."""

import numpy as np
import pytest

from attnlab import config as config_lib
from attnlab.data import make_dataset, synthetic, text, text_corpus, tokenizers

from .conftest import SHAKESPEARE


def test_mqar_answers_are_the_values_of_queried_keys():
  batch = synthetic.mqar(np.arange(40), seed=3, seq_len=64, vocab_size=64, num_kv_pairs=8)
  for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
    keys = inputs[0:16:2]
    assert len(set(keys.tolist())) == 8 and keys.max() < 32 and inputs[1:16:2].min() >= 32
    pairs = dict(zip(keys.tolist(), inputs[1:16:2].tolist()))
    answer_at = np.nonzero(weights)[0]
    assert len(answer_at) == 8 and answer_at.min() >= 15
    assert len(set(inputs[answer_at].tolist())) == 8  # every key queried once
    for p in answer_at:
      assert targets[p] == pairs[inputs[p]]  # the value stored for the queried key
    np.testing.assert_array_equal(inputs[1:], targets[:-1])


def test_mqar_query_gaps_follow_a_decreasing_power_law():
  batch = synthetic.mqar(np.arange(4000), seed=0, seq_len=64, vocab_size=64, num_kv_pairs=1)
  slots = (np.nonzero(batch["weights"])[1] - 2) // 2
  counts = np.bincount(slots, minlength=31)
  assert counts[0] > counts[1] > counts[5] > counts[30] > 0


def test_synthetic_is_deterministic_and_seed_dependent():
  a = synthetic.mqar(np.arange(8), seed=0, seq_len=32, vocab_size=64, num_kv_pairs=4)
  b = synthetic.mqar(np.arange(8), seed=0, seq_len=32, vocab_size=64, num_kv_pairs=4)
  c = synthetic.mqar(np.arange(8), seed=1, seq_len=32, vocab_size=64, num_kv_pairs=4)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert not np.array_equal(a["inputs"], c["inputs"])


def test_needle_answer_follows_marker_and_key():
  batch = synthetic.needle(np.arange(16), seed=0, seq_len=40, vocab_size=64)
  for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
    assert np.nonzero(weights)[0].tolist() == [39]
    key = inputs[39]
    assert inputs[38] == synthetic.NEEDLE_MARKER
    marks = np.nonzero(inputs[:37] == synthetic.NEEDLE_MARKER)[0]
    needle_at = [m for m in marks if inputs[m + 1] == key][0]
    assert targets[39] == inputs[needle_at + 2]


def test_mqar_rejects_impossible_sizes():
  with pytest.raises(ValueError, match="cannot fit"):
    synthetic.mqar(np.arange(2), seed=0, seq_len=16, vocab_size=64, num_kv_pairs=12)


def test_processes_read_disjoint_synthetic_shards():
  data = config_lib.base_config().data
  data.batch_size = 8
  shards = [
    next(iter(make_dataset(data, seed=0, train=True, process_index=i, process_count=2)))
    for i in range(2)
  ]
  assert shards[0]["inputs"].shape == (4, data.seq_len)
  assert not np.array_equal(shards[0]["inputs"], shards[1]["inputs"])


def test_iterator_state_round_trip():
  data = config_lib.base_config().data
  it = iter(make_dataset(data, seed=0, train=True))
  next(it)
  state = it.get_state()
  expected = next(it)
  it2 = iter(make_dataset(data, seed=0, train=True))
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)["inputs"], expected["inputs"])


def test_byte_tokenizer_round_trip():
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode("Ay, marry — 'tis so.")
  assert ids.min() >= 1 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == "Ay, marry — 'tis so."


def test_passages_keep_every_line():
  text_in = "".join(f"line {i}\n" for i in range(500))
  chunks = text_corpus.passages(text_in, size=300)
  assert "".join(chunks) == text_in and all(len(c) < 320 for c in chunks)


def _text_config(tmp_path, **kw):
  data = config_lib.base_config().data
  data.update(
    dict(
      task="tfds",
      tfds_name="text_corpus",
      data_dir=str(tmp_path / "tfds"),
      seq_len=48,
      batch_size=4,
      eval_batch_size=4,
      vocab_size=264,
    )
  )
  data.update(kw)
  return data


def test_text_corpus_build_and_pipeline(tmp_path):
  works = tmp_path / "works"
  works.mkdir()
  for i in range(9):
    (works / f"work_{i}.txt").write_text(
      "".join(f"Work {i}, line {j}: to be or not.\n" for j in range(200))
    )
  data = _text_config(tmp_path, prepare_from=str(works))
  batch = next(iter(make_dataset(data, seed=0, train=True)))
  assert batch["inputs"].shape == (4, 48)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  train_text = tokenizers.ByteTokenizer().decode(batch["inputs"][0])
  assert "line" in train_text
  # Whole works are held out: work_4 is validation only.
  eval_batches = list(make_dataset(data, seed=0, train=False))
  eval_text = "".join(tokenizers.ByteTokenizer().decode(b["inputs"].ravel()) for b in eval_batches)
  assert "Work 4," in eval_text and "Work 3," not in eval_text
  splits = text_corpus.split_works(sorted(works.glob("*.txt")))
  assert [p.stem for p in splits["validation"]] == ["work_4"]


def test_missing_dataset_gives_instructions(tmp_path):
  data = _text_config(tmp_path, tfds_name="lm1b")
  with pytest.raises(text.DatasetNotPreparedError, match="tfds build lm1b"):
    make_dataset(data, seed=0, train=True)
  data = _text_config(tmp_path, tfds_name="no_such_dataset")
  with pytest.raises(text.DatasetNotPreparedError, match="not prepared"):
    make_dataset(data, seed=0, train=True)


@pytest.mark.skipif(not SHAKESPEARE.is_dir(), reason="../shared/data/shakespeare not present")
def test_shakespeare_corpus_builds(tmp_path):
  data = _text_config(tmp_path, prepare_from=str(SHAKESPEARE))
  batch = next(iter(make_dataset(data, seed=0, train=True)))
  assert batch["weights"].mean() == 1.0
  assert len(text_corpus.split_works(sorted(SHAKESPEARE.glob("*.txt")))["validation"]) >= 4
