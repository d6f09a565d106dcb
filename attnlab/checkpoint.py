"""Checkpoints: an async Orbax CheckpointManager holding the train state and
the grain data-iterator state side by side, keeping the last N.

Damaged checkpoints. Orbax writes a step into `<step>.orbax-checkpoint-tmp-*`
and renames it when complete, so a process killed mid-save leaves a temporary
directory that `latest_step()` already ignores (orbax 0.12.8). A finalized step
can still be damaged afterwards (a file removed or truncated); restoring it
then raises. `restore_latest` falls back to the newest step that restores and
moves what it skipped, unfinished saves included, to
`<workdir>/checkpoints_damaged/` with a warning naming each: nothing is
deleted, and a later save of the same step does not collide with it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

_UNFINISHED = ".orbax-checkpoint-tmp"


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.damaged_directory = os.path.abspath(os.path.join(workdir, "checkpoints_damaged"))
    self.skipped: list[str] = []  # one line per checkpoint set aside, for the run's log
    # No barrier needed: the manager ignores temporary directories, so moving
    # them (process 0 only) changes nothing another process lists.
    for name in self._unfinished():
      self._set_aside(name, "an unfinished save (the process stopped while writing it)")
    self.manager = ocp.CheckpointManager(
      self.directory,
      item_names=("state", "data"),
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
      },
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True
      ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _unfinished(self) -> list[str]:
    if not os.path.isdir(self.directory):
      return []
    return sorted(n for n in os.listdir(self.directory) if _UNFINISHED in n)

  def _set_aside(self, name: str, reason: str) -> None:
    """Moves checkpoints/<name> to checkpoints_damaged/ (process 0) and warns."""
    target = os.path.join(self.damaged_directory, name)
    if jax.process_index() == 0:
      os.makedirs(self.damaged_directory, exist_ok=True)
      suffix = 1
      while os.path.exists(target):  # the same step damaged twice
        target = os.path.join(self.damaged_directory, f"{name}.{suffix}")
        suffix += 1
      shutil.move(os.path.join(self.directory, name), target)
    line = f"skipped checkpoint {os.path.join(self.directory, name)}: {reason}; moved to {target}"
    logging.warning("%s", line)
    self.skipped.append(line)

  def restore_latest(self, abstract_state: Any, data_iterator: Any | None) -> tuple[int, Any]:
    """Restores the newest checkpoint that loads: (step, state), or (None, None)
    when there is none. Newer ones that fail to restore are set aside with a
    warning. When every checkpoint fails (a changed model, not damage), the
    newest one's error is raised and nothing is moved."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # noqa: BLE001 (orbax, tensorstore and grain raise many kinds)
        failures.append((step, e))
        continue
      for bad, error in failures:
        reason = f"restoring it failed ({type(error).__name__}: {_first_line(error)})"
        self._set_aside(str(bad), reason)  # the manager's default step names
      if failures:
        _sync("attnlab_checkpoint_damaged")
        self.manager.reload()
      return step, state
    if failures:
      raise failures[0][1]
    return None, None

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    """Starts an async save; returns once the state is safely copied off-device."""
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
      ),
      force=True,
    )

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings).

    The data iterator, if given, is restored in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_part(self, step: int, abstract_part: dict) -> dict:
    """Restores only the top-level entries of the state named in
    `abstract_part` (e.g. {'params': ...}, ShapeDtypeStructs with shardings):
    the rest (the optimizer state, twice the parameters' size) is never read."""
    path = os.path.join(self.directory, str(step), "state")
    if not os.path.isdir(path):
      raise FileNotFoundError(f"no checkpoint at step {step} in {self.directory}")
    with ocp.PyTreeCheckpointer() as reader:
      return reader.restore(
        path,
        args=ocp.args.PyTreeRestore(
          item=abstract_part,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_part),
          partial_restore=True,
        ),
      )

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else ""


def _sync(name: str) -> None:
  """All processes wait here, so none lists a directory process 0 is moving."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def abstract_with_sharding(abstract_tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
  )
