"""The one metrics writer: JSON lines, TensorBoard events and a progress line;
the progress line of other long commands (`Progress`) and the profiler window.

Only process 0 writes. `<workdir>/metrics.jsonl` holds one JSON object per
logged step ({"step": ..., "train/loss": ...}); TensorBoard event files go to
`<workdir>/tensorboard`. The progress line is redrawn in place on a terminal
and printed every `log_every` steps otherwise.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, TextIO

import jax
import numpy as np
from absl import logging


def _to_python(value: Any):
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


class MetricWriter:
  def __init__(
    self, workdir: str, *, total_steps: int, progress: bool = True, stream: TextIO | None = None
  ):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self.stream = stream or sys.stderr
    self.progress = progress and self.active
    self._line = ProgressLine(self.stream, enabled=self.progress)
    self.interactive = self._line.interactive
    self._tb = None
    self._jsonl = None
    self._start = time.time()
    self._jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._warned_recreated = False
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(self._jsonl_path, "a")
      from tensorboardX import SummaryWriter  # only process 0 needs it

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Records scalars for `step` in JSON lines and TensorBoard."""
    if not self.active:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    if not os.path.exists(self._jsonl_path):  # removed during the run: start a new file
      self._jsonl.close()
      os.makedirs(os.path.dirname(self._jsonl_path), exist_ok=True)
      self._jsonl = open(self._jsonl_path, "a")
      if not self._warned_recreated:
        self._warned_recreated = True
        self.warning(
          f"WARNING: {self._jsonl_path} was removed during the run; recreated it at step "
          f"{int(step)} (earlier rows are in the TensorBoard events)"
        )
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, int(step))
    self._tb.flush()

  def show_progress(self, step: int, metrics: dict[str, Any]) -> None:
    """One status line: step, loss, accuracy, tokens/s, elapsed time."""
    if not self.progress:
      return
    parts = [f"step {step}/{self.total_steps}"]
    for key, fmt in (
      ("train/loss", "loss {:.4f}"),
      ("train/accuracy", "acc {:.3f}"),
      ("eval/loss", "eval_loss {:.4f}"),
      ("eval/accuracy", "eval_acc {:.3f}"),
      ("train/tokens_per_sec", "{:,.0f} tok/s"),
      ("train/mfu", "mfu {:.1%}"),
    ):
      if key in metrics:
        parts.append(fmt.format(float(metrics[key])))
    parts.append(f"{time.time() - self._start:.0f}s")
    self._line.draw(" | ".join(parts))

  def message(self, text: str) -> None:
    """A one-off line (resume, preemption, final summary)."""
    self._line.message(text)

  def warning(self, text: str) -> None:
    """A line that must be seen: on the progress stream when it is on, else
    in the absl log (stderr)."""
    if not self.active:
      return
    if self.progress:
      self._line.message(text)
    else:
      logging.warning("%s", text)

  def close(self) -> None:
    self._line.close()
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


class ProgressLine:
  """One status line, redrawn in place on a terminal and printed as a new
  line otherwise (logs, notebooks); messages go on lines of their own."""

  def __init__(self, stream: TextIO | None = None, *, enabled: bool = True):
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self.interactive = enabled and self.stream.isatty()
    self._open = False  # a drawn line without its newline yet

  def draw(self, line: str) -> None:
    if not self.enabled:
      return
    if self.interactive:
      self.stream.write("\r\033[K" + line)
      self._open = True
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    if self.enabled:
      self.stream.write(("\n" if self._open else "") + text + "\n")
      self._open = False
      self.stream.flush()

  def close(self) -> None:
    if self._open:
      self.stream.write("\n")
      self.stream.flush()
      self._open = False


class Progress:
  """`done/total` progress of a long command (evaluate, analyze, sweep,
  data.prepare): label, count, elapsed time and an ETA, plus free fields.

      progress = metrics.Progress(total=len(items), label="evaluate")
      for item in items:
        ...
        progress.update(item=name, loss=f"{loss:.3f}")
      progress.close()
  """

  def __init__(
    self,
    total: int | None,
    *,
    label: str,
    stream: TextIO | None = None,
    enabled: bool = True,
  ):
    self.total = total
    self.label = label
    self.done = 0
    self._start = time.time()
    # No jax.process_index() here: the sweep's parent process must not start a backend.
    self._line = ProgressLine(stream, enabled=enabled)

  def update(self, advance: int = 1, **fields: Any) -> None:
    """Counts `advance` more items done and redraws the line."""
    self.done += advance
    elapsed = time.time() - self._start
    count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
    parts = [f"{self.label} {count}", *(f"{k} {v}" for k, v in fields.items())]
    parts.append(f"{elapsed:.0f}s")
    if self.total and 0 < self.done < self.total:
      parts.append(f"eta {elapsed / self.done * (self.total - self.done):.0f}s")
    self._line.draw(" | ".join(parts))

  def message(self, text: str) -> None:
    self._line.message(text)

  def close(self) -> None:
    self._line.close()


class StepProfiler:
  """A jax profiler trace of train steps START..END (`spec` = "START,END").

  The trace lands in `logdir/plugins/profile/<run>/`, which TensorBoard's
  Profile tab reads when pointed at `logdir`. Call `before(step)` before a
  step is dispatched and `after(step, outputs)` once it has been.
  """

  def __init__(self, spec: str, logdir: str):
    self.window = parse_profile_steps(spec)
    self.logdir = logdir
    self.active = False

  def before(self, step: int) -> None:
    if self.window and step == self.window[0] and not self.active:
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after(self, step: int, outputs: Any) -> bool:
    """Stops after the window's last step; True when it has just written."""
    if self.active and step >= self.window[1]:
      jax.block_until_ready(outputs)  # the trace must hold the steps' device work
      jax.profiler.stop_trace()
      self.active = False
      return True
    return False

  def close(self) -> None:
    if self.active:  # the run ended inside the window
      jax.profiler.stop_trace()
      self.active = False


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """ "START,END" -> (START, END); "" -> None."""
  if not spec:
    return None
  try:
    start, end = (int(x) for x in str(spec).split(","))
  except ValueError:
    raise ValueError(f"profile_steps must look like 'START,END', got {spec!r}") from None
  if not 1 <= start <= end:
    raise ValueError(f"profile_steps needs 1 <= START <= END, got {spec!r}")
  return start, end
