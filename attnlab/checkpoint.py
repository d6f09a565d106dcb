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

import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

_UNFINISHED = ".orbax-checkpoint-tmp"
_MARKER = ".attnlab-directory"  # this run's token (see Checkpointer._mark_directory)
# Written by `python -m attnlab.convert` beside config.json: where the workdir's
# parameters came from, and the one step it wrote, which has no data position.
CONVERTED_FILE = "converted.json"


# A checkpoint takes about its arrays' bytes on disk (OCDBT, uncompressed),
# plus metadata; the margin keeps a save from filling the disk to the last byte.
_SPACE_MARGIN_FRACTION = 0.1
_SPACE_MARGIN_BYTES = 1 << 16


class DiskFullError(OSError):
  """The disk holding the checkpoints has no room for the next one."""

  def __init__(self, message: str):
    super().__init__(message)
    self.errno = errno.ENOSPC  # str() stays the message alone


def _is_disk_full(error: BaseException) -> bool:
  text = str(error)
  return (
    (isinstance(error, OSError) and error.errno == errno.ENOSPC)
    or "No space left on device" in text
    or "os_error_code='28'" in text
  )


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int, warn: Callable[[str], None] | None = None):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.damaged_directory = os.path.abspath(os.path.join(workdir, "checkpoints_damaged"))
    self.skipped: list[str] = []  # one line per checkpoint set aside, for the run's log
    self._warn = warn or (lambda line: logging.warning("%s", line))
    self._warned_vanished = False
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
    self._mark_directory()
    self._directory_identity = self._identity()

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
    """Starts an async save; returns once the state is safely copied off-device.

    Raises DiskFullError, before writing anything, when the disk cannot hold
    the checkpoint (and when a write runs out of space anyway: the partial
    save is removed, so the newest complete checkpoint stays the one to resume
    from). A checkpoint directory that vanished during the run is recreated
    with one warning.
    """
    try:
      self.manager.wait_until_finished()  # the previous save's bytes are on disk now
    except Exception as error:
      if not self._vanished():  # a save that failed for another reason is not ignored
        raise self._translated(error, step) from error
      # Its directory went away under it: that save is lost, the run is not.
    self._recreate_if_vanished(step)
    self._check_space(step, state)
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator),
        ),
        force=True,
      )
    except Exception as error:
      raise self._translated(error, step) from error

  def _mark_directory(self) -> None:
    """Process 0 leaves a token of this run in the directory: a directory that was
    deleted and made again (by an in-flight save) can reuse the inode number, so
    the inode alone does not tell that it vanished."""
    if jax.process_index() == 0:
      with open(os.path.join(self.directory, _MARKER), "w") as f:
        f.write(uuid.uuid4().hex)

  def _identity(self) -> tuple[int, int, str | None] | None:
    try:
      info = os.stat(self.directory)
    except OSError:
      return None
    token = None
    if jax.process_index() == 0:
      try:
        with open(os.path.join(self.directory, _MARKER)) as f:
          token = f.read()
      except OSError:
        token = None
    return info.st_dev, info.st_ino, token

  def _vanished(self) -> bool:
    """The checkpoint directory was deleted (or replaced) since it was made."""
    return self._identity() != self._directory_identity

  def _recreate_if_vanished(self, step: int) -> None:
    if not self._vanished():
      return
    if jax.process_index() == 0:
      os.makedirs(self.directory, exist_ok=True)
      for name in self._unfinished():  # a save that was in flight: its rest is garbage
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    self._mark_directory()
    self._directory_identity = self._identity()
    self.manager.reload()  # forget the steps that went with it
    if not self._warned_vanished:
      self._warned_vanished = True
      self._warn(
        f"WARNING: the checkpoint directory {self.directory} disappeared during the run "
        f"(deleted or unmounted); recreated it at step {step}: the checkpoints it held are gone"
      )

  def _check_space(self, step: int, state: Any) -> None:
    local = sum(
      shard.data.nbytes
      for leaf in jax.tree.leaves(state)
      for shard in getattr(leaf, "addressable_shards", ())
    )
    needed = local * (1 + _SPACE_MARGIN_FRACTION) + _SPACE_MARGIN_BYTES
    free = shutil.disk_usage(self.directory).free
    enough = free >= needed
    if jax.process_count() > 1:  # every process stops, or none does (saves are collective)
      enough = bool(multihost_utils.process_allgather(np.array(enough)).all())
    if not enough:
      raise DiskFullError(
        f"no space for the checkpoint at step {step}: {free / 1e6:.1f} MB free on the disk "
        f"of {self.directory}, about {needed / 1e6:.1f} MB needed. Stopped; "
        f"{self._resume_hint()}",
      )

  def _resume_hint(self) -> str:
    latest = self.manager.latest_step()
    if latest is None:
      return "no checkpoint was saved yet. Free space and rerun the command."
    return f"the newest complete checkpoint is step {latest}: free space and rerun the command to resume from it."

  def _translated(self, error: Exception, step: int | None) -> Exception:
    """A write that ran out of space, as a DiskFullError with the partial save
    removed (it cannot be completed, and it holds the space a rerun needs)."""
    if not _is_disk_full(error):
      return error
    if jax.process_index() == 0:
      for name in self._unfinished():
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    self.manager.reload()
    at = f" at step {step}" if step is not None else ""
    return DiskFullError(
      f"the disk of {self.directory} filled up while writing the checkpoint{at}; removed the "
      f"partial save. {self._resume_hint()}",
    )

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings).

    The data iterator, if given, is restored in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None and not self._without_data(step):
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def _without_data(self, step: int) -> bool:
    """A step written by `python -m attnlab.convert` (recorded in the workdir's
    converted.json) holds no data-iterator state: no pipeline produced it, so a
    run resumed from it starts its data at the beginning. Any other step
    without one is damaged, and restoring it fails as before."""
    marker = os.path.join(os.path.dirname(self.directory), CONVERTED_FILE)
    if os.path.isdir(os.path.join(self.directory, str(step), "data")) or not os.path.isfile(marker):
      return False
    with open(marker) as f:
      return json.load(f).get("step") == step

  def save_without_data(self, step: int, state: Any) -> None:
    """Saves a train state that no data pipeline produced (a converted
    checkpoint: see `_without_data`) and waits until it is on disk."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
    self.manager.wait_until_finished()

  def restore_part(self, step: int, abstract_part: dict) -> dict:
    """Restores only the top-level entries of the state named in
    `abstract_part` (e.g. {'params': ...}, ShapeDtypeStructs with shardings):
    the rest (the optimizer state, twice the parameters' size) is never read."""
    return read_part(self.directory, step, abstract_part)

  def close(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as error:
      raise self._translated(error, None) from error
    finally:
      self.manager.close()


def read_part(directory: str, step: int, abstract_part: dict) -> dict:
  """`Checkpointer.restore_part` of the checkpoint directory `directory`, read
  without a manager: nothing in `directory` is moved or created (it may be
  another run's, even one still training)."""
  path = os.path.join(directory, str(step), "state")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at step {step} in {directory}")
  with ocp.PyTreeCheckpointer() as reader:
    return reader.restore(
      path,
      args=ocp.args.PyTreeRestore(
        item=abstract_part,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_part),
        partial_restore=True,
      ),
    )


def finished_steps(directory: str) -> list[int]:
  """The complete steps in a checkpoint directory, oldest first, read from its
  listing (unfinished saves are named `<step>.orbax-checkpoint-tmp-*`)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


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
