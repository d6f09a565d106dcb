"""Tokenizers: byte-level built in; SentencePiece when the package is installed
(`pip install -e ".[sentencepiece]"`), which can also train one on a corpus."""

from __future__ import annotations

import numpy as np

# The byte tokenizer's 257 ids may be padded up to this many embedding rows
# (a multiple of 128); more rows would never be used.
BYTE_VOCAB_LIMIT = 384


class ByteTokenizer:
  """UTF-8 bytes shifted by one; id 0 marks the end of a document."""

  eos_id = 0
  vocab_size = 257

  def encode(self, text: str | bytes) -> np.ndarray:
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(raw, np.uint8).astype(np.int32) + 1

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return bytes((ids[ids > 0] - 1).astype(np.uint8).tolist()).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """Wraps a trained SentencePiece model file."""

  def __init__(self, model_path: str):
    try:
      import sentencepiece
    except ImportError as e:
      raise ImportError(
        "data.tokenizer names a SentencePiece model but the sentencepiece "
        "package is not installed: pip install sentencepiece"
      ) from e
    self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    self.eos_id = self._sp.eos_id()
    self.vocab_size = self._sp.get_piece_size()

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


def get_tokenizer(name: str):
  return ByteTokenizer() if name == "byte" else SentencePieceTokenizer(name)


def check_vocab_size(tokenizer, vocab_size: int) -> None:
  """Raises ValueError unless `vocab_size` embedding rows fit `tokenizer`: at
  least its ids, and with the byte tokenizer not more than BYTE_VOCAB_LIMIT
  (a 32K vocabulary over 257 byte ids is a silent waste, not a choice)."""
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(
      f"tokenizer has {tokenizer.vocab_size} tokens but data.vocab_size is {vocab_size}"
    )
  if isinstance(tokenizer, ByteTokenizer) and vocab_size > BYTE_VOCAB_LIMIT:
    raise ValueError(
      f"data.vocab_size={vocab_size} with the byte tokenizer, which has {tokenizer.vocab_size} "
      f"ids: {vocab_size - tokenizer.vocab_size} embedding rows would never be used. Train a "
      f"SentencePiece model on the corpus (python -m attnlab.data.prepare --source_dir=DIR "
      f"--train_tokenizer={vocab_size}) and pass it as data.tokenizer (the large configs take "
      f"it as :tokenizer=PATH), or set data.vocab_size to at most {BYTE_VOCAB_LIMIT}."
    )


def train_sentencepiece(
  files: list[str],
  model_prefix: str,
  vocab_size: int,
  *,
  model_type: str = "bpe",
  max_sentences: int = 2_000_000,
  num_threads: int = 8,
) -> str:
  """Trains a SentencePiece model of exactly `vocab_size` pieces on text files.

  BPE with byte fallback (any UTF-8 text encodes, nothing maps to unk: the
  rarest 0.05% of characters become bytes), digits split; sentences are lines,
  at most
  `max_sentences` of them sampled. Ids: unk 0, bos 1, eos 2 (eos ends each
  document in the text pipeline).

  Args:
    files: plain-text files (the corpus).
    model_prefix: output path without extension; writes .model and .vocab.
    vocab_size: pieces, including the 256 byte pieces and 3 specials.

  Returns:
    The path of the .model file.
  """
  try:
    import sentencepiece
  except ImportError as e:
    raise ImportError(
      'training a tokenizer needs sentencepiece: pip install -e ".[sentencepiece]"'
    ) from e
  if not files:
    raise ValueError("no text files to train a tokenizer on")
  if vocab_size < 256 + 3 + 1:
    raise ValueError(f"vocab_size must exceed the 259 byte and special pieces, got {vocab_size}")
  sentencepiece.SentencePieceTrainer.train(
    input=files,
    model_prefix=model_prefix,
    vocab_size=vocab_size,
    model_type=model_type,
    byte_fallback=True,
    split_digits=True,
    character_coverage=0.9995,
    input_sentence_size=max_sentences,
    shuffle_input_sentence=True,
    num_threads=num_threads,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    minloglevel=2,
  )
  return model_prefix + ".model"
