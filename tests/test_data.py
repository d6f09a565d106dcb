"""Input pipelines: synthetic tasks, the text builder, per-host splits, errors."""

import numpy as np
import pytest
from flax import nnx

from attnlab import config as config_lib
from attnlab.data import make_dataset, synthetic, text, text_corpus, tokenizers

from .conftest import PACKED_MIXERS, SHAKESPEARE, forward, packed_model


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
  # Power law, not merely decreasing: p(gap) ∝ gap^(a - 1) with a = 0.01 puts about
  # equal mass in every octave of gaps (2-3, 4-7, 8-15, 16-31); a faster (e.g.
  # geometric) decay empties the far octaves, a flatter one fills them.
  octaves = np.array([counts[2**j - 1 : 2 ** (j + 1) - 1].sum() for j in range(1, 5)])
  assert np.all(np.abs(octaves / octaves.mean() - 1) < 0.2), octaves


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


def test_multi_needle_queries_answer_with_their_own_needles_value():
  kw = dict(seed=5, seq_len=48, vocab_size=64, num_kv_pairs=6, num_queries=2)
  batch = synthetic.multi_needle(np.arange(64), **kw)
  again = synthetic.multi_needle(np.arange(64), **kw)
  np.testing.assert_array_equal(batch["inputs"], again["inputs"])
  starts = []
  for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    assert np.nonzero(weights)[0].tolist() == [44, 47]  # the two query keys at the end
    marks = np.nonzero(inputs[:43] == synthetic.NEEDLE_MARKER)[0]
    assert len(marks) == 6 and np.diff(marks).min() >= 3  # six whole needles, no overlap
    needles = {inputs[m + 1]: inputs[m + 2] for m in marks}
    assert len(needles) == 6 and max(needles) < 32 and min(needles.values()) >= 32
    assert inputs[43] == inputs[46] == synthetic.NEEDLE_MARKER and inputs[44] != inputs[47]
    for p in (44, 47):
      assert targets[p] == needles[inputs[p]]
    starts.extend(marks.tolist())
  assert min(starts) == 0 and max(starts) >= 35  # needles reach both ends of the haystack
  with pytest.raises(ValueError, match="cannot fit"):
    synthetic.multi_needle(np.arange(2), seed=0, seq_len=17, vocab_size=64, num_kv_pairs=6)


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
  # Disjoint: no example is in both shards (not merely shards that differ somewhere).
  rows = [{row.tobytes() for row in shard["inputs"]} for shard in shards]
  assert len(rows[0]) == len(rows[1]) == 4 and not rows[0] & rows[1]


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


def _docs(lengths, seed=0):
  """In-memory {tokens} documents, each ending in EOS = 1 (ids 2..49 otherwise)."""
  import grain

  rng = np.random.default_rng(seed)
  docs = [np.append(rng.integers(2, 50, n - 1), 1).astype(np.int32) for n in lengths]
  return docs, grain.MapDataset.source(docs).map(lambda x: {"tokens": x}).to_iter_dataset()


def test_packing_yields_segment_ids_and_masks_targets_across_documents():
  docs, ds = _docs([5, 9, 3, 20, 7, 6])
  examples = list(text.pack_documents(ds, 12, segments=True))
  flat = np.concatenate(docs)
  doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
  for i, ex in enumerate(examples[:3]):  # full windows of 13 tokens, stride 13
    window = slice(13 * i, 13 * i + 13)
    np.testing.assert_array_equal(ex["inputs"], flat[window][:-1])
    np.testing.assert_array_equal(ex["targets"], flat[window][1:])
    docs_in = doc_of[window]
    # One id per document, changing exactly where the input's document changes.
    changes = ex["segment_ids"][1:] != ex["segment_ids"][:-1]
    np.testing.assert_array_equal(changes, docs_in[:-1][1:] != docs_in[:-1][:-1])
    assert ex["segment_ids"].dtype == np.int32 and ex["segment_ids"].min() > 0
    # A target is weighted iff it is in its input's document.
    np.testing.assert_array_equal(ex["weights"], (docs_in[1:] == docs_in[:-1]).astype(np.float32))
  assert examples[0]["weights"].sum() == 11  # window 0: document 0 (5 tokens), then document 1
  plain = next(iter(text.pack_documents(_docs([5, 9, 3, 20, 7, 6])[1], 12, segments=False)))
  assert "segment_ids" not in plain and plain["weights"].sum() == 12


def test_aligned_packing_starts_every_document_on_a_block_boundary():
  """data.pack_align (NAtS-L): documents start at multiples of the alignment, every real
  (input, target) pair of a document appears once with weight 1, padding has weight 0."""
  lengths = [5, 9, 3, 20, 7, 6, 1, 4]
  docs, ds = _docs(lengths)
  examples = list(text.pack_documents(ds, 12, segments=True, align=4))
  seg = np.concatenate([ex["segment_ids"] for ex in examples])
  weights = np.concatenate([ex["weights"] for ex in examples])
  inputs = np.concatenate([ex["inputs"] for ex in examples])
  targets = np.concatenate([ex["targets"] for ex in examples])
  for ex in examples:
    starts = np.flatnonzero(np.diff(ex["segment_ids"]) != 0) + 1
    assert all(s % 4 == 0 for s in starts), ex["segment_ids"]
  real = weights > 0
  pairs = [(a, b) for d in docs for a, b in zip(d[:-1], d[1:])]
  assert int(real.sum()) == len(pairs) == sum(n - 1 for n in lengths)
  assert list(zip(inputs[real], targets[real])) == pairs  # in order, none lost or repeated
  assert (seg[~real] >= 0).all() and (seg[real] > 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("attention,mixer", PACKED_MIXERS)
def test_packed_row_equals_documents_run_separately(attention, mixer):
  """Through the whole trunk (canon conv, short convs, mixer): logits and parameter
  gradients of a packed row equal those of its documents run one by one."""
  import jax
  import jax.numpy as jnp

  model = packed_model(attention, **mixer)
  # NAtS-L's documents start on block boundaries (data.pack_align); the others' anywhere.
  lengths = (8, 4, 12) if attention == "nats_l" else (6, 3, 9)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (1, sum(lengths))), jnp.int32)
  seg = jnp.asarray(np.repeat(np.arange(1, 4), lengths)[None], jnp.int32)
  cot = jnp.asarray(np.random.default_rng(2).normal(size=(1, sum(lengths), 50)), jnp.float32)
  bounds = np.cumsum((0,) + lengths)
  graphdef, params = nnx.split(model)

  def packed(params):
    logits = nnx.merge(graphdef, params)(tokens, seg)
    return jnp.sum(logits * cot), logits

  def separate(params):
    m = nnx.merge(graphdef, params)
    logits = jnp.concatenate([m(tokens[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], 1)
    return jnp.sum(logits * cot), logits

  (_, lp), gp = jax.jit(jax.value_and_grad(packed, has_aux=True))(params)
  (_, ls), gs = jax.jit(jax.value_and_grad(separate, has_aux=True))(params)
  np.testing.assert_allclose(lp, ls, atol=2e-5, rtol=2e-5)
  unpacked = forward(nnx.merge(graphdef, params), tokens)  # without segment ids documents do mix
  assert float(jnp.max(jnp.abs(unpacked - ls))) > 1e-3
  for (path, a), (_, b) in zip(jax.tree.leaves_with_path(gp), jax.tree.leaves_with_path(gs)):
    # float32 sums in another order: tolerance relative to the leaf's largest entry.
    atol = 2e-5 * max(1.0, float(np.max(np.abs(b))))
    np.testing.assert_allclose(a, b, atol=atol, rtol=2e-4, err_msg=jax.tree_util.keystr(path))
