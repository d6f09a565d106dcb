"""Checks a run's config and surroundings before anything is built or compiled.

`check_run(config, workdir)` is called first thing by
`trainer.train_and_evaluate`: a bad config fails in a second with a message
naming the field and the fix, instead of deep inside model construction,
tracing or a TFDS reader minutes later.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import jax
from ml_collections import ConfigDict

from attnlab import errors
from attnlab.models.attention import registry


class ConfigError(errors.UsageError):
  """The run's config or environment cannot work; the message says why."""


# Sizes that must be positive integers, and counts where 0 means "never".
_POSITIVE = (
  "total_steps", "log_every", "keep_checkpoints", "model.vocab_size", "model.d_model",
  "model.num_layers", "model.mlp_dim", "data.seq_len", "data.batch_size",
  "data.eval_batch_size", "data.vocab_size",
)  # fmt: skip
_NON_NEGATIVE = ("eval_every", "checkpoint_every", "eval_batches", "model.canon_conv")


def _get(config: ConfigDict, dotted: str):
  for key in dotted.split("."):
    config = config[key]
  return config


def check_sizes(config: ConfigDict) -> None:
  """Sizes and counts: integers, positive (or >= 0 where 0 turns a feature off)."""
  for names, low, word in ((_POSITIVE, 1, "a positive"), (_NON_NEGATIVE, 0, "a non-negative")):
    for name in names:
      value = _get(config, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name}={value!r} must be {word} integer")
  if config.eval_every and not config.eval_batches:
    raise ConfigError("eval_batches=0 with eval_every > 0: evaluate on at least one batch")
  if not config.optim.lr > 0:
    raise ConfigError(f"optim.lr={config.optim.lr!r} must be positive")


def layer_names(model: ConfigDict) -> list[str]:
  """The variant names of `model.layer_pattern` (or `model.attention`)."""
  pattern = [p.strip() for p in str(model.layer_pattern).split(",") if p.strip()]
  return pattern or [model.attention]


def check_model(model: ConfigDict) -> None:
  heads, kv_heads = model.num_heads, model.num_kv_heads or model.num_heads
  if heads < 1 or kv_heads < 1:
    raise ConfigError(f"model.num_heads={heads} and num_kv_heads={kv_heads} must be positive")
  if model.head_dim is None and model.d_model % heads:
    raise ConfigError(
      f"model.num_heads={heads} does not divide model.d_model={model.d_model}; "
      "change one, or set model.head_dim explicitly"
    )
  if heads % kv_heads:
    raise ConfigError(
      f"model.num_kv_heads={kv_heads} does not divide model.num_heads={heads} (GQA groups)"
    )
  names = layer_names(model)
  unknown = sorted({n for n in names if n not in registry.names()})
  if unknown:
    raise ConfigError(
      f"unknown attention variant(s) {unknown} in model.layer_pattern/model.attention; "
      f"registered: {registry.names()}"
    )
  if model.num_layers % len(names):
    raise ConfigError(
      f"model.layer_pattern has {len(names)} entries, which does not divide "
      f"model.num_layers={model.num_layers}"
    )
  if model.scan_layers and len(set(names)) > 1:
    raise ConfigError(
      f"model.scan_layers needs every layer to be the same variant, got {sorted(set(names))}; "
      "set model.scan_layers=False for a mixed layer_pattern"
    )
  for name in sorted(set(names)):
    try:
      options = registry.options(name, model)  # the defaults merged; unknown names rejected
    except ValueError as error:
      raise ConfigError(str(error)) from None
    for key in ("chunk_size", "block_size"):
      if key in options:
        value = options[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
          raise ConfigError(
            f"model.mixer.{name}.{key}={value!r}: the op takes a positive integer "
            "(any value works with any sequence length)"
          )


def _mesh_batch_ways(mesh: ConfigDict, devices: int) -> tuple[dict, int]:
  """Mesh sizes with -1 filled in, and how many ways the batch is split."""
  sizes = {axis: int(mesh.get(axis, 1)) for axis in ("data", "fsdp", "tensor")}
  unknown = [a for a, s in sizes.items() if s == -1]
  known = math.prod(s for s in sizes.values() if s != -1)
  if len(unknown) > 1 or any(s < 1 and s != -1 for s in sizes.values()):
    raise ConfigError(f"config.mesh={sizes}: sizes must be positive, at most one may be -1")
  if unknown:
    if devices % known:
      raise ConfigError(f"config.mesh={sizes} does not divide the {devices} devices")
    sizes[unknown[0]] = devices // known
  if math.prod(sizes.values()) > devices:
    raise ConfigError(
      f"config.mesh={sizes} needs {math.prod(sizes.values())} devices; {devices} available"
    )
  return sizes, sizes["data"] * sizes["fsdp"]


def check_batch(config: ConfigDict, devices: int, processes: int) -> None:
  sizes, ways = _mesh_batch_ways(config.mesh, devices)
  accum = config.optim.grad_accum_steps
  for field in ("batch_size", "eval_batch_size"):
    size = config.data[field]
    if size % ways or size % processes:
      raise ConfigError(
        f"data.{field}={size} does not divide over the mesh's batch axes "
        f"(data × fsdp = {sizes['data']} × {sizes['fsdp']} = {ways}) and {processes} "
        "process(es); choose a multiple of both"
      )
  if accum < 1 or config.data.batch_size % (accum * ways):
    raise ConfigError(
      f"data.batch_size={config.data.batch_size} does not split into "
      f"optim.grad_accum_steps={accum} microbatches of a multiple of {ways} (data × fsdp)"
    )


def check_packing(config: ConfigDict) -> None:
  """data.pack needs every layer's mixer to keep documents apart, and NAtS-L
  needs documents aligned to its blocks."""
  data = config.data
  if not data.get("pack", False):
    return
  names = set(layer_names(config.model))
  unsupported = sorted(names - set(registry.packing_names()))
  if unsupported:
    raise ConfigError(
      f"data.pack=True (packed documents) is not supported by {unsupported}; "
      f"packing works with {registry.packing_names()}. Set data.pack=False."
    )
  align = data.get("pack_align", 1)
  if align < 1:
    raise ConfigError(f"data.pack_align={align} must be a positive number of tokens")
  if data.seq_len % align:
    raise ConfigError(
      f"data.pack_align={align} does not divide data.seq_len={data.seq_len}: windows would "
      "not start on an aligned position"
    )
  if "nats_l" in names:
    block = config.model.mixer.nats_l.block_size
    if align % block:
      raise ConfigError(
        f"data.pack=True with NAtS-L needs documents that start on block boundaries: set "
        f"--config.data.pack_align={block} (a multiple of model.mixer.nats_l.block_size="
        f"{block}; now {align}), so that no routing block spans two documents"
      )


def check_data(data: ConfigDict) -> None:
  from attnlab.data import synthetic  # numpy only

  if data.task in synthetic.TASKS:
    try:  # one sequence: the task's own check of what fits, in a millisecond
      synthetic.TASKS[data.task](
        [0], seed=0, seq_len=data.seq_len, vocab_size=data.vocab_size,
        num_kv_pairs=data.num_kv_pairs, num_queries=data.num_queries,
      )  # fmt: skip
    except ValueError as e:
      raise ConfigError(
        f"data.task={data.task!r}: {e}; raise data.seq_len or lower data.num_kv_pairs"
      ) from None
    return
  if data.task != "tfds":
    raise ConfigError(
      f"data.task={data.task!r} is unknown; choose one of {sorted(synthetic.TASKS)} or 'tfds'"
    )
  if data.tokenizer != "byte" and not os.path.isfile(data.tokenizer):
    raise ConfigError(f"data.tokenizer={data.tokenizer!r} is neither 'byte' nor a file")
  from attnlab.data import tokenizers  # only text runs need it

  try:
    tokenizers.check_vocab_size(tokenizers.get_tokenizer(data.tokenizer), data.vocab_size)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  # prepare_from builds only `text_corpus` (text.open_source); other datasets ignore it.
  if data.prepare_from and data.tfds_name == "text_corpus":
    source = data.prepare_from
    if not os.path.isdir(source):
      raise ConfigError(f"data.prepare_from={source!r} is not a directory")
    if not any(name.endswith(".txt") for _, _, names in os.walk(source) for name in names):
      raise ConfigError(f"data.prepare_from={source!r} holds no .txt files")
  elif data.data_dir is not None:
    if not os.path.isdir(data.data_dir):
      raise ConfigError(f"data.data_dir={data.data_dir!r} does not exist")
    if not os.listdir(data.data_dir):
      raise ConfigError(
        f"data.data_dir={data.data_dir!r} is empty; prepare {data.tfds_name!r} there first "
        f"(tfds build {data.tfds_name} --data_dir=... --file_format=array_record, or "
        "python -m attnlab.data.prepare for .txt files)"
      )


def check_workdir(workdir: str) -> None:
  """Creates `workdir` and proves it writable with a probe file."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_probe"):
      pass
  except OSError as e:
    raise ConfigError(f"workdir {workdir!r} is not writable: {e}") from e


def check_resume(config: ConfigDict, workdir: str) -> None:
  """A workdir with checkpoints of another model cannot be resumed: restoring
  fails deep inside orbax when parameter shapes differ, and silently trains the
  wrong model when only the variant does. Say which model fields differ.
  Changes that keep the variants and shapes (steps, lr, chunk sizes, kernel
  implementations) resume as before."""
  path, checkpoints = os.path.join(workdir, "config.json"), os.path.join(workdir, "checkpoints")
  if not os.path.isfile(path) or not os.path.isdir(checkpoints):
    return
  if not any(name.isdigit() for name in os.listdir(checkpoints)):
    return
  from attnlab import config as config_lib
  from attnlab import train_state  # builds abstract models: only when resuming

  saved = config_lib.load_config(workdir)
  try:
    before = train_state.param_shapes(saved)
  except Exception:  # noqa: BLE001 - a run saved by an older attnlab: let restore decide
    return
  # Same shapes can still be another model (LUCID's parameters are softmax's):
  # the layers' variants must match too.
  if before == train_state.param_shapes(config) and layer_names(saved.model) == layer_names(
    config.model
  ):
    return
  old = config_lib.flatten(json.loads(saved.model.to_json_best_effort()))
  new = config_lib.flatten(json.loads(config.model.to_json_best_effort()))
  diffs = [
    f"model.{k}={old.get(k)!r} there, {new.get(k)!r} here"
    for k in sorted(new)
    if old.get(k) != new.get(k)
  ]
  shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
  raise ConfigError(
    f"workdir {workdir!r} holds checkpoints of a different model ({shown or 'parameter shapes differ'}): "
    "use a new --workdir, or rerun with that run's config"
  )


def check_init_from(config: ConfigDict, workdir: str) -> None:
  """config.init_from, for a run that starts from scratch (a resumed run
  ignores it): a workdir with a checkpoint whose parameters fit this model's
  (attnlab/warm_start.py says which mismatches stop the run, and why)."""
  if not config.get("init_from"):
    return
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints)):
    return
  from attnlab import warm_start  # builds abstract models: only when it is used

  try:
    warm_start.match(config)
  except errors.UsageError as error:
    raise ConfigError(str(error)) from None


def check_run(config: ConfigDict, workdir: str) -> None:
  """Every check above, in the order a user would want to hear about them."""
  check_sizes(config)
  if config.model.vocab_size != config.data.vocab_size:
    raise ConfigError(
      f"model.vocab_size={config.model.vocab_size} differs from "
      f"data.vocab_size={config.data.vocab_size}"
    )
  check_model(config.model)
  check_packing(config)
  check_batch(config, jax.device_count(), jax.process_count())
  check_data(config.data)
  check_workdir(workdir)
  check_resume(config, workdir)
  check_init_from(config, workdir)
