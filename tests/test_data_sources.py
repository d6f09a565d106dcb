"""Parquet / JSON-lines corpora (attnlab/data/text_shards.py) and Hugging Face
tokenizer.json files (attnlab/data/tokenizers.py) through the real text
pipeline: what is written is what the trainer reads, a killed prepare resumes
without losing or repeating a document, bad input fails with a clear error."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from attnlab import config as config_lib
from attnlab import errors
from attnlab.data import make_dataset, text, text_shards, tokenizers

from .conftest import REPO, metric_rows

# Both come with the test extra (pip install -e ".[test]").
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("tokenizers")

HOLDOUT = 4


def _doc(i: int) -> str:
  # Varied lengths, digits, non-ASCII and a special-token string in the text.
  extra = " <|endoftext|> quoted" if i % 17 == 3 else ""
  return f"Doc {i}: " + "the cat sat on the mat. " * (i % 5) + f"n={i * 37} ❦ é{extra}\nend."


def _write_corpus(root, n: int = 160) -> list[str]:
  """Writes documents 0..n-1 over five shards of every supported kind, plus
  null and empty values that prepare skips; returns the documents in file order
  (shards sort as a, b, c, d, e)."""
  root.mkdir(parents=True, exist_ok=True)
  docs = [_doc(i) for i in range(n)]
  parts = np.array_split(np.arange(n), 5)
  # Parquet with several row groups (read by record batches), a null and an empty string.
  rows = [docs[i] for i in parts[0]]
  pq.write_table(
    pa.table({"id": list(range(len(rows) + 2)), "text": rows[:3] + [None, ""] + rows[3:]}),
    root / "a.parquet",
    row_group_size=7,
  )
  pq.write_table(pa.table({"text": [docs[i] for i in parts[1]]}), root / "b.parquet")
  with open(root / "c.jsonl", "w", encoding="utf-8") as f:
    for k, i in enumerate(parts[2]):
      f.write(json.dumps({"text": docs[i], "meta": {"k": k}}) + "\n")
      if k == 2:
        f.write("\n" + json.dumps({"text": None}) + "\n")
  with gzip.open(root / "d.jsonl.gz", "wt", encoding="utf-8") as f:
    for i in parts[3]:
      f.write(json.dumps({"text": docs[i]}, ensure_ascii=False) + "\n")
  with open(root / "e.json", "w", encoding="utf-8") as f:
    for i in parts[4]:
      f.write(json.dumps({"text": docs[i]}) + "\n")
  (root / "notes.txt").write_text("not a shard: ignored in a directory")
  return docs


def _split(docs: list[str]) -> dict[str, list[str]]:
  held = [text_shards.is_held_out(d.encode(), HOLDOUT) for d in docs]
  return {
    "train": [d for d, h in zip(docs, held) if not h],
    "validation": [d for d, h in zip(docs, held) if h],
  }


def _data(data_dir, **kw):
  data = config_lib.base_config().data
  data.update(
    dict(
      task="tfds",
      tfds_name="my_corpus",
      data_dir=str(data_dir),
      seq_len=32,
      batch_size=4,
      eval_batch_size=2,
      vocab_size=264,
    )
  )
  data.update(kw)
  return data


def _read_split(data, split: str) -> list[str]:
  source = text.open_source(data, split)
  return [source[i]["text"].decode() for i in range(len(source))]


def _prepare(src, data_dir, **kw):
  files = text_shards.find_files(str(src))
  kw = dict(name="my_corpus", holdout_every=HOLDOUT, progress=False) | kw
  return text_shards.prepare(files, str(data_dir), **kw)


def test_parquet_and_json_lines_read_back_exactly(tmp_path):
  docs = _write_corpus(tmp_path / "src")
  summary = _prepare(tmp_path / "src", tmp_path / "data")
  expected = _split(docs)
  assert 10 < len(expected["validation"]) < 70  # about one in HOLDOUT
  assert summary["documents"] == {s: len(expected[s]) for s in expected}
  data = _data(tmp_path / "data")
  for split in ("train", "validation"):
    assert _read_split(data, split) == expected[split]  # same documents, same order
  assert not os.path.exists(tmp_path / "data" / "my_corpus" / "1.0.0.partial")

  # Through the pipeline the trainer uses: validation windows (unshuffled) are the
  # held-out documents, byte-tokenized, each followed by EOS.
  byte = tokenizers.ByteTokenizer()
  stream = np.concatenate([np.append(byte.encode(d), byte.eos_id) for d in expected["validation"]])
  got = [
    np.append(inputs, targets[-1])
    for batch in make_dataset(data, seed=0, train=False)
    for inputs, targets in zip(batch["inputs"], batch["targets"])
  ]
  got = np.concatenate(got)
  assert len(got) > len(stream) - 4 * 33  # all but the dropped remainder
  n = min(len(got), len(stream))
  np.testing.assert_array_equal(got[:n], stream[:n])
  batch = next(iter(make_dataset(data, seed=0, train=True)))
  assert batch["inputs"].shape == (4, 32) and batch["weights"].mean() == 1.0


def test_a_killed_prepare_resumes_without_losing_or_repeating_documents(tmp_path, monkeypatch):
  docs = _write_corpus(tmp_path / "src")
  expected = _split(docs)
  staging = tmp_path / "data" / "my_corpus" / "1.0.0.partial"
  real_read = text_shards.read_documents

  def crash_in_shard_c(path, field):
    for k, doc in enumerate(real_read(path, field)):
      if path.endswith("c.jsonl") and k == 5:
        raise KeyboardInterrupt  # the process killed mid-shard
      yield doc

  monkeypatch.setattr(text_shards, "read_documents", crash_in_shard_c)
  with pytest.raises(KeyboardInterrupt):
    _prepare(tmp_path / "src", tmp_path / "data")
  files = text_shards.find_files(str(tmp_path / "src"))
  done = [text_shards._marker(str(staging), path) for path in files]
  assert [os.path.exists(path) for path in done] == [True, True, False, False, False]
  assert os.path.exists(text_shards._staged(str(staging), files[2], "train"))  # cut off
  with pytest.raises(text.DatasetNotPreparedError):
    text.open_source(_data(tmp_path / "data"), "train")
  keys = [os.path.basename(path).split(".")[0] for path in done[:2]]
  finished = {p.name: p.stat().st_mtime_ns for k in keys for p in staging.glob(f"{k}.*")}
  assert len(finished) == 6  # two shards: train, validation, marker

  # The rerun converts only the shards without a marker; a second kill between
  # the links and the metadata leaves no half dataset either.
  monkeypatch.setattr(text_shards, "read_documents", real_read)
  converted = []
  real_convert = text_shards._convert
  monkeypatch.setattr(
    text_shards,
    "_convert",
    lambda path, *a: converted.append(os.path.basename(path)) or real_convert(path, *a),
  )
  import tensorflow_datasets as tfds

  real_write = tfds.folder_dataset.write_metadata

  def killed(**kw):
    raise KeyboardInterrupt

  monkeypatch.setattr(tfds.folder_dataset, "write_metadata", killed)
  with pytest.raises(KeyboardInterrupt):
    _prepare(tmp_path / "src", tmp_path / "data")
  assert converted == ["c.jsonl", "d.jsonl.gz", "e.json"]
  assert {p.name: p.stat().st_mtime_ns for k in keys for p in staging.glob(f"{k}.*")} == finished
  with pytest.raises(text.DatasetNotPreparedError):
    text.open_source(_data(tmp_path / "data"), "train")

  monkeypatch.setattr(tfds.folder_dataset, "write_metadata", real_write)
  converted.clear()
  summary = _prepare(tmp_path / "src", tmp_path / "data")
  assert converted == [] and not staging.exists()
  data = _data(tmp_path / "data")
  for split in ("train", "validation"):
    assert _read_split(data, split) == expected[split]
  assert summary["documents"] == {s: len(expected[s]) for s in expected}

  # Once more: nothing to do. Other settings against the finished dataset: an error.
  assert _prepare(tmp_path / "src", tmp_path / "data")["documents"] == summary["documents"]
  assert converted == []
  with pytest.raises(errors.UsageError, match="prepared from other inputs or settings"):
    _prepare(tmp_path / "src", tmp_path / "data", holdout_every=5)


def test_changed_inputs_are_redone_and_other_settings_start_over(tmp_path, monkeypatch):
  docs = _write_corpus(tmp_path / "src")
  real_read = text_shards.read_documents

  def crash(path, field):
    if path.endswith("c.jsonl"):
      raise KeyboardInterrupt
    yield from real_read(path, field)

  monkeypatch.setattr(text_shards, "read_documents", crash)
  with pytest.raises(KeyboardInterrupt):
    _prepare(tmp_path / "src", tmp_path / "data")
  monkeypatch.setattr(text_shards, "read_documents", real_read)
  converted = []
  real_convert = text_shards._convert
  monkeypatch.setattr(
    text_shards,
    "_convert",
    lambda path, *a: converted.append(os.path.basename(path)) or real_convert(path, *a),
  )
  # b.parquet rewritten with one more document, a new shard: only those and the
  # unfinished ones are converted; a.parquet's work is kept.
  b = pq.read_table(tmp_path / "src" / "b.parquet")["text"].to_pylist()
  pq.write_table(pa.table({"text": [*b, "a late addition"]}), tmp_path / "src" / "b.parquet")
  (tmp_path / "src" / "f.jsonl").write_text(json.dumps({"text": "the last shard"}) + "\n")
  c = docs.index(b[-1]) + 1
  docs = [*docs[:c], "a late addition", *docs[c:], "the last shard"]
  _prepare(tmp_path / "src", tmp_path / "data")
  assert converted == ["b.parquet", "c.jsonl", "d.jsonl.gz", "e.json", "f.jsonl"]
  data = _data(tmp_path / "data")
  expected = _split(docs)
  assert _read_split(data, "train") == expected["train"]
  assert _read_split(data, "validation") == expected["validation"]

  # Other settings after a crash (here under another name): the staging starts over.
  monkeypatch.setattr(text_shards, "read_documents", crash)
  with pytest.raises(KeyboardInterrupt):
    _prepare(tmp_path / "src", tmp_path / "data", name="other")
  monkeypatch.setattr(text_shards, "read_documents", real_read)
  converted.clear()
  _prepare(tmp_path / "src", tmp_path / "data", name="other", holdout_every=3)
  assert len(converted) == 6
  held = [d for d in docs if text_shards.is_held_out(d.encode(), 3)]
  assert _read_split(_data(tmp_path / "data", tfds_name="other"), "validation") == held


def _expect_usage_error(tmp_path, match, *, source=None, **kw):
  with pytest.raises(errors.UsageError, match=match):
    files = text_shards.find_files(str(source or tmp_path / "bad"))
    text_shards.scan(files, kw.get("text_field", "text"))
    _prepare(source or tmp_path / "bad", tmp_path / "data", **kw)


def test_bad_sources_give_clear_errors(tmp_path):
  bad = tmp_path / "bad"
  bad.mkdir()
  with pytest.raises(errors.PathError, match="no file matches it as a glob"):
    text_shards.find_files(str(tmp_path / "nowhere" / "*.parquet"))
  with pytest.raises(errors.PathError, match="no Parquet or JSON-lines files"):
    text_shards.find_files(str(bad))
  (bad / "x.csv").write_text("a,b\n")
  with pytest.raises(errors.UsageError, match="neither Parquet nor JSON lines"):
    text_shards.find_files(str(bad / "*"))
  os.remove(bad / "x.csv")

  (bad / "a.jsonl").write_text(json.dumps({"body": "hi", "id": 3}) + "\n")
  _expect_usage_error(tmp_path, r"a.jsonl, line 1: no field 'text'; its fields: body, id")
  _expect_usage_error(tmp_path, r"field 'id' holds a number, not a string", text_field="id")
  (bad / "a.jsonl").write_text(json.dumps({"text": "ok"}) + "\n{oops\n")
  _expect_usage_error(tmp_path, r"a.jsonl, line 2: not JSON")
  (bad / "a.jsonl").write_text("[1, 2]\n")
  _expect_usage_error(tmp_path, r"line 1: a JSON list, not an object")
  os.remove(bad / "a.jsonl")
  (bad / "b.jsonl.gz").write_bytes(b"not gzip at all")
  _expect_usage_error(tmp_path, r"b.jsonl.gz is not a readable JSON-lines file")
  os.remove(bad / "b.jsonl.gz")

  pq.write_table(pa.table({"content": ["x"], "n": [1]}), bad / "c.parquet")
  _expect_usage_error(tmp_path, r"c.parquet has no column 'text'; its columns: content, n")
  _expect_usage_error(tmp_path, r"column 'n' holds int64, not strings", text_field="n")
  (bad / "c.parquet").write_bytes(b"PAR1 this is not parquet")
  _expect_usage_error(tmp_path, r"c.parquet is not a readable Parquet file")
  os.remove(bad / "c.parquet")

  pq.write_table(pa.table({"text": ["only one document"]}), bad / "d.parquet")
  _expect_usage_error(tmp_path, r"no document was held out for validation", holdout_every=1000)
  _expect_usage_error(tmp_path, r"catalogue", name="lm1b")
  _expect_usage_error(tmp_path, r"must be snake_case", name="My-Corpus")


# --- Hugging Face tokenizer.json ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> str:
  """A tiny byte-level BPE trained on the test corpus."""
  root = tmp_path_factory.mktemp("bpe")
  docs = [_doc(i) for i in range(200)]
  return tokenizers.train_hf_bpe(iter(docs), str(root / "tokenizer.json"), 280)


def test_hf_tokenizer_round_trips_and_fits_the_vocabulary_checks(bpe):
  tok = tokenizers.get_tokenizer(bpe)
  assert isinstance(tok, tokenizers.HFTokenizer)
  assert tok.eos_id == 0 and tok.vocab_size == 280  # bytes, EOS, merges up to the budget
  for sample in ["ROMEO: But soft! 1599 ❦ 東京", _doc(3), "  two  spaces\n\ttab", ""]:
    ids = tok.encode(sample)
    assert ids.dtype == np.int32 and (ids < tok.vocab_size).all()
    assert tok.decode(ids) == sample
    assert tok.encode(sample.encode()).tolist() == ids.tolist()  # bytes as tfds gives them
  # A special-token string in a document is text, not an early EOS; no BOS is added.
  ids = tok.encode("a <|endoftext|> b")
  assert tok.eos_id not in ids.tolist() and tok.decode(ids) == "a <|endoftext|> b"
  assert len(tok.encode("the cat sat on the mat.")) < len("the cat sat on the mat.") / 2
  tokenizers.check_vocab_size(tok, 280)
  tokenizers.check_vocab_size(tok, 384)  # padding rows are fine
  with pytest.raises(ValueError, match="tokenizer has 280 tokens but data.vocab_size is 279"):
    tokenizers.check_vocab_size(tok, 279)


def test_hf_tokenizer_eos_added_tokens_and_bad_files(bpe, tmp_path):
  from tokenizers import AddedToken, Tokenizer

  # Added tokens count: vocab_size covers the largest id.
  raw = Tokenizer.from_file(bpe)
  raw.add_special_tokens([AddedToken("<pad>", special=True), AddedToken("</s>", special=True)])
  (tmp_path / "added").mkdir()
  path = str(tmp_path / "added" / "tokenizer.json")
  raw.save(path)
  tok = tokenizers.get_tokenizer(path)
  assert tok.vocab_size == 282 and tok.eos_id == raw.token_to_id("</s>")  # first in the list
  with pytest.raises(ValueError, match="282 tokens"):
    tokenizers.check_vocab_size(tok, 280)
  # A tokenizer_config.json beside it names the EOS.
  config = tmp_path / "added" / "tokenizer_config.json"
  config.write_text(json.dumps({"eos_token": {"content": "<pad>", "special": True}}))
  assert tokenizers.get_tokenizer(path).eos_id == raw.token_to_id("<pad>")
  config.write_text(json.dumps({"eos_token": "<missing>"}))
  with pytest.raises(errors.UsageError, match="names eos_token '<missing>'"):
    tokenizers.get_tokenizer(path)

  # No EOS anywhere: the error names what was looked for.
  from tokenizers import models

  (tmp_path / "plain").mkdir()
  Tokenizer(models.BPE()).save(str(tmp_path / "plain" / "tokenizer.json"))
  with pytest.raises(errors.UsageError, match=r"no end-of-document token: none of </s>, <\|endof"):
    tokenizers.get_tokenizer(str(tmp_path / "plain" / "tokenizer.json"))
  (tmp_path / "x.json").write_text('{"not": "a tokenizer"}')
  with pytest.raises(errors.UsageError, match="is not a Hugging Face tokenizer.json"):
    tokenizers.get_tokenizer(str(tmp_path / "x.json"))
  with pytest.raises(errors.PathError, match="no such file"):
    tokenizers.get_tokenizer(str(tmp_path / "missing.json"))


def test_hf_tokenizer_through_the_pipeline(bpe, tmp_path):
  docs = _write_corpus(tmp_path / "src")
  _prepare(tmp_path / "src", tmp_path / "data")
  tok = tokenizers.get_tokenizer(bpe)
  data = _data(tmp_path / "data", tokenizer=bpe, vocab_size=280, batch_size=2, seq_len=64)
  batch = next(iter(make_dataset(data, seed=0, train=True)))
  assert batch["inputs"].shape == (2, 64) and batch["inputs"].max() < 280
  # Windows of the unshuffled validation split decode to its documents, EOS-separated.
  window = next(iter(make_dataset(data, seed=0, train=False)))["inputs"][0]
  first = tok.encode(_split(docs)["validation"][0])
  np.testing.assert_array_equal(window[: len(first) + 1], np.append(first, tok.eos_id)[:64])
  with pytest.raises(ValueError, match="tokenizer has 280 tokens"):
    make_dataset(_data(tmp_path / "data", tokenizer=bpe, vocab_size=256), seed=0, train=True)


def test_sentencepiece_trains_on_streamed_documents(tmp_path):
  pytest.importorskip("sentencepiece")
  docs = [_doc(i) for i in range(300)]
  path = tokenizers.train_sentencepiece(None, str(tmp_path / "spm"), 300, texts=iter(docs))
  tok = tokenizers.get_tokenizer(path)
  line = _doc(7).splitlines()[0]  # SentencePiece's normalizer turns newlines into spaces
  assert tok.vocab_size == 300 and tok.decode(tok.encode(line)) == line


# --- the commands --------------------------------------------------------------------------------


def _run(*args, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


@pytest.mark.slow
def test_prepare_killed_by_sigkill_resumes(tmp_path):
  """The real thing: `python -m attnlab.data.prepare` SIGKILLed after two of
  eight shards (writers not closed, a shard half-written), then rerun."""
  src = tmp_path / "src"
  src.mkdir()
  docs = [
    f"{i}: " + "a fairly long line of text for the shard. " * (5 + i % 20) for i in range(48000)
  ]
  for s in range(8):
    with open(src / f"s{s}.jsonl", "w") as f:
      for doc in docs[s * 6000 : (s + 1) * 6000]:
        f.write(json.dumps({"text": doc}) + "\n")
  args = [f"--source={src}", f"--data_dir={tmp_path / 'data'}", "--dataset_name=my_corpus"]
  args.append(f"--holdout_every={HOLDOUT}")
  cmd = [sys.executable, "-m", "attnlab.data.prepare", *args]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
  staging = tmp_path / "data" / "my_corpus" / "1.0.0.partial"
  deadline = time.time() + 120
  while time.time() < deadline and len(list(staging.glob("*.done.json"))) < 2:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len(list(staging.glob("*.done.json")))
  assert 2 <= done < 8 and not (tmp_path / "data" / "my_corpus" / "1.0.0").exists()
  rerun = _run("attnlab.data.prepare", *args)
  assert rerun.returncode == 0, rerun.stderr
  assert f"resumed {done} shards done before" in rerun.stderr
  data = _data(tmp_path / "data")
  expected = _split(docs)
  assert _read_split(data, "train") == expected["train"]
  assert _read_split(data, "validation") == expected["validation"]


@pytest.mark.slow
def test_prepare_then_train_on_parquet_with_a_trained_hf_tokenizer(tmp_path):
  """The README's commands: prepare Parquet shards and train a tokenizer.json,
  then train configs/shakespeare.py on them with overrides."""
  _write_corpus(tmp_path / "src")
  data_dir = tmp_path / "data"
  prepare = _run(
    "attnlab.data.prepare",
    f"--source={tmp_path / 'src'}/*.parquet",
    "--text_field=text",
    "--dataset_name=my_corpus",
    f"--data_dir={data_dir}",
    "--holdout_every=4",
    "--train_tokenizer=300",
    "--tokenizer_kind=hf",
  )
  assert prepare.returncode == 0, prepare.stderr
  assert "data.prepare 2/2" in prepare.stderr and (data_dir / "bpe300.json").is_file()
  train = _run(
    "attnlab.train",
    "--config=configs/shakespeare.py:steps=3,seq_len=32",
    f"--workdir={tmp_path / 'run'}",
    "--config.data.tfds_name=my_corpus",
    f"--config.data.data_dir={data_dir}",
    "--config.data.prepare_from=",
    f"--config.data.tokenizer={data_dir / 'bpe300.json'}",
    "--config.data.vocab_size=304",
    "--config.mesh.data=2",
    "--config.data.batch_size=8",
    "--config.data.eval_batch_size=8",
    "--config.model.d_model=32",
    "--config.model.num_layers=1",
    "--config.model.num_heads=2",
    "--config.model.mlp_dim=64",
    "--config.log_every=1",
    "--config.eval_every=3",
    "--config.eval_batches=1",
    "--config.checkpoint_every=0",
    "--config.progress=False",
  )
  assert train.returncode == 0, train.stderr[-3000:]
  rows = metric_rows(tmp_path / "run")
  assert [r["step"] for r in rows] == [1, 2, 3] and np.isfinite(rows[-1]["eval/loss"])
