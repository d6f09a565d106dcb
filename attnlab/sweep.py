"""Sweeps: one config, many override sets, one workdir per run.

    python -m attnlab.sweep --config=configs/tiny.py --sweep=sweeps/recall.py --workdir=runs/recall
    python -m attnlab.sweep ... --print                  # the commands, nothing run
    python -m attnlab.sweep ... --launch="bash launch/tpu.sh run --wait"
    python -m attnlab.sweep ... --config.total_steps=50  # extra overrides for every run

A sweep file defines `get_sweep()` returning a list of override sets, each a
dict whose keys are `:name` (a config argument, as in `configs/tiny.py:name=...`)
or `config.a.b` (a `--config.a.b=...` override). Build it with `product`,
`zip_` and `axis`:

    from attnlab.sweep import axis, product, zip_

    def get_sweep():
      return product(axis(":task", ["mqar", "needle"]), axis(":attention", ["softmax", "linear"]))

Runs go one after another into `<workdir>/<run name>`, where the name spells
the override set (`task=mqar,attention=linear`). A run whose latest checkpoint
is at its config's `total_steps` is finished and skipped, so rerunning the
sweep resumes it: unfinished runs resume from their own checkpoints.
`python -m attnlab.compare <workdir>` tabulates and plots the runs.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from attnlab import errors

Override = dict[str, Any]


def axis(key: str, values: Iterable[Any]) -> list[Override]:
  """One swept key: [{key: v} for v in values]. Keys are ':arg' or 'config.x.y'."""
  if not (key.startswith(":") or key.startswith("config.")):
    raise errors.UsageError(
      f"sweep key {key!r} must start with ':' (argument) or 'config.' (override)"
    )
  return [{key: v} for v in values]


def product(*axes: Sequence[Override]) -> list[Override]:
  """Every combination of the axes (the first varies slowest)."""
  return [_merge(*combo) for combo in itertools.product(*axes)]


def zip_(*axes: Sequence[Override]) -> list[Override]:
  """The axes side by side: the i-th set of each, merged (equal lengths)."""
  lengths = {len(a) for a in axes}
  if len(lengths) > 1:
    raise errors.UsageError(f"zip_ needs axes of equal length, got {sorted(lengths)}")
  return [_merge(*combo) for combo in zip(*axes)]


def _merge(*sets: Override) -> Override:
  merged: Override = {}
  for s in sets:
    clash = set(merged) & set(s)
    if clash:
      raise errors.UsageError(f"sweep key(s) {sorted(clash)} set twice in one run")
    merged.update(s)
  return merged


def load_sweep(path: str) -> list[Override]:
  """The override sets of a sweep file's `get_sweep()`."""
  spec = importlib.util.spec_from_file_location("sweep_file", path)
  if spec is None or not os.path.isfile(path):
    raise errors.PathError(f"sweep file {path!r} not found (the repository's are in sweeps/)")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_sweep", None)):
    raise errors.UsageError(f"sweep file {path!r} defines no get_sweep() function")
  sets = list(module.get_sweep())
  for s in sets:
    for key in s:
      axis(key, [])  # validates the key
  return sets


def run_name(overrides: Override) -> str:
  """'task=mqar,attention=linear,total_steps=50': short, unique, filesystem-safe."""
  parts = [f"{key.lstrip(':').split('.')[-1]}={value}" for key, value in overrides.items()]
  name = ",".join(parts) or "base"
  return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def train_args(config: str, overrides: Override, extra: Sequence[str], workdir: str) -> list[str]:
  """The `python -m attnlab.train` arguments of one run."""
  args = [f"{k[1:]}={v}" for k, v in overrides.items() if k.startswith(":")]
  base, _, existing = config.partition(":")
  config_arg = ",".join(a for a in (existing, *args) if a)
  flags = [f"--config={base}" + (f":{config_arg}" if config_arg else "")]
  flags += [f"--{k}={v}" for k, v in overrides.items() if k.startswith("config.")]
  return [*flags, *extra, f"--workdir={workdir}"]


def is_finished(workdir: str) -> bool:
  """True when the run's latest checkpoint is at its config's total_steps."""
  if "://" in workdir:  # remote (gs://): not checked here; every run resumes itself
    return False
  config_path = os.path.join(workdir, "config.json")
  checkpoints = os.path.join(workdir, "checkpoints")
  if not (os.path.exists(config_path) and os.path.isdir(checkpoints)):
    return False
  with open(config_path) as f:
    total = json.load(f)["total_steps"]
  steps = [int(d) for d in os.listdir(checkpoints) if d.isdigit()]
  return bool(steps) and max(steps) >= total


def plan(
  config: str, sets: Sequence[Override], root: str, extra: Sequence[str] = ()
) -> list[dict[str, Any]]:
  """[{name, workdir, args, overrides, finished}] for every override set."""
  runs = []
  names = set()
  for overrides in sets:
    name = run_name(overrides)
    if name in names:
      raise errors.UsageError(f"two runs of the sweep share the name {name!r}")
    names.add(name)
    workdir = os.path.join(root, name)
    runs.append(
      dict(
        name=name,
        workdir=workdir,
        overrides=overrides,
        args=train_args(config, overrides, extra, workdir),
        finished=is_finished(workdir),
      )
    )
  return runs


def _parse(argv: list[str]):
  """absl flags for the sweep itself; `--config.*` arguments pass through to
  every run (absl would reject them: they belong to the train program)."""
  from absl import flags

  extra = [a for a in argv[1:] if a.startswith("--config.")]
  rest = [argv[0], *(a for a in argv[1:] if not a.startswith("--config."))]
  return flags.FLAGS(rest), extra


def main(parsed) -> None:
  from absl import flags

  from attnlab import metrics

  argv, extra = parsed
  if len(argv) > 1:
    raise errors.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  config_file = f.config.split(":", 1)[0]
  if not os.path.isfile(config_file):
    raise errors.PathError(f"--config={f.config}: no such config file (e.g. configs/tiny.py)")
  runs = plan(f.config, load_sweep(f.sweep), f.workdir, extra)
  if "://" not in f.workdir:  # a record of what ran, next to the runs
    os.makedirs(f.workdir, exist_ok=True)
    with open(os.path.join(f.workdir, "sweep.json"), "w") as out:
      manifest = {"config": f.config, "sweep": f.sweep, "extra": extra, "runs": runs}
      json.dump(manifest, out, indent=1, default=str)
  prefix = shlex.split(f.launch) if f.launch else [sys.executable, "-m", "attnlab.train"]
  todo = [r for r in runs if not r["finished"]]
  if f.print:
    shown = prefix if f.launch else ["python", "-m", "attnlab.train"]
    for r in runs:
      line = shlex.join([*shown, *r["args"]])
      print(("# finished: " if r["finished"] else "") + line)
    return
  progress = metrics.Progress(total=len(runs), label="sweep")
  progress.message(
    f"{len(runs)} runs, {len(runs) - len(todo)} of them finished; workdir {f.workdir}"
  )
  failed = []
  for r in runs:
    if r["finished"]:
      progress.update(run=r["name"], status="skipped (finished)")
      continue
    progress.message(f"run {r['name']}: {shlex.join([*prefix, *r['args']])}")
    code = subprocess.call([*prefix, *r["args"]])
    if code != 0:
      failed.append(r["name"])
    progress.update(run=r["name"], status="ok" if code == 0 else f"exit {code}")
  progress.close()
  if failed:
    raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}")
  progress.message(f"done; compare with: python -m attnlab.compare {f.workdir}")


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("config", None, "Config file, optionally with :args shared by all runs.")
  flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep().")
  flags.DEFINE_string("workdir", None, "Parent directory of the runs' workdirs.")
  flags.DEFINE_bool("print", False, "Print every run's command (finished ones commented).")
  flags.DEFINE_string(
    "launch",
    None,
    "Command prefix that runs one training command line instead of "
    "`python -m attnlab.train` (e.g. 'bash launch/tpu.sh run --wait'); it must block.",
  )
  for name in ("config", "sweep", "workdir"):
    flags.mark_flag_as_required(name)


if __name__ == "__main__":
  from attnlab import cli

  _define_flags()
  cli.run(main, flags_parser=_parse)
