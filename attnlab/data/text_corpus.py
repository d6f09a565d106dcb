"""TFDS builder `text_corpus`: a directory of .txt files as an LM dataset.

Every file is one work. Works are split into passages of about
`PASSAGE_CHARS` characters at line boundaries, so shuffling mixes the corpus.
Validation holds out whole works (every `HOLDOUT_EVERY`-th file by name), so
it measures generalisation to unseen text. Built as ArrayRecord; read back
with `tfds.data_source` (no TensorFlow).

    python -m attnlab.data.prepare --source_dir=../shared/data/shakespeare \
        --data_dir=~/tensorflow_datasets
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

PASSAGE_CHARS = 2048
HOLDOUT_EVERY = 8


def split_works(paths: list[pathlib.Path]) -> dict[str, list[pathlib.Path]]:
  paths = sorted(paths)
  return {
    "train": [p for i, p in enumerate(paths) if i % HOLDOUT_EVERY != HOLDOUT_EVERY // 2],
    "validation": [p for i, p in enumerate(paths) if i % HOLDOUT_EVERY == HOLDOUT_EVERY // 2],
  }


def passages(text: str, size: int = PASSAGE_CHARS) -> list[str]:
  """Consecutive chunks of whole lines, each about `size` characters."""
  chunks, current, length = [], [], 0
  for line in text.splitlines(keepends=True):
    current.append(line)
    length += len(line)
    if length >= size:
      chunks.append("".join(current))
      current, length = [], 0
  if current:
    chunks.append("".join(current))
  return chunks


class TextCorpus(tfds.core.GeneratorBasedBuilder):
  """Local plain-text works as passages for language modelling."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass a directory of .txt files as manual_dir."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Plain-text works split into passages; whole works held out.",
      features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "work": tfds.features.Text()}
      ),
    )

  def _split_generators(self, dl_manager):
    files = list(pathlib.Path(dl_manager.manual_dir).glob("*.txt"))
    if not files:
      raise FileNotFoundError(f"no .txt files in {dl_manager.manual_dir}")
    return {name: self._generate_examples(ps) for name, ps in split_works(files).items()}

  def _generate_examples(self, paths):
    for path in paths:
      text = path.read_text(encoding="utf-8", errors="replace")
      for i, passage in enumerate(passages(text)):
        yield f"{path.stem}/{i}", {"text": passage, "work": path.stem}


def prepare(source_dir: str, data_dir: str) -> None:
  """Builds `text_corpus` from `source_dir` into `data_dir` as ArrayRecord."""
  builder = TextCorpus(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(source_dir))
  )
