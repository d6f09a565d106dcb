"""Tokenizers: byte-level built in; SentencePiece when the package is installed."""

from __future__ import annotations

import numpy as np


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
