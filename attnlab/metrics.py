"""The one metrics writer: JSON lines, TensorBoard events and a progress line.

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
    self.interactive = self.progress and self.stream.isatty()
    self._tb = None
    self._jsonl = None
    self._start = time.time()
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter  # only process 0 needs it

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Records scalars for `step` in JSON lines and TensorBoard."""
    if not self.active:
      return
    row = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
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
    ):
      if key in metrics:
        parts.append(fmt.format(float(metrics[key])))
    parts.append(f"{time.time() - self._start:.0f}s")
    line = " | ".join(parts)
    if self.interactive:
      self.stream.write("\r\033[K" + line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    """A one-off line (resume, preemption, final summary)."""
    if self.progress:
      self.stream.write(("\n" if self.interactive else "") + text + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self.interactive:
      self.stream.write("\n")
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()
