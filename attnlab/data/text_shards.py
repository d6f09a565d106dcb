"""Parquet and JSON-lines text shards -> a TFDS ArrayRecord dataset, resumably.

    python -m attnlab.data.prepare --source='corpus/*.parquet' --text_field=text \
        --dataset_name=my_corpus --data_dir=~/tensorflow_datasets

Inputs: a directory (searched recursively), one file or a glob of `*.parquet`,
`*.jsonl` / `*.json` (one JSON object per line) and their `.gz` forms. Each
document is one row's (one line's) `text_field`, a string; null and empty
values are skipped. The dataset's examples are {"text": ...}, so the text
pipeline's data.text_key keeps its default, and the trainer reads it like any
prepared TFDS dataset: data.task=tfds, data.tfds_name=<name>,
data.data_dir=<data_dir>. tfds finds it from its files; no builder code is
registered, so no name of tfds's catalogue may be used.

Why not a tfds builder, as `text_corpus` is: tfds writes a split in one go, and
a prepare killed after hours would start over. Here every input shard becomes
its own pair of ArrayRecord files (train, validation) in a staging directory,
`<data_dir>/<name>/1.0.0.partial/`, named after the input's path, and a small
JSON marker (the input's path, size and mtime, the document counts) is written
only after both files are closed. Rerunning the command converts only the
inputs without a current marker: the shard that was cut off (its half-written
files are overwritten), and files added or changed since; another text_field
or holdout_every starts the staging over. When every shard is done, the files
are linked under tfds's names (`<name>-<split>.array_record-00000-of-0000N`,
empty ones left out, in input order) into `1.0.0.partial/dataset/`, tfds's own
`folder_dataset.write_metadata` adds dataset_info.json and features.json, and
that directory is renamed to
`<data_dir>/<name>/1.0.0` in one step: a kill at any moment leaves either the
complete dataset or a staging directory a rerun resumes, never a dataset tfds
would take as prepared while it is not.

Validation holds out the documents whose CRC-32 is a multiple of
`holdout_every`: the choice depends on the text alone, so it is the same in
any shard order or on a resumed run, and exact duplicates never straddle the
two splits.

Memory stays bounded: Parquet is read one column, one record batch at a time;
JSON lines line by line; records stream into the writers.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Iterator

from attnlab import errors, metrics

VERSION = "1.0.0"
SPLITS = ("train", "validation")
HOLDOUT_EVERY = 100
DEFAULT_NAME = "text_shards"
PARQUET = (".parquet",)
JSON_LINES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
SUFFIXES = PARQUET + JSON_LINES
_BATCH_ROWS = 1024  # Parquet rows per record batch: a few MB of text
_PROGRESS_EVERY_S = 10.0


def find_files(source: str) -> list[str]:
  """The input files `source` names (a directory, a file or a glob), sorted,
  as absolute paths."""
  if os.path.isdir(source):
    found = [
      os.path.join(root, name)
      for root, _, names in os.walk(source)
      for name in names
      if name.endswith(SUFFIXES)
    ]
    if not found:
      raise errors.PathError(
        f"no Parquet or JSON-lines files ({', '.join(SUFFIXES)}) under --source={source}"
      )
  else:
    found = [path for path in glob.glob(source, recursive=True) if os.path.isfile(path)]
    if not found:
      raise errors.PathError(
        f"--source={source}: no such file or directory, and no file matches it as a glob"
      )
    other = [path for path in found if not path.endswith(SUFFIXES)]
    if other:
      raise errors.UsageError(
        f"--source={source} matches {other[0]!r}, which is neither Parquet nor JSON lines "
        f"({', '.join(SUFFIXES)})"
      )
  return sorted(os.path.abspath(path) for path in found)


def check_name(name: str) -> None:
  """A dataset name tfds can read back from files alone."""
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise errors.UsageError(
      f"--dataset_name={name!r} must be snake_case: a lowercase letter, then lowercase "
      "letters, digits and underscores"
    )
  import tensorflow_datasets as tfds

  from attnlab.data import text_corpus  # noqa: F401 - registers its name, which the trainer uses

  try:
    tfds.builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    return
  raise errors.UsageError(
    f"--dataset_name={name!r} is a dataset of tfds's catalogue (or attnlab's text_corpus); "
    "tfds would read it with that builder's code, so choose another name"
  )


def is_held_out(data: bytes, holdout_every: int) -> bool:
  """Whether the document with these UTF-8 bytes belongs to validation."""
  return zlib.crc32(data) % holdout_every == 0


# --- reading ------------------------------------------------------------------------------------


def _type_name(value) -> str:
  names = {bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}
  return names.get(type(value), type(value).__name__)


def _parquet_file(path: str):
  try:
    import pyarrow
    import pyarrow.parquet as pq
  except ImportError as e:
    raise ImportError('reading Parquet needs pyarrow: pip install -e ".[parquet]"') from e
  try:
    return pq.ParquetFile(path)
  except (pyarrow.ArrowException, OSError) as e:
    raise errors.UsageError(f"{path} is not a readable Parquet file ({e})") from None


def _check_parquet_field(path: str, schema, field: str) -> None:
  import pyarrow as pa

  if field not in schema.names:
    raise errors.UsageError(
      f"{path} has no column {field!r}; its columns: {', '.join(schema.names)} "
      "(choose one with --text_field)"
    )
  kind = schema.field(field).type
  if pa.types.is_dictionary(kind):
    kind = kind.value_type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise errors.UsageError(f"{path}: column {field!r} holds {kind}, not strings")


def _parquet_documents(path: str, field: str) -> Iterator[str]:
  import pyarrow

  file = _parquet_file(path)
  _check_parquet_field(path, file.schema_arrow, field)
  try:
    for batch in file.iter_batches(batch_size=_BATCH_ROWS, columns=[field]):
      yield from batch.column(0).to_pylist()
  except (pyarrow.ArrowException, OSError) as e:
    raise errors.UsageError(f"{path} is not a readable Parquet file ({e})") from None


def _record_text(record, field: str, where: str) -> str | None:
  if not isinstance(record, dict):
    raise errors.UsageError(
      f"{where}: a JSON {_type_name(record)}, not an object (JSON lines: one object per line)"
    )
  if field not in record:
    raise errors.UsageError(
      f"{where}: no field {field!r}; its fields: {', '.join(sorted(record))} "
      "(choose one with --text_field)"
    )
  value = record[field]
  if value is not None and not isinstance(value, str):
    raise errors.UsageError(f"{where}: field {field!r} holds a {_type_name(value)}, not a string")
  return value


def _open_text(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, encoding="utf-8")


def _json_lines_documents(path: str, field: str) -> Iterator[str | None]:
  try:
    with _open_text(path) as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise errors.UsageError(
            f"{path}, line {number}: not JSON ({e.msg}; JSON lines: one object per line)"
          ) from None
        yield _record_text(record, field, f"{path}, line {number}")
  except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:  # gzip: OSError, EOFError
    raise errors.UsageError(f"{path} is not a readable JSON-lines file ({e})") from None


def read_documents(path: str, text_field: str) -> Iterator[str]:
  """The non-empty documents of one input file, streamed."""
  read = _parquet_documents if path.endswith(PARQUET) else _json_lines_documents
  for text in read(path, text_field):
    if text:
      yield text


def scan(files: list[str], text_field: str) -> None:
  """Checks every file's format and field before anything is written: its
  Parquet footer, or its first JSON line."""
  for path in files:
    if path.endswith(PARQUET):
      _check_parquet_field(path, _parquet_file(path).schema_arrow, text_field)
    else:
      next(_json_lines_documents(path, text_field), None)


def _utf8(text: str) -> bytes:
  # JSON may carry lone surrogates ("\ud800"), which strict UTF-8 cannot encode.
  return text.encode("utf-8", errors="replace")


def training_documents(
  files: list[str], text_field: str, holdout_every: int, limit: int
) -> Iterator[str]:
  """The first `limit` train-split documents, in file order (for training a
  tokenizer without looking at validation)."""
  count = 0
  for path in files:
    for text in read_documents(path, text_field):
      if count >= limit:
        return
      if not is_held_out(_utf8(text), holdout_every):
        count += 1
        yield text


# --- writing ------------------------------------------------------------------------------------


def _features():
  import tensorflow_datasets as tfds

  return tfds.features.FeaturesDict({"text": tfds.features.Text()})


def _write_json(path: str, value) -> None:
  """Written whole or not at all: a marker must not exist half-written."""
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1)
  os.replace(path + ".tmp", path)


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _settings(text_field: str, holdout_every: int) -> dict:
  """What every staged shard depends on besides its own input."""
  return {"text_field": text_field, "holdout_every": holdout_every}


def _key(path: str) -> str:
  # Staged files are named by their input, not its position: adding or removing
  # inputs between runs leaves the other shards' work valid.
  return hashlib.sha1(path.encode()).hexdigest()[:16]


def _identity(path: str) -> dict:
  """An input as a marker records it; a changed file is converted again."""
  stat = os.stat(path)
  return {"source": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _staged(staging: str, path: str, split: str) -> str:
  return os.path.join(staging, f"{_key(path)}.{split}.array_record")


def _marker(staging: str, path: str) -> str:
  return os.path.join(staging, f"{_key(path)}.done.json")


def _finished(staging: str, path: str) -> dict | None:
  """The marker of `path`'s shard if it was converted from the file as it is now."""
  marker = _read_json(_marker(staging, path))
  if marker and {key: marker.get(key) for key in ("source", "size", "mtime_ns")} == _identity(path):
    return marker
  return None


class _Tally:
  """Documents and bytes so far, for the progress line (redrawn when a shard
  is done, and every _PROGRESS_EVERY_S seconds within one)."""

  def __init__(self, progress: metrics.Progress, documents: int = 0, nbytes: int = 0):
    self.progress = progress
    self.documents, self.bytes = documents, nbytes
    self._drawn = time.time()

  def add(self, documents: int, nbytes: int, *, shard_done: bool = False, **fields) -> None:
    self.documents += documents
    self.bytes += nbytes
    if shard_done or time.time() - self._drawn >= _PROGRESS_EVERY_S:
      self.draw(int(shard_done), **fields)

  def draw(self, advance: int, **fields) -> None:
    self._drawn = time.time()
    self.progress.update(advance, documents=self.documents, MB=f"{self.bytes / 1e6:.1f}", **fields)


def _convert(path: str, staging: str, text_field: str, holdout_every: int, tally: _Tally) -> dict:
  """One input shard -> its train and validation ArrayRecord files + marker."""
  from array_record.python import array_record_module

  features = _features()
  identity = _identity(path)  # before reading: a file changed meanwhile is redone next time
  paths = {split: _staged(staging, path, split) for split in SPLITS}
  counts = dict.fromkeys(SPLITS, 0)
  nbytes = 0
  writers = {}
  try:
    for split, out in paths.items():
      if os.path.exists(out):  # left by a run cut off in this shard
        os.remove(out)
      # One record per group, as tfds writes them: random access for grain.
      writers[split] = array_record_module.ArrayRecordWriter(out, "group_size:1")
    pending_docs = pending_bytes = 0
    for text in read_documents(path, text_field):
      data = _utf8(text)
      split = "validation" if is_held_out(data, holdout_every) else "train"
      writers[split].write(features.serialize_example({"text": data}))
      counts[split] += 1
      nbytes += len(data)
      pending_docs += 1
      pending_bytes += len(data)
      if pending_docs == _BATCH_ROWS:
        tally.add(pending_docs, pending_bytes, shard=os.path.basename(path))
        pending_docs = pending_bytes = 0
  finally:
    for writer in writers.values():
      writer.close()
  marker = {**identity, "documents": counts, "bytes": nbytes}
  _write_json(_marker(staging, path), marker)
  tally.add(pending_docs, pending_bytes, shard_done=True, shard=os.path.basename(path))
  return marker


def _link(src: str, dst: str) -> None:
  try:
    os.link(src, dst)
  except OSError:  # a filesystem without hard links
    shutil.copyfile(src, dst)


def _finalize(
  name: str, staging: str, version_dir: str, files: list[str], plan: dict, markers: list[dict]
) -> dict:
  """Staged shards -> the dataset directory, which appears whole (rename)."""
  import tensorflow_datasets as tfds

  out = os.path.join(staging, "dataset")
  if os.path.isdir(out):  # a finalize cut off before its rename
    shutil.rmtree(out)
  os.makedirs(out)
  counts = {split: sum(m["documents"][split] for m in markers) for split in SPLITS}
  if counts["train"] == 0:
    raise errors.UsageError(
      f"no training documents in the {len(markers)} input files (null and empty "
      f"{plan['text_field']!r} values are skipped; {counts['validation']} were held out)"
    )
  if counts["validation"] == 0:
    raise errors.UsageError(
      f"no document was held out for validation from {counts['train']} documents with "
      f"--holdout_every={plan['holdout_every']}; lower it (about 1 in N documents is held out)"
    )
  split_infos = []
  for split in SPLITS:
    shards = [i for i, m in enumerate(markers) if m["documents"][split]]
    for k, i in enumerate(shards):
      _link(
        _staged(staging, files[i], split),
        os.path.join(out, f"{name}-{split}.array_record-{k:05d}-of-{len(shards):05d}"),
      )
    split_infos.append(
      tfds.core.SplitInfo(
        name=split,
        shard_lengths=[markers[i]["documents"][split] for i in shards],
        num_bytes=sum(os.path.getsize(_staged(staging, files[i], split)) for i in shards),
      )
    )
  tfds.folder_dataset.write_metadata(
    data_dir=out,
    features=_features(),
    split_infos=split_infos,
    version=VERSION,
    check_data=False,
    description=(
      f"Documents from {len(markers)} Parquet / JSON-lines files (field "
      f"{plan['text_field']!r}); validation: CRC-32 of the text divisible by "
      f"{plan['holdout_every']}. Prepared by attnlab.data.text_shards."
    ),
  )
  summary = {**plan, "documents": counts, "bytes": sum(m["bytes"] for m in markers)}
  _write_json(os.path.join(out, "prepare.json"), summary)
  os.rename(out, version_dir)
  shutil.rmtree(staging)
  return summary


def prepare(
  files: list[str],
  data_dir: str,
  *,
  name: str = DEFAULT_NAME,
  text_field: str = "text",
  holdout_every: int = HOLDOUT_EVERY,
  progress: bool = True,
) -> dict:
  """Builds dataset `name` in `data_dir` from `files` (see the module
  docstring); resumes an unfinished run of the same command.

  Returns:
    A summary: the inputs, documents per split, bytes of text.
  """
  if holdout_every < 2:
    raise errors.UsageError(f"--holdout_every={holdout_every} must be at least 2")
  check_name(name)
  line = metrics.Progress(total=len(files), label="data.prepare", enabled=progress)
  settings = _settings(text_field, holdout_every)
  inputs = [[path, os.path.getsize(path)] for path in files]
  version_dir = os.path.join(data_dir, name, VERSION)
  staging = version_dir + ".partial"
  if os.path.isdir(version_dir):
    done = _read_json(os.path.join(version_dir, "prepare.json")) or {}
    if {key: done.get(key) for key in settings} != settings or done.get("files") != inputs:
      raise errors.UsageError(
        f"{version_dir} already holds a dataset {name!r} prepared from other inputs or "
        "settings; delete it, or give another --dataset_name"
      )
    if os.path.isdir(staging):  # cut off between the rename and the cleanup
      shutil.rmtree(staging)
    line.message(f"data.prepare: {name} is already prepared in {version_dir}")
    line.close()
    return done
  if _read_json(os.path.join(staging, "settings.json")) != settings:
    if os.path.isdir(staging):
      line.message(f"data.prepare: {staging} was left with other settings; starting over")
      shutil.rmtree(staging)
    os.makedirs(staging)
    _write_json(os.path.join(staging, "settings.json"), settings)

  markers = [_finished(staging, path) for path in files]
  todo = [i for i, marker in enumerate(markers) if marker is None]
  scan([files[i] for i in todo], text_field)  # a wrong field fails now, not hours in
  finished = [m for m in markers if m is not None]
  tally = _Tally(
    line,
    sum(sum(m["documents"].values()) for m in finished),
    sum(m["bytes"] for m in finished),
  )
  if finished:
    tally.draw(len(finished), resumed=f"{len(finished)} shards done before")
  for i in todo:
    markers[i] = _convert(files[i], staging, text_field, holdout_every, tally)
  summary = _finalize(name, staging, version_dir, files, {**settings, "files": inputs}, markers)
  line.message(
    f"data.prepare: {name} in {data_dir}: {summary['documents']['train']} train and "
    f"{summary['documents']['validation']} validation documents; train with "
    f"--config.data.task=tfds --config.data.tfds_name={name} --config.data.data_dir={data_dir}"
  )
  line.close()
  return summary
