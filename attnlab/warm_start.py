"""Starting a run from another run's parameters: `--config.init_from=DIR`.

DIR is a workdir, trained or converted from Hugging Face (`python -m
attnlab.convert`). A run that starts from scratch takes from DIR's latest
checkpoint every parameter whose path and shape match one of its own, in any
variant: a softmax run's embeddings, norms, MLPs and, for the softmax family
(LUCID, SSA, softplus, linear), its q/k/v/o projections; Gated DeltaNet and
NAtS-L name their projections differently, so theirs start fresh. The
optimizer state starts fresh and the step at 0. A run resumed from its own
checkpoint ignores init_from.

A parameter that DIR has under the same path but with another shape stops
the run at startup (exit 2) instead of starting fresh: variants never share a
path with different shapes, so a mismatch means the two models' sizes differ
(d_model, heads, vocabulary, mlp_dim), a config mistake that would otherwise
train a half-initialised model without notice.

What was taken and what starts fresh goes to the run's log and to
<workdir>/init_from.json.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from attnlab import checkpoint, errors, train_state
from attnlab import config as config_lib

Path = tuple[str | int, ...]
REPORT_FILE = "init_from.json"


def _name(path: Path) -> str:
  return "/".join(str(p) for p in path)


def source_step(directory: str) -> int:
  """The latest complete checkpoint step of workdir `directory`; a usage error
  naming what is missing otherwise."""
  where = f"config.init_from={directory!r}"
  if not os.path.isdir(directory):
    raise errors.PathError(
      f"{where} does not exist; give a workdir (trained, or written by python -m attnlab.convert)"
    )
  if not os.path.isfile(os.path.join(directory, "config.json")):
    raise errors.PathError(f"{where} is not a workdir (it has no config.json)")
  steps = checkpoint.finished_steps(os.path.join(directory, "checkpoints"))
  if not steps:
    raise errors.PathError(f"{where} holds no checkpoint yet (nothing under its checkpoints/)")
  return steps[-1]


def _per_layer(shapes: dict[Path, tuple], scanned: bool) -> dict[Path, tuple[int, ...]]:
  """{path: shape} with a scan_layers model's stacked block parameters
  (('blocks', name...), leading layer axis) split into the per-layer paths of
  an unscanned one (('blocks', i, name...)), so the two layouts match."""
  out: dict[Path, tuple[int, ...]] = {}
  for path, (shape, _) in shapes.items():
    if scanned and path[0] == "blocks":
      out.update({("blocks", i, *path[1:]): tuple(shape[1:]) for i in range(shape[0])})
    else:
      out[path] = tuple(shape)
  return out


def match(config: ConfigDict) -> tuple[dict[Path, tuple[int, ...]], list[Path], list[Path]]:
  """(this model's per-layer parameter shapes, paths taken from
  config.init_from, paths that start fresh), from the abstract models alone
  (per-layer paths whichever `model.scan_layers` either run has). Raises a
  usage error for a missing source, a parameter of another shape under a
  shared path, or no shared parameter."""
  directory = config.init_from
  source_step(directory)
  source_config = config_lib.load_config(directory)
  source = _per_layer(train_state.param_shapes(source_config), source_config.model.scan_layers)
  target = _per_layer(train_state.param_shapes(config), config.model.scan_layers)
  mismatched = [p for p in target if p in source and source[p] != target[p]]
  if mismatched:
    shown = "; ".join(
      f"{_name(p)} {list(source[p])} there, {list(target[p])} here" for p in mismatched[:3]
    )
    more = f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
    raise errors.UsageError(
      f"config.init_from={directory!r}: {len(mismatched)} parameters have another shape there "
      f"({shown}{more}); the models' sizes differ: match them (d_model, heads, vocab_size, "
      "mlp_dim), or start without init_from"
    )
  taken = [p for p in target if p in source]
  if not taken:
    raise errors.UsageError(
      f"config.init_from={directory!r}: none of its parameters has a path of this model's; "
      "nothing to initialise from"
    )
  return target, taken, [p for p in target if p not in source]


def _path(key_path) -> Path:
  return tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))


def load(config: ConfigDict, placed: train_state.Setup, state: dict) -> tuple[dict, dict]:
  """(state with config.init_from's matching parameters in place of the fresh
  ones, the report). `state` is a freshly created train state of `placed`;
  its optimizer state (AdamW's moments: zeros, whatever the parameters) and
  step stay as created."""
  directory = os.path.abspath(config.init_from)
  step = source_step(directory)
  shapes, taken, fresh = match(config)
  wanted = set(taken)
  source_config = config_lib.load_config(directory)
  source = train_state.setup(source_config, placed.mesh)  # read onto this run's mesh
  with placed.context():
    restored = checkpoint.read_part(
      os.path.join(directory, "checkpoints"), step, {"params": source.abstract_state["params"]}
    )["params"]
    by_path = {_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}

    def source_value(path: Path) -> jax.Array:  # per-layer path, either source layout
      if path in by_path:
        return by_path[path]
      return by_path[(path[0], *path[2:])][path[1]]

    def pick(key_path, fresh_value):
      path = _path(key_path)
      if config.model.scan_layers and path[0] == "blocks":
        layers = [("blocks", i, *path[1:]) for i in range(fresh_value.shape[0])]
        if not wanted.intersection(layers):
          return fresh_value
        value = jnp.stack(
          [source_value(p) if p in wanted else fresh_value[i] for i, p in enumerate(layers)]
        )
      elif path in wanted:
        value = source_value(path)
      else:
        return fresh_value
      return jax.device_put(value, fresh_value.sharding)

    params = jax.tree_util.tree_map_with_path(pick, state["params"])
  size = lambda paths: sum(math.prod(shapes[p]) for p in paths)
  report = {
    "init_from": directory,
    "step": step,
    "taken": [_name(p) for p in taken],
    "fresh": [_name(p) for p in fresh],
    "taken_values": size(taken),
    "fresh_values": size(fresh),
  }
  return {**state, "params": params}, report


def _collapsed(names: list[str]) -> list[str]:
  """Per-layer names once, layer indices as '*' and a count: 'blocks/*/mixer/a ×4'."""
  counts = collections.Counter(
    "/".join("*" if part.isdigit() else part for part in name.split("/")) for name in names
  )
  return [f"{name} ×{n}" if n > 1 else name for name, n in counts.items()]


def describe(report: dict[str, Any]) -> str:
  """The report as one log line; per-layer names appear once (init_from.json
  has the full lists)."""
  taken, fresh = len(report["taken"]), len(report["fresh"])
  line = (
    f"init_from: {taken} of {taken + fresh} parameters ({report['taken_values']:,} of "
    f"{report['taken_values'] + report['fresh_values']:,} values) from {report['init_from']} "
    f"step {report['step']}; {fresh} fresh"
  )
  return line + (": " + ", ".join(_collapsed(report["fresh"])) if fresh else "")
