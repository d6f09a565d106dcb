"""Tokenizers: byte-level built in; SentencePiece `.model` files when the
package is installed (`pip install -e ".[sentencepiece]"`); Hugging Face
`tokenizer.json` files with the `tokenizers` package (`pip install -e
".[tokenizers]"`). Both packages can also train one on a corpus
(`python -m attnlab.data.prepare --train_tokenizer=VOCAB`).

`get_tokenizer(name)` picks by name: "byte", a path ending in .json (Hugging
Face), any other path (SentencePiece). Every tokenizer has `encode` (text ->
int32 ids), `decode`, `eos_id` (appended to each document by the text
pipeline) and `vocab_size` (one more than its largest id).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

from attnlab import errors

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
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    except (OSError, RuntimeError) as e:
      raise errors.UsageError(
        f"data.tokenizer={model_path!r} is not a SentencePiece model ({e})"
      ) from None
    self.eos_id = self._sp.eos_id()
    self.vocab_size = self._sp.get_piece_size()

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


# Names of the end-of-document token in common tokenizer.json files (T5 and
# Llama 2, GPT-2 and ours, Llama 3, Gemma), tried in this order when no
# tokenizer_config.json beside the file names its eos_token.
HF_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


class HFTokenizer:
  """Wraps a Hugging Face `tokenizers` tokenizer.json.

  Documents are encoded without the tokenizer's own special tokens (no BOS
  from its post-processor): the text pipeline ends every document with EOS, so
  a BOS would only mark the same boundary twice, and a prompt in
  `attnlab.sample` must encode as the training text did. Special-token strings
  inside a document ("<|endoftext|>" quoted on a web page) are encoded as
  plain text, so they cannot end a document early or be forged by the data.

  `vocab_size` counts the added tokens too: it is one more than the largest
  id, since added tokens may sit above the base vocabulary with gaps.
  """

  def __init__(self, path: str):
    try:
      from tokenizers import Tokenizer
    except ImportError as e:
      raise ImportError(
        "data.tokenizer names a Hugging Face tokenizer.json but the tokenizers package is "
        'not installed: pip install -e ".[tokenizers]"'
      ) from e
    try:
      self._tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the Rust binding raises a bare Exception
      detail = str(e).replace("`", "'")  # serde quotes in backticks; the error line does not
      raise errors.UsageError(
        f"data.tokenizer={path!r} is not a Hugging Face tokenizer.json ({detail})"
      ) from None
    self._tok.encode_special_tokens = True
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    self.eos_id = _hf_eos_id(self._tok, path)

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _hf_eos_id(tok, path: str) -> int:
  """The id of the end-of-document token: the eos_token of a
  tokenizer_config.json beside `path` if there is one, else the first of
  HF_EOS_TOKENS the tokenizer has."""
  config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
  if os.path.isfile(config_path):
    try:
      with open(config_path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token")
    except (OSError, ValueError, AttributeError) as e:
      raise errors.UsageError(f"{config_path} is not a readable tokenizer config ({e})") from None
    if isinstance(eos, dict):  # {"content": "</s>", "special": true, ...}
      eos = eos.get("content")
    if eos:
      eos_id = tok.token_to_id(eos)
      if eos_id is None:
        raise errors.UsageError(
          f"{config_path} names eos_token {eos!r}, which the tokenizer {path!r} does not have"
        )
      return eos_id
  for token in HF_EOS_TOKENS:
    eos_id = tok.token_to_id(token)
    if eos_id is not None:
      return eos_id
  raise errors.UsageError(
    f"data.tokenizer={path!r} has no end-of-document token: none of "
    f"{', '.join(HF_EOS_TOKENS)} is in its vocabulary and no tokenizer_config.json beside it "
    "names an eos_token"
  )


def get_tokenizer(name: str):
  """The tokenizer `name` names: "byte", a Hugging Face tokenizer.json (a
  path ending in .json) or a SentencePiece model (any other path)."""
  if name == "byte":
    return ByteTokenizer()
  if not os.path.isfile(name):
    raise errors.PathError(
      f"data.tokenizer={name!r}: no such file; give 'byte', a SentencePiece .model or a "
      "Hugging Face tokenizer.json"
    )
  if name.endswith(".json"):
    return HFTokenizer(name)
  return SentencePieceTokenizer(name)


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
  files: list[str] | None,
  model_prefix: str,
  vocab_size: int,
  *,
  texts: Iterable[str] | None = None,
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
    files: plain-text files (the corpus), or None with `texts`.
    texts: documents streamed instead of files (Parquet or JSON-lines
      corpora); their lines are the sentences.
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
  if not files and texts is None:
    raise ValueError("no text files to train a tokenizer on")
  if vocab_size < 256 + 3 + 1:
    raise ValueError(f"vocab_size must exceed the 259 byte and special pieces, got {vocab_size}")
  source = dict(input=files) if files else dict(sentence_iterator=_lines(texts))
  sentencepiece.SentencePieceTrainer.train(
    **source,
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


def _lines(texts: Iterable[str]):
  for text in texts:
    for line in text.splitlines():
      if line.strip():
        yield line


# The end-of-document token of the BPE tokenizers trained here (GPT-2's name).
HF_TRAINED_EOS = "<|endoftext|>"
HF_MIN_VOCAB = 256 + 1 + 1  # the byte alphabet, EOS and at least one merge


def train_hf_bpe(texts: Iterable[str], path: str, vocab_size: int) -> str:
  """Trains a byte-level BPE with the `tokenizers` package; writes tokenizer.json.

  Like GPT-2: text is split into words by GPT-2's pattern (digits one by one,
  as in the SentencePiece models above) and each word's UTF-8 bytes are merged,
  so any text encodes and decodes exactly, with no unknown token. Id 0 is
  HF_TRAINED_EOS, which `HFTokenizer` finds as the end-of-document token.

  Args:
    texts: the training documents, streamed (the trainer keeps word counts,
      not the texts).
    path: where to write the tokenizer.json.
    vocab_size: at most this many tokens: 256 bytes, EOS and merges (fewer
      when the corpus has no more pairs to merge).

  Returns:
    `path`.
  """
  try:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  except ImportError as e:
    raise ImportError(
      'training a Hugging Face tokenizer needs tokenizers: pip install -e ".[tokenizers]"'
    ) from e
  if vocab_size < HF_MIN_VOCAB:
    raise errors.UsageError(
      f"vocab_size must be at least {HF_MIN_VOCAB} (256 bytes, EOS and one merge), got {vocab_size}"
    )
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[HF_TRAINED_EOS],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer)
  tok.save(path)
  return path
